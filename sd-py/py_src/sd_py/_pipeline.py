"""`StableDiffusionPipeline`: diffusers' text-to-image pipeline API on sd-core."""

import errno
import json
import logging
import operator
import os
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import _sd_py as _native
from ._schedulers import FrozenDict, SchedulerMixin, scheduler_class

__all__ = ["StableDiffusionPipeline", "StableDiffusionPipelineOutput"]

logger = logging.getLogger("sd_py")

_U64 = 1 << 64

# The arguments of `__call__` (and `start_run`) that `_run_args` turns into the native run's.
_RUN_ARG_NAMES = (
    "prompt",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "num_images_per_prompt",
    "eta",
    "generator",
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "output_type",
    "guidance_rescale",
    "clip_skip",
    "prompt_syntax",
)

# `from_pretrained` keyword arguments of diffusers that need no action here: components sd_py
# never has (no safety checker) and download options it takes from the environment.
_SILENT_KWARGS = {"safety_checker", "feature_extractor", "requires_safety_checker", "image_encoder"}
_IGNORED_LOADING_KWARGS = {
    "force_download",
    "resume_download",
    "proxies",
    "output_loading_info",
    "use_auth_token",
    "mirror",
    "low_cpu_mem_usage",
    "use_safetensors",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_state_dict",
    "custom_pipeline",
    "custom_revision",
    "provider",
    "sess_options",
    "use_onnx",
    "load_connected_pipeline",
    "dduf_file",
}


class _Device(str):
    """A device name ("cpu", "cuda:0") that also answers torch.device's `.type` and `.index`."""

    @property
    def type(self) -> str:
        return self.split(":", 1)[0]

    @property
    def index(self) -> Optional[int]:  # type: ignore[override]
        parts = self.split(":", 1)
        return int(parts[1]) if len(parts) == 2 else None


class StableDiffusionPipelineOutput:
    """What a pipeline call returns, like diffusers' output: `.images` (PIL images, or a numpy
    array for `output_type="np"` / `"latent"`) and `.nsfw_content_detected` (always None: there is
    no safety checker). Also `.seeds`: the seed of each image (or the one seed of the batch), so
    any image can be made again."""

    def __init__(self, images: Any, nsfw_content_detected: Optional[List[bool]] = None, seeds: Optional[List[int]] = None):
        self.images = images
        self.nsfw_content_detected = nsfw_content_detected
        self.seeds = seeds or []

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(v for v in (self.images, self.nsfw_content_detected) if v is not None)

    def __getitem__(self, key: Union[int, str]) -> Any:
        if isinstance(key, str):
            if key in ("images", "nsfw_content_detected"):
                value = getattr(self, key)
                if value is not None:
                    return value
            raise KeyError(key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(k for k in ("images", "nsfw_content_detected") if getattr(self, k) is not None)

    def __len__(self) -> int:
        return len(self.to_tuple())

    def __repr__(self) -> str:
        n = len(self.images) if hasattr(self.images, "__len__") else "?"
        return f"StableDiffusionPipelineOutput(images=<{n}>, nsfw_content_detected={self.nsfw_content_detected}, seeds={self.seeds})"


# ---- argument parsing ----


def _is_device_like(value: Any) -> bool:
    s = str(value).strip().lower()
    return s in ("cpu", "cuda", "mps") or s.startswith("cuda:") or type(value).__name__ == "device"


def _device_name(device: Any) -> str:
    """"cpu", "cuda", "cuda:1", a torch.device or a CUDA ordinal (int)."""
    if isinstance(device, bool):
        raise ValueError(f"invalid device {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"invalid device ordinal {device}")
        return f"cuda:{device}"
    if not isinstance(device, str) and type(device).__name__ != "device":
        raise ValueError(f"invalid device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or a torch.device")
    return str(device).strip()


def _dtype_name(dtype: Any) -> str:
    """"float32" | "float16" | "bfloat16" from a string or a torch dtype (recognised by its name,
    e.g. "torch.float16", so torch is never imported)."""
    if dtype is None:
        return "float32"
    if not isinstance(dtype, str):
        name = str(dtype)
        if not name.startswith("torch."):
            raise ValueError(f"invalid torch_dtype {dtype!r}: expected torch.float32/float16/bfloat16 or their names")
        dtype = name
    return str(_native.normalize_dtype(dtype))


def _count(name: str, value: Any) -> int:
    """A count or size argument as the native module takes it (an unsigned integer); sd-core
    checks its value."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            n = int(value)
        else:
            raise ValueError(f"`{name}` must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"`{name}` must not be negative, got {n}")
    if n >= _U64:  # the native module would raise OverflowError, naming nothing
        raise ValueError(f"`{name}` is too large, got {n}")
    return n


def _number(name: str, value: Any) -> float:
    """A float argument; sd-core checks its value."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}") from None


def _from_native(array: Any) -> Any:
    """A `Float32Array` of the native module as a writable float32 numpy array."""
    import numpy as np

    return np.frombuffer(array.data, dtype="<f4").reshape(array.shape).astype(np.float32)


def _to_native(what: str, value: Any) -> Optional[Tuple[bytes, List[int]]]:
    """An optional array argument as the native module's `(float32 bytes, shape)` pair."""
    if value is None:
        return None
    array = _float32_array(what, value)
    return (array.tobytes(), list(array.shape))


def _float32_array(what: str, value: Any) -> Any:
    """`value` (a numpy array, or anything `np.asarray` takes, such as a CPU torch tensor) as a
    little-endian float32 array."""
    import numpy as np

    try:
        return np.ascontiguousarray(np.asarray(value, dtype=np.float32), dtype="<f4")
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} must be an array of numbers (on the CPU): {e}") from None


