"""Shared fixtures of the sd_py tests: fixture model paths, a loaded pipeline, a local Ray cluster."""

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "tests" / "fixtures" / "pipelines"
SD2 = PIPELINES / "sd2-tiny"
SD1 = PIPELINES / "sd1-tiny"
DEPLOY = REPO / "deploy"

# Keep Gradio and Ray quiet and offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_case(name: str) -> dict:
    return json.loads((PIPELINES / f"{name}.json").read_text())


def read_safetensors(path: Path) -> dict:
    """A minimal safetensors reader (float32/int64 only), so the tests need no extra package."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    dtypes = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in dtypes:
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(body[a:b], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def fill_with_nan(path, name):
    """Overwrites the float32 tensor `name` of a safetensors file with NaN, in place."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    data[8 + n + begin : 8 + n + end] = np.full((end - begin) // 4, np.nan, dtype=np.float32).tobytes()
    path.write_bytes(bytes(data))


def sd_cli_binary() -> Path:
    """The sd-cli binary `cargo test --workspace` built (built here if it is missing or older than
    the sources, so that it runs the same sd-core as the wheel)."""
    if os.environ.get("SD_CLI"):
        return Path(os.environ["SD_CLI"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    binary = target / "debug" / "sd-cli"
    sources = [p for d in ("sd-core/src", "sd-cli/src") for p in (REPO / d).rglob("*") if p.is_file()]
    newest = max((p.stat().st_mtime for p in sources), default=0.0)
    if not binary.exists() or binary.stat().st_mtime < newest:
        subprocess.run(["cargo", "build", "-p", "sd-cli"], cwd=REPO, check=True)
    return binary


def sd_cli_env(tmp_path: Path) -> dict:
    """A minimal environment for an sd-cli run (offline, its own hub cache) with this process's
    `SD_*` settings: sd_py sets `SD_MKL_LIB` when it finds MKL, and sd-cli must run the same GEMM
    backend for its pixels to equal sd_py's bit for bit (MKL and the builtin GEMM round
    differently)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("SD_")}
    return {**env, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "cache")}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="session")
def sd2_path() -> str:
    return str(SD2)


@pytest.fixture(scope="session")
def pipe():
    """The sd2-tiny pipeline on the CPU in float32 (its default DDIM scheduler)."""
    from sd_py import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(SD2))


# Where the Ray cluster of `ray_cluster` exports its Prometheus metrics (on 127.0.0.1).
RAY_METRICS_PORT = free_port()


def replica_without_ray(pipe):
    """A model replica's object (`sd_py.serve.StableDiffusionV2`) around `pipe`, built without Ray
    or its `__init__` (no model load, no gauge thread), with its step scheduler."""
    import threading

    import sd_py.serve as s
    from sd_py._serve_jobs import ProgressReporter
    from sd_py._serve_steps import StepScheduler

    m = object.__new__(s.StableDiffusionV2.func_or_class)
    m.pipe = pipe
    m._stats_lock = threading.Lock()
    m.stats = {"requests": 0, "pipeline_calls": 0, "images": 0, "largest_batch": 0, "failures": 0, "stopped_calls": 0}
    m._consecutive_failures = 0
    m._last_error = None
    m._queued = m._running_images = 0
    m._progress = ProgressReporter()
    m._steps = StepScheduler(m, 4, s._png)
    return m


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A small local Ray cluster with Serve on 127.0.0.1:<free port>, shared by the Ray tests.

    Yields `(base_url, app_dir)`: modules written into `app_dir` can be imported by the replicas.
    """
    ray = pytest.importorskip("ray")
    from ray import serve

    app_dir = tmp_path_factory.mktemp("serve_apps")
    sys.path.insert(0, str(app_dir))
    port = free_port()
    env = {
        "MODEL_ID": str(SD2),
        "PYTHONPATH": os.pathsep.join([str(app_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "SD_BATCH_WAIT_S": os.environ["SD_BATCH_WAIT_S"],
        "SD_DEFAULT_STEPS": os.environ["SD_DEFAULT_STEPS"],
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=128 * 1024 * 1024,
        runtime_env={"env_vars": env},
        logging_level="WARNING",
        log_to_driver=True,
        _metrics_export_port=RAY_METRICS_PORT,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}", app_dir
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            sys.path.remove(str(app_dir))


# sd_py.serve reads these when imported, in this process and in the replicas (through the Ray
# fixture's runtime_env): wait long enough for concurrent test requests to form one batch, and
# keep the default step count small for the tiny model.
os.environ.setdefault("SD_BATCH_WAIT_S", "1.0")
os.environ.setdefault("SD_DEFAULT_STEPS", "10")
