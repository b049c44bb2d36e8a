"""The custom metrics of `sd_py.serve`, exported by Ray with its own on each node's Prometheus
endpoint (`ray start --metrics-export-port`; Ray prefixes the names with `ray_`). Ray Serve adds
the `deployment`, `replica` and `application` tags to each."""

import functools
import os
from typing import Optional

from ray.serve.metrics import Counter, Gauge, Histogram

# The `kind` tag of `sd_failures`: how a request that got no image ended.
FAILURE_KINDS = (
    "bad_request",  # 422 / 413: invalid parameters or upload
    "overloaded",  # 503: the model's queue (SD_MAX_QUEUED_REQUESTS) is full
    "replica_unavailable",  # 503: the model replica died or is gone
    "deadline",  # 504: no image within SD_REQUEST_TIMEOUT_S
    "client_gone",  # the client hung up before the answer
    "non_finite",  # 500: the run's values went NaN or inf
    "error",  # 500: any other failure
)


class ServeMetrics:
    """One process's metrics (plain attributes, `ray.serve.metrics` objects)."""

    def __init__(self) -> None:
        self.queued_requests = Gauge(
            "sd_queued_requests",
            description="Requests a model replica holds that wait for their pipeline call.",
        )
        self.active_batch_size = Gauge(
            "sd_active_batch_size",
            description="Images in the pipeline calls a model replica is running (0 when idle).",
        )
        self.step_seconds = Histogram(
            "sd_step_seconds",
            description="Wall time of one denoising step of a pipeline call (its whole batch).",
            boundaries=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
        )
        self.images = Counter(
            "sd_images", description="Images generated (images/s: its rate)."
        )
        self.failures = Counter(
            "sd_failures",
            description=f"Requests answered without an image, by kind: {', '.join(FAILURE_KINDS)}.",
            tag_keys=("kind",),
        )
        self.non_finite_outputs = Counter(
            "sd_non_finite_outputs",
            description="Pipeline calls whose values went NaN or inf (FloatingPointError).",
        )

    def failed(self, kind: str) -> None:
        assert kind in FAILURE_KINDS, kind
        self.failures.inc(tags={"kind": kind})


@functools.lru_cache(maxsize=None)
def serve_metrics() -> ServeMetrics:
    """This process's metrics, made on first use: the deployments' constructors call it, so
    that Ray Serve tags them with the replica."""
    return ServeMetrics()


def resident_bytes() -> Optional[int]:
    """This process's resident memory (Linux `/proc`; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
