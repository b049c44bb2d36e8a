"""sd_py: Stable Diffusion on sd-core (Rust, candle) with a diffusers-shaped API.

    from sd_py import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler.from_pretrained(model_id, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(model_id, scheduler=scheduler).to("cuda")
    image = pipe("a photograph of an astronaut riding a horse", generator=42).images[0]

Every scheduler sd-core implements is exported under its diffusers class name (the classes are
generated from sd-core's registry, see `scheduler_classes()`).

The names are loaded lazily: `import sd_py` (and `import sd_py.serve`) does not load the native
extension, so a Ray head node without a GPU driver can import the Serve app of a CUDA build.
"""

import os
import re
import sys
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any, List


def _point_at_mkl() -> None:
    """Tells sd-core where pip put Intel MKL (the `mkl` wheel installs libmkl_rt into
    `<prefix>/lib`), unless SD_MKL_LIB says already. sd-core loads it at the first CPU matrix
    product for its f32 and bf16 GEMMs; without it the builtin GEMM is used and bf16 on the
    CPU is refused with a clear error."""
    if os.environ.get("SD_MKL_LIB"):
        return
    import site

    for prefix in (sys.prefix, getattr(site, "USER_BASE", None) or ""):
        lib = Path(prefix) / "lib"
        for name in ("libmkl_rt.so.3", "libmkl_rt.so.2"):
            if (lib / name).is_file():
                os.environ["SD_MKL_LIB"] = str(lib / name)
                return


_point_at_mkl()

try:  # the wheel's version; the extension carries the same one
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    try:
        __version__ = _dist_version("sd_py")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        __version__ = "0.0.0"
except ImportError:  # pragma: no cover
    __version__ = "0.0.0"

# name -> submodule that defines it
_LAZY = {
    "StableDiffusionPipeline": "._pipeline",
    "StableDiffusionPipelineOutput": "._pipeline",
    "StableDiffusionImg2ImgPipeline": "._edit",
    "StableDiffusionInpaintPipeline": "._edit",
    "AutoPipelineForImage2Image": "._edit",
    "AutoPipelineForInpainting": "._edit",
    "SchedulerMixin": "._schedulers",
    "FrozenDict": "._schedulers",
    "scheduler_classes": "._schedulers",
    "scheduler_names": "._schedulers",
    "scheduler_from_name": "._schedulers",
    "GenerationCancelled": "._errors",
    "cuda_is_available": "._errors",
}

_STATIC_ALL = sorted(_LAZY)

# How the dynamic loader names a library the CUDA build links and cannot find
# ("libcuda.so.1: cannot open shared object file: No such file or directory").
_CUDA_LIBRARY = re.compile(r"lib(cuda|cublas|cublasLt|curand|cudart|nvrtc)\.so[.\d]*")


def _submodule(name: str) -> ModuleType:
    """Imports a submodule that loads the native extension. On a machine without the NVIDIA
    driver or the CUDA libraries the CUDA build cannot load: an ImportError that says so."""
    try:
        return import_module(name, __name__)
    except ImportError as e:
        missing = _CUDA_LIBRARY.search(str(e))
        if missing is None:
            raise
        raise ImportError(
            f"this sd_py wheel is the CUDA build, and its native extension needs {missing.group(0)}, "
            "which this machine lacks: it needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 "
            "libraries (libcublas, libcublasLt, libcurand, libcudart, libnvrtc; NVIDIA's pip "
            "wheels, on LD_LIBRARY_PATH), even for device='cpu'; install the CPU wheel of sd_py "
            "on machines without them"
        ) from e


def _scheduler_class_names() -> List[str]:
    names: List[str] = _submodule("._schedulers").scheduler_classes()
    return names


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(_submodule(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "__all__":
        return _STATIC_ALL + _scheduler_class_names()
    if name.endswith("Scheduler") and not name.startswith("_"):
        cls = _submodule("._schedulers").scheduler_class(name)
        if cls is not None:
            globals()[name] = cls
            return cls
        raise AttributeError(
            f"module 'sd_py' has no attribute {name!r}: sd-core has no scheduler of that class "
            f"(available: {', '.join(_scheduler_class_names())})"
        )
    raise AttributeError(f"module 'sd_py' has no attribute {name!r}")


def __dir__() -> List[str]:
    names = set(globals()) | set(_LAZY)
    try:
        names |= set(_scheduler_class_names())
    except ImportError:  # pragma: no cover - native module unavailable here
        pass
    return sorted(names)