def _latents_bytes(latents: Any, shape: List[int]) -> bytes:
    """The latents a step callback goes on with, as float32 bytes, after checking the shape."""
    array = _float32_array("the latents returned by callback_on_step_end", latents)
    if list(array.shape) != list(shape):
        raise ValueError(f"callback_on_step_end returned latents of shape {list(array.shape)}, expected {list(shape)}")
    return array.tobytes()


# File suffixes of weights: a missing path with one of them is a file, not a hub id.
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _lora_scale(cross_attention_kwargs: Optional[Dict[str, Any]]) -> Optional[float]:
    """`cross_attention_kwargs["scale"]` (the only key sd_py takes), or None."""
    if not cross_attention_kwargs:
        return None
    other = sorted(set(cross_attention_kwargs) - {"scale"})
    if other:
        raise ValueError(f"sd_py supports only 'scale' in cross_attention_kwargs, got {', '.join(map(repr, other))}")
    return _number("cross_attention_kwargs['scale']", cross_attention_kwargs["scale"])


def _prompt_list(name: str, value: Any) -> List[str]:
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        prompts = list(value)
    else:
        raise ValueError(f"`{name}` has to be of type `str` or `list` of `str`, got {type(value).__name__}")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from os.fsdecode of bad bytes
            raise ValueError(f"`{name}` is not valid Unicode text: {e}") from None
    return prompts


def _seed_of(gen: Any) -> int:
    """A seed from an int or a torch.Generator (its `initial_seed()`)."""
    if isinstance(gen, bool):
        raise ValueError(f"invalid generator {gen!r}")
    try:
        seed = operator.index(gen)
    except TypeError:
        initial_seed = getattr(gen, "initial_seed", None)
        if initial_seed is None:
            raise ValueError(
                f"`generator` must be an int seed, a torch.Generator or a list of them, got {type(gen).__name__}"
            ) from None
        device = getattr(gen, "device", None)
        if device is not None and getattr(device, "type", "cpu") != "cpu":
            warnings.warn(
                "sd_py reproduces torch's CPU generator; a CUDA generator gives other noise in diffusers",
                stacklevel=4,
            )
        seed = int(initial_seed())
    # torch.manual_seed accepts [-2**63, 2**64) and maps negatives to their two's complement.
    if not -(1 << 63) <= seed < _U64:
        raise ValueError(f"seed {seed} is out of range [-2**63, 2**64)")
    return seed % _U64


def _seeds(generator: Any, batch: int) -> List[int]:
    if generator is None:
        return []
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective "
                f"batch size of {batch}. Make sure the batch size matches the length of the generators."
            )
        return [_seed_of(g) for g in generator]
    return [_seed_of(generator)]


class StableDiffusionPipeline:
    """Text-to-image with a Stable Diffusion 2.x/1.x model in diffusers' folder layout.

    Load with `from_pretrained`; call like diffusers' pipeline. Thread-safe: concurrent calls on
    one pipeline run in parallel (the GIL is released while generating) and give the same
    images as serial calls.
    """

    _native: Any  # sd_py._sd_py._Pipeline
    _name_or_path: str
    _interrupt: bool
    _lock: threading.Lock
    _scheduler: SchedulerMixin

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"use {type(self).__name__}.from_pretrained(model_id_or_path, ...)")

    @classmethod
    def _from_native(cls, native: Any, scheduler: Optional[SchedulerMixin], name_or_path: str) -> "StableDiffusionPipeline":
        cls._check_unet(native)
        self = cls.__new__(cls)
        self._native = native
        self._name_or_path = name_or_path
        self._interrupt = False
        self._lock = threading.Lock()
        if scheduler is None:
            scheduler = self._default_scheduler()
        self.scheduler = scheduler
        return self

    @classmethod
    def _check_unet(cls, native: Any) -> None:
        """Refuses a model whose UNet this class cannot run (text-to-image leaves that to sd-core,
        which refuses an inpainting UNet when called without image and mask)."""

    def _default_scheduler(self) -> SchedulerMixin:
        cls = scheduler_class(self._native.scheduler_class)
        if cls is None:  # pragma: no cover - sd-core refuses to load such a model
            raise RuntimeError(f"sd-core has no scheduler class {self._native.scheduler_class}")
        return cls.from_config(json.loads(self._native.scheduler_config))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
        scheduler: Optional[SchedulerMixin] = None,
        torch_dtype: Any = None,
        variant: Optional[str] = None,
        revision: Optional[str] = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> "StableDiffusionPipeline":
        """Loads a local diffusers folder or a hub model id (downloaded into the Hugging Face cache,
        only the files the pipeline reads).

        - `scheduler`: a scheduler object (default: the model's own class and config).
        - `torch_dtype`: torch.float32/float16/bfloat16 (torch is not needed: any object whose
          `str()` is "torch.float16" works) or "float32", "float16", "bfloat16"; default float32.
        - `variant`: weight variant ("fp16"); by default fp16 weights are used for 16-bit runs.
        - `revision`, `local_files_only` (offline: the cache only), `cache_dir`, `token`.
        - `device` (sd_py extension): load straight onto "cuda"/"cpu" instead of calling `.to()`.

        Other keyword arguments are ignored with a warning.
        """
        device = kwargs.pop("device", "cpu")
        cache_dir = kwargs.pop("cache_dir", None)
        token = kwargs.pop("token", None)
        for key in list(kwargs):
            if key in _SILENT_KWARGS and not kwargs[key]:
                del kwargs[key]
        if kwargs:
            warnings.warn(
                f"StableDiffusionPipeline.from_pretrained: ignoring unsupported argument(s) {', '.join(sorted(kwargs))}",
                stacklevel=2,
            )
        if scheduler is not None and not isinstance(scheduler, SchedulerMixin):
            raise ValueError(f"`scheduler` must be an sd_py scheduler (e.g. EulerDiscreteScheduler), got {type(scheduler).__name__}")
        if variant is not None and not isinstance(variant, str):
            raise ValueError(f"`variant` must be a string such as 'fp16', got {variant!r}")
        name = os.fsdecode(pretrained_model_name_or_path)  # str, bytes or os.PathLike
        dtype = _dtype_name(torch_dtype)
        native = _native._Pipeline.load(
            name,
            dtype=dtype,
            device=_device_name(device),
            variant=variant,
            revision=revision,
            local_files_only=bool(local_files_only),
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            token=token if isinstance(token, str) else None,
        )
        if native.dtype != dtype:
            warnings.warn(
                f"running {native.dtype} instead of {dtype}: this CPU has neither AMX nor AVX512_BF16, "
                "where bfloat16 would be emulated and slower than float32",
                stacklevel=2,
            )
        return cls._from_native(native, scheduler, name)

    @classmethod
    def from_pipe(cls, pipeline: "StableDiffusionPipeline", **kwargs: Any) -> Any:
        """diffusers' `from_pipe`: a pipeline of this class over the loaded weights of `pipeline`
        (any sd_py pipeline class; nothing is loaded again or copied), with its scheduler unless
        `scheduler=` is given. Other keyword arguments are ignored with a warning."""
        if not isinstance(pipeline, StableDiffusionPipeline):
            raise ValueError(f"`pipeline` must be an sd_py pipeline, got {type(pipeline).__name__}")
        scheduler = kwargs.pop("scheduler", None)
        if kwargs:
            warnings.warn(f"{cls.__name__}.from_pipe: ignoring unsupported argument(s) {', '.join(sorted(kwargs))}", stacklevel=2)
        return cls._from_native(pipeline._native, scheduler or pipeline.scheduler, pipeline._name_or_path)

    # ---- adapters ----

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: Any,
        token: Union[str, List[str], None] = None,
        weight_name: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """diffusers' `load_textual_inversion` for local `.safetensors` embeddings: a file, a
        folder holding `weight_name` (default `learned_embeds.safetensors`), or a list of them
        with a list of tokens. The token comes from `token`, else from the file (the key of a
        one-tensor file; A1111's `string_to_param` layout: its `name` metadata, else the file
        name); an embedding of `n` vectors adds `<tok>`, `<tok>_1`, ... `<tok>_{n-1}`, and `<tok>`
        in a prompt stands for all of them, as in diffusers. Pickle files (`.pt`, `.bin`), state
        dicts, tensors and hub ids are refused (ValueError); so is a token already in the
        vocabulary. Pipelines made with `from_pipe` share the embeddings, as they share the text
        encoder in diffusers. Other keyword arguments are ignored with a warning."""
        sources = list(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, (list, tuple)) else [pretrained_model_name_or_path]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        if len(tokens) != len(sources):
            raise ValueError(
                f"You have passed a list of models of length {len(sources)}, and list of tokens of length {len(tokens)} "
                "Make sure both lists have the same length."
            )
        if kwargs:
            warnings.warn(f"load_textual_inversion: ignoring unsupported argument(s) {', '.join(sorted(kwargs))}", stacklevel=2)
        for source, tok in zip(sources, tokens):
            if not isinstance(source, (str, os.PathLike)):
                raise ValueError(
                    f"sd_py loads textual inversion embeddings from .safetensors files, not from a {type(source).__name__}"
                )
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, weight_name or "learned_embeds.safetensors")
            self._native.load_textual_inversion(path, tok)

    # ---- placement ----

    def to(self, *args: Any, **kwargs: Any) -> "StableDiffusionPipeline":
        """Moves the pipeline to a device and/or dtype: `.to("cuda")`, `.to(torch.device("cpu"))`,
        `.to(torch.float16)`, `.to("cuda", torch.float16)`, `.to(device=..., dtype=...)`.
        Moving reloads the weights from the model folder on the new device, with the loaded
        textual inversions and LoRAs (active adapters, weights and fusing). Returns the pipeline."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            warnings.warn(f"StableDiffusionPipeline.to: ignoring {', '.join(sorted(kwargs))}", stacklevel=2)
        for arg in args:
            if arg is None:
                continue
            if isinstance(arg, int) and not isinstance(arg, bool) or _is_device_like(arg):
                if device is not None:
                    raise ValueError("`to()` got two devices")
                device = arg
            else:
                if dtype is not None:
                    raise ValueError("`to()` got two dtypes")
                dtype = arg
        new_device = self._native.device if device is None else _device_name(device)
        new_dtype = self._native.dtype if dtype is None else _dtype_name(dtype)
        if new_device == "cuda":
            new_device = "cuda:0"
        if new_device == self._native.device and new_dtype == self._native.dtype:
            return self
        with self._lock:
            self._native = self._native.reload(dtype=new_dtype, device=new_device)
        return self

    @property
    def device(self) -> _Device:
        """"cpu" or "cuda:N" (a str with torch.device's `.type` and `.index`)."""
        return _Device(self._native.device)

    @property
    def dtype(self) -> str:
        """"float32", "float16" or "bfloat16"."""
        return str(self._native.dtype)

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @property
    def config(self) -> FrozenDict:
        """The model's `model_index.json` (plus `_name_or_path`), read-only."""
        path = os.path.join(self._native.folder, "model_index.json")
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError):
            index = {}
        index["_name_or_path"] = self._name_or_path
        return FrozenDict(index)

    @property
    def vae_scale_factor(self) -> int:
        return int(self._native.vae_scale_factor)

    @property
    def default_sample_size(self) -> int:
        """The default image side in pixels (768 for SD 2.1)."""
        return int(self._native.default_size)

    @property
    def scheduler(self) -> SchedulerMixin:
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value: SchedulerMixin) -> None:
        if not isinstance(value, SchedulerMixin):
            raise ValueError(f"`scheduler` must be an sd_py scheduler (e.g. EulerDiscreteScheduler), got {type(value).__name__}")
        self._scheduler = value

    @property
    def interrupt(self) -> bool:
        """diffusers' `interrupt`: set `pipe._interrupt = True` (e.g. in `callback_on_step_end`, or from
        another thread) to end the running call(s) after the current step: as in diffusers, the
        remaining steps are skipped and the latents as they are then are decoded and returned.
        Every call resets it to False when it starts."""
        return bool(self._interrupt)

    # Memory options of diffusers that do not apply to sd-core: accepted and ignored.
    def enable_attention_slicing(self, slice_size: Any = "auto") -> None:
        pass

    def disable_attention_slicing(self) -> None:
        pass

    def enable_vae_slicing(self) -> None:
        pass

    def disable_vae_slicing(self) -> None:
        pass

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        pass

    def disable_xformers_memory_efficient_attention(self) -> None:
        pass

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        pass

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self._name_or_path!r}, device={self._native.device!r}, "
            f"dtype={self._native.dtype!r}, scheduler={type(self._scheduler).__name__})"
        )

    # ---- LoRA ----

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Union[str, "os.PathLike[str]"],
        weight_name: Optional[str] = None,
        adapter_name: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """diffusers' `load_lora_weights`: a `.safetensors` LoRA in the diffusers/PEFT or kohya
        (sd-scripts, A1111) layout, from a file, a folder (`weight_name`, default its
        `pytorch_lora_weights.safetensors` or its only `.safetensors` file) or a hub repository
        (`weight_name`, default `pytorch_lora_weights.safetensors`; `revision`, `cache_dir`,
        `local_files_only`, `token` as in `from_pretrained`). It is added as `adapter_name`
        (default `default_<n>`) and becomes the only active adapter, as in diffusers. Unfused: the
        base weights are not copied; see `fuse_lora`. ValueError: pickle files (.pt, .bin,
        .ckpt), state dicts, files that are not safetensors LoRAs, keys naming no layer of the
        model, an adapter name in use, loading while LoRAs are fused. FileNotFoundError: a missing
        file. Loading waits for the runs of this pipeline in progress.
        """
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            raise ValueError("sd_py loads LoRAs from .safetensors files, not from state dicts")
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        if kwargs:
            warnings.warn(f"load_lora_weights: ignoring unsupported argument(s) {', '.join(sorted(kwargs))}", stacklevel=2)
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError(f"sd_py loads LoRAs from .safetensors files, not from a {type(source).__name__}")
        path = os.fspath(source)
        if os.path.isdir(path):
            if weight_name is None:
                files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                weight_name = files[0] if len(files) == 1 else "pytorch_lora_weights.safetensors"
            path = os.path.join(path, weight_name)
        elif not os.path.isfile(path):
            # A missing file, not a hub id: no lookup on the hub for it.
            if weight_name is None and (os.path.isabs(path) or os.path.splitext(path)[1].lower() in _WEIGHT_SUFFIXES):
                raise FileNotFoundError(errno.ENOENT, "no such LoRA file", path)
            path = os.fspath(_native.model_file_path(path, weight_name or "pytorch_lora_weights.safetensors", **hub))
        name = adapter_name if adapter_name is not None else f"default_{len(self._native.adapter_names())}"
        self._native.load_lora(path, name)

    def set_adapters(
        self, adapter_names: Union[str, List[str]], adapter_weights: Union[float, List[Optional[float]], None] = None
    ) -> None:
        """diffusers' `set_adapters`: only these adapters run, with these weights (default 1; one
        number for all). Per-block weight dicts are not supported."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            weights: List[Optional[float]] = [adapter_weights] * len(names)
        else:
            weights = list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} adapter_weights for {len(names)} adapters")
        if any(isinstance(w, dict) for w in weights):
            raise ValueError("sd_py does not support per-block adapter weights (dicts)")
        self._native.set_adapters([(n, 1.0 if w is None else _number("adapter_weights", w)) for n, w in zip(names, weights)])

    def get_active_adapters(self) -> List[str]:
        """The active adapters' names."""
        return [name for name, _ in self._native.active_adapters()]

    def get_list_adapters(self) -> Dict[str, List[str]]:
        """The loaded adapters, by component (sd_py lists every adapter under both)."""
        names = self._native.adapter_names()
        return {"text_encoder": list(names), "unet": list(names)}

    def fuse_lora(self, components: Sequence[str] = ("text_encoder", "unet"), lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Optional[List[str]] = None, **kwargs: Any) -> None:
        """diffusers' `fuse_lora`: the active adapters, at their weights times `lora_scale`, are
        added into copies of the weights they change (faster steps); runs then ignore
        `cross_attention_kwargs["scale"]`. `unfuse_lora` restores the original weights exactly.
        Fusing some components only, `safe_fusing` and `adapter_names` are not supported."""
        if set(components) != {"text_encoder", "unet"} or safe_fusing or adapter_names is not None or kwargs:
            raise ValueError("sd_py fuses the active adapters into both the text encoder and the UNet, only")
        self._native.fuse_lora(_number("lora_scale", lora_scale))

    def unfuse_lora(self, **kwargs: Any) -> None:
        """diffusers' `unfuse_lora`: the original weights again, bit for bit."""
        self._native.unfuse_lora()

    def unload_lora_weights(self) -> None:
        """diffusers' `unload_lora_weights`: removes every adapter (fused weights stay fused until
        `unfuse_lora`, as in diffusers)."""
        self._native.unload_lora()

    def delete_adapters(self, adapter_names: Union[str, List[str]]) -> None:
        """diffusers' `delete_adapters`."""
        self._native.unload_lora([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    # ---- generation ----

    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Union[str, List[str], None] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: Any = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[..., Any]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_syntax: str = "plain",
        **kwargs: Any,
    ) -> Any:
        """Generates images, as diffusers' `StableDiffusionPipeline.__call__`.

        - `prompt`: a string or a list of strings; `negative_prompt` likewise (one per prompt).
        - `height`, `width`: multiples of 8; default the model's native size.
        - `generator`: an int seed, a `torch.Generator` (its `initial_seed()` is used), or a list
          of them, one per image. A seed gives the image of diffusers with
          `torch.Generator("cpu").manual_seed(seed)`, and of `sd-cli --seed`.
        - `output_type`: "pil" (PIL images), "np" (float32 array `[n, h, w, 3]` in [0, 1]) or
          "latent" (float32 array `[n, 4, h/8, w/8]`).
        - `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`: called after each
          step. With "latents" in `callback_on_step_end_tensor_inputs` (the default),
          `callback_kwargs["latents"]` holds the latents after that step as a writable float32
          numpy array `[n, 4, h/8, w/8]` (diffusers gives a torch tensor); the latents in the
          returned dict (or the array changed in place) are what the run goes on with. Raising
          stops the run and the exception propagates; `pipe._interrupt = True` skips the
          remaining steps and decodes the latents of this step, as diffusers does.

        - `guidance_rescale`: diffusers' rescaling of the guided prediction (0 = off).

        - `latents`: the initial noise `[n, 4, h/8, w/8]` (a numpy array, or anything `np.asarray`
          takes, such as a CPU torch tensor) instead of the one drawn from `generator`; scaled by
          the scheduler's `init_noise_sigma`, as diffusers does.

        - `prompt_embeds` (instead of `prompt`), `negative_prompt_embeds` (instead of
          `negative_prompt`): text embeddings `[prompts, tokens, hidden]` as float32 arrays (or CPU
          torch tensors), e.g. from a prompt-weighting library; with guidance and no negative
          embeddings, the negative prompts are encoded (then `prompt_embeds` must have the
          tokenizer's 77 tokens).

        - `clip_skip`: diffusers' (the output of the text encoder's layer n - clip_skip, then its
          final layer norm), applied to the prompts and the negative prompts (diffusers 0.42: to
          the prompts only).
        - `prompt_syntax` (sd_py's, not diffusers'): "plain" (default, diffusers) or "a1111":
          AUTOMATIC1111's `(word)`, `(word:1.3)`, `[word]`, `\\(` escapes, `BREAK` and prompts
          longer than 75 tokens, encoded in 77-token chunks with the weights applied to the
          embeddings (A1111's mean restoration).
        - `output_metadata=True` (ours): each PIL image's `info["parameters"]` holds its settings
          in AUTOMATIC1111's format, as sd-cli writes them into its PNGs (save with
          `PngInfo`/`pnginfo=` to keep them in a file).

        - `cross_attention_kwargs={"scale": s}`: the factor of the active unfused LoRAs, in the
          UNet and the text encoder, as diffusers (other keys: ValueError).

        Loaded `load_textual_inversion` tokens work in prompts and negative prompts.

        `timesteps`, `sigmas` and IP-adapter inputs are not supported (ValueError); other unknown
        keyword arguments are ignored with a warning.
        """
        unsupported = {
            "timesteps": timesteps,
            "sigmas": sigmas,
            "ip_adapter_image": ip_adapter_image,
            "ip_adapter_image_embeds": ip_adapter_image_embeds,
            "cross_attention_kwargs": cross_attention_kwargs or None,
        }
        given = locals()
        return self._generate(
            unsupported,
            kwargs,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            **{name: given[name] for name in _RUN_ARG_NAMES},
        )

    # -- step-level batching: runs stepped by the caller, several per UNet call --

    def start_run(
        self,
        prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: Union[str, List[str], None] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: Optional[str] = "pil",
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        prompt_syntax: str = "plain",
        **kwargs: Any,
    ) -> "_native._ActiveRun":
        """Starts a text-to-image run that the caller steps (sd_py's, not diffusers'): the
        arguments are `__call__`'s (without the step callback), checked now; the prompt is encoded
        and the initial latents drawn before this returns.

        Step runs with `step_runs` (any number of runs that share `run.batch_key`, at any step of
        any scheduler, with any guidance), then `complete_run` each one once `run.finished`. Runs
        may join and leave between steps; a run gives the images of `__call__` with the same
        arguments (within float rounding: 8-bit pixels within 1 level), however it was batched.
        The scheduler is the pipeline's when the run starts."""
        given = locals()
        run = {name: given[name] for name in _RUN_ARG_NAMES}
        args = self._run_args({"cross_attention_kwargs": cross_attention_kwargs or None}, kwargs, caller="start_run", **run)
        return self._native.start_run(args)

    def step_runs(self, runs: Sequence["_native._ActiveRun"]) -> None:
        """One denoising step of each run in `runs` (started by this pipeline, sharing a
        `batch_key`, not finished), in as few UNet calls as memory allows. A run whose own step
        fails (NaN or inf) becomes finished and `complete_run` raises its error; an error raised
        here is one of the whole step (every run of it is then unusable)."""
        self._native.step_runs(list(runs))

    def complete_run(self, run: "_native._ActiveRun", return_dict: bool = True) -> Any:
        """Decodes a run's latents and returns what `__call__` would have (steps left, if any,
        are skipped, as with `pipe._interrupt`). Raises the error of a run whose step failed."""
        return _pipeline_output(self._native.complete_run(run), run.output, return_dict)

    def _generate(
        self,
        unsupported: Dict[str, Any],
        ignored: Dict[str, Any],
        *,
        return_dict: bool,
        callback_on_step_end: Optional[Callable[..., Any]],
        callback_on_step_end_tensor_inputs: Sequence[str],
        **run: Any,
    ) -> Any:
        """The run shared by every pipeline class. `unsupported`: diffusers arguments sd_py refuses
        when given (not None); `ignored`: unknown keyword arguments (a warning); `run`: what
        `_run_args` takes."""
        self._interrupt = False
        args = self._run_args(unsupported, ignored, **run)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("`callback_on_step_end` must be callable")
        tensor_inputs = [] if callback_on_step_end_tensor_inputs is None else list(callback_on_step_end_tensor_inputs)
        not_exposed = [k for k in tensor_inputs if k != "latents"]
        if not_exposed:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only hold 'latents' in sd_py, got {', '.join(map(repr, not_exposed))}"
            )
        step_latents = callback_on_step_end is not None and "latents" in tensor_inputs

        def on_step(index: int, timestep: float, latents: Any = None) -> Tuple[str, Optional[bytes]]:
            replacement = None
            if callback_on_step_end is not None:
                kwargs: Dict[str, Any] = {}
                if latents is not None:
                    kwargs["latents"] = _from_native(latents)
                ret = callback_on_step_end(self, index, timestep, kwargs)
                if latents is not None:
                    # As diffusers' `callback_outputs.pop("latents", latents)`; an array changed in
                    # place is taken too, as a torch tensor changed in place would be.
                    chosen = ret.get("latents", kwargs["latents"]) if isinstance(ret, dict) else kwargs["latents"]
                    replacement = _latents_bytes(chosen, latents.shape)
            return ("finish" if self._interrupt else "continue", replacement)

        out = self._native.generate(args, on_step=on_step, step_latents=step_latents)
        return _pipeline_output(out, args["output"], return_dict)

    def _run_args(
        self,
        unsupported: Dict[str, Any],
        ignored: Dict[str, Any],
        *,
        prompt: Union[str, List[str], None],
        height: Optional[int],
        width: Optional[int],
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: Union[str, List[str], None],
        num_images_per_prompt: Optional[int],
        eta: float,
        generator: Any,
        latents: Any,
        prompt_embeds: Any,
        negative_prompt_embeds: Any,
        output_type: Optional[str],
        guidance_rescale: float,
        clip_skip: Optional[int],
        prompt_syntax: str,
        edit: Optional[Dict[str, Any]] = None,
        caller: str = "__call__",
    ) -> Dict[str, Any]:
        """The native run arguments (`_Pipeline.generate`'s `args`) of a diffusers-style call.
        `edit`: the native `init_images`, `mask` and `strength` arguments of image-to-image and
        inpainting; `caller`: the public method, for the warning about `ignored` arguments."""
        lora_scale = _lora_scale(unsupported.pop("cross_attention_kwargs", None))
        # Ours, taken by every pipeline class: the settings in each PIL image's `info`.
        output_metadata = bool(ignored.pop("output_metadata", False))
        given = [k for k, v in unsupported.items() if v is not None]
        if given:
            raise ValueError(f"sd_py does not support {', '.join(given)}")
        if ignored:
            warnings.warn(
                f"{type(self).__name__}.{caller}: ignoring unsupported argument(s) {', '.join(sorted(ignored))}",
                # The user's line: through `_generate` for `__call__`, directly for the others.
                stacklevel=4 if caller == "__call__" else 3,
            )
        # Values (sizes, steps, guidance, prompt counts, embedding shapes...) are checked by
        # sd-core, with the same messages as sd-cli's; here only what Python types decide.
        embeds = _to_native("prompt_embeds", prompt_embeds)
        negative_embeds = _to_native("negative_prompt_embeds", negative_prompt_embeds)
        prompts = [] if prompt is None else _prompt_list("prompt", prompt)
        n_prompts = len(prompts) if embeds is None else (embeds[1][0] if len(embeds[1]) == 3 else 0)
        negatives = None if negative_prompt is None else _prompt_list("negative_prompt", negative_prompt)
        # diffusers: a str applies to every prompt, a list must have one entry per prompt (sd-core
        # would also take a list of one for all).
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != n_prompts:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but there are {n_prompts} prompts: give one per prompt"
            )
        h = None if height is None else _count("height", height)
        w = None if width is None else _count("width", width)
        steps = _count("num_inference_steps", num_inference_steps)
        per_prompt = 1 if num_images_per_prompt is None else _count("num_images_per_prompt", num_images_per_prompt)
        guidance = _number("guidance_scale", guidance_scale)
        rescale = _number("guidance_rescale", guidance_rescale)
        seeds = _seeds(generator, n_prompts * per_prompt)
        output = "pil" if output_type is None else output_type
        if output not in ("pil", "np", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'latent', got {output_type!r}")
        initial_noise = _to_native("latents", latents)

        native = self._native
        scheduler = self._scheduler
        if not isinstance(prompt_syntax, str):
            raise ValueError(f"`prompt_syntax` must be 'plain' or 'a1111', got {prompt_syntax!r}")
        skip = None if clip_skip is None else _count("clip_skip", clip_skip)
        long_prompts_fit = prompt_syntax.lower() == "a1111"
        for p in [] if long_prompts_fit else prompts + (negatives or []):
            cut = native.truncated_text(p)
            if cut:
                logger.warning(
                    "The following part of your input was truncated because CLIP can only handle sequences up to %d tokens: %s",
                    native.max_prompt_tokens,
                    cut,
                )
        return {
            "prompts": prompts,
            "negative_prompts": negatives,
            "height": h,
            "width": w,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "num_images_per_prompt": per_prompt,
            "seeds": seeds,
            "scheduler": scheduler._class_name,
            "scheduler_config": scheduler._config_as_json(),
            "output": output,
            "guidance_rescale": rescale,
            "eta": _number("eta", eta),
            "latents": initial_noise,
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative_embeds,
            "metadata": output_metadata,
            "clip_skip": skip,
            "prompt_syntax": prompt_syntax,
            "lora_scale": lora_scale,
            **(edit or {}),
        }


def _pipeline_output(out: Any, output: str, return_dict: bool) -> Any:
    """A native run result as diffusers returns it: PIL images (with their settings text, if
    any) or a numpy array, in an output object or a tuple."""
    images: Any
    if output == "pil":
        from PIL import Image

        images = [Image.frombytes("RGB", (image.width, image.height), image.data) for image in out.images]
        for image, text in zip(images, out.infotexts):
            image.info["parameters"] = text
    else:
        images = _from_native(out.array if output == "np" else out.latents)
    result = StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None, seeds=list(out.seeds))
    if not return_dict:
        return (images, None)
    return result
