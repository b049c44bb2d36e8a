"""AUTOMATIC1111's web UI API (`/sdapi/v1`) on the Serve app (the routes are declared in
`serve.APIIngress`).

- `POST /sdapi/v1/txt2img` (JSON): `prompt`, `negative_prompt`, `steps` (default SD_DEFAULT_STEPS),
  `cfg_scale` (7.0), `width` and `height` (512), `seed` (-1 = random), `sampler_name` (A1111's
  names, e.g. "DPM++ 2M Karras", or any name sd-cli's `--scheduler` takes; default: the model's
  scheduler) with A1111's `scheduler` ("Karras"), `batch_size` x `n_iter` images with seeds seed,
  seed + 1, ... (batched), `send_images`; `override_settings` is ignored (said in `info.notes`),
  other A1111 fields are echoed and not used.
- `POST /sdapi/v1/img2img`: the same plus `init_images` (base64; the first is used; a `data:`
  URL prefix is allowed), `mask` (base64, white = repaint), `denoising_strength` (0.75). The init
  image (and mask) are resized to `width` x `height` when given, else kept at the image's size
  rounded down to a multiple of 8.
- Both answer `{"images": [base64 PNG], "parameters": {the request with its defaults},
  "info": "<JSON>"}`; info holds A1111's keys (`prompt`, `all_prompts`, `seed`, `all_seeds`,
  `sampler_name`, `infotexts`: the PNGs' `parameters` texts...).
- `GET /sdapi/v1/samplers`, `/sdapi/v1/sd-models`, `/sdapi/v1/options` (a read-only subset).

Errors are A1111's `{"error", "detail", "body", "errors"}`: 422 for bad input (413 over the upload
caps), 503 with `Retry-After` when overloaded or a replica is lost, 504 past the deadline, 500
when the generation fails.
"""

import json
import re
import time
from pathlib import PurePath
from typing import Any, Dict, List, Optional, Tuple

from fastapi import Request
from fastapi.responses import JSONResponse

from . import _serve_compat as compat
from . import _serve_jobs
from . import serve as _serve
from ._serve_metrics import serve_metrics

MAX_IMAGES = 16
TXT2IMG_DEFAULTS: Dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "seed": -1,
    "sampler_name": None,
    "scheduler": None,
    "batch_size": 1,
    "n_iter": 1,
    "steps": None,  # SD_DEFAULT_STEPS
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "override_settings": {},
    "send_images": True,
}
IMG2IMG_DEFAULTS: Dict[str, Any] = {
    **TXT2IMG_DEFAULTS,
    "width": None,  # the init image's
    "height": None,
    "init_images": None,
    "mask": None,
    "denoising_strength": 0.75,
}
_OVERRIDE_NOTE = "override_settings is ignored: this server has one model and fixed settings"


def sd_model_name() -> str:
    return PurePath(_serve.model_id()).name


def sampler_name(fields: Dict[str, Any]) -> Optional[str]:
    """The scheduler name of A1111's `sampler_name` and `scheduler` ("DPM++ 2M" + "Karras")."""
    name, schedule = fields.get("sampler_name"), fields.get("scheduler")
    for field, value in (("sampler_name", name), ("scheduler", schedule)):
        if value is not None and not isinstance(value, str):
            raise _serve.BadRequest(f"{field} must be a string")
    if name and schedule and schedule.lower() not in ("automatic", "uniform"):
        return f"{name} {schedule}"
    return name or None


def _count(fields: Dict[str, Any], field: str) -> int:
    value = fields[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _serve.BadRequest(f"{field} must be a positive integer, got {value!r}")
    return value


def _with_defaults(body: Dict[str, Any], defaults: Dict[str, Any]) -> Tuple[Dict[str, Any], int]:
    """The request with A1111's defaults filled in, and its image count (batch_size x n_iter)."""
    fields = {**defaults, **{k: v for k, v in body.items() if v is not None}}
    images = _count(fields, "batch_size") * _count(fields, "n_iter")
    if images > MAX_IMAGES:
        raise _serve.BadRequest(f"batch_size x n_iter must be at most {MAX_IMAGES}, got {images}")
    for field in ("prompt", "negative_prompt"):
        if not isinstance(fields[field], str):
            raise _serve.BadRequest(f"{field} must be a string")
    if not isinstance(fields["override_settings"], dict):
        raise _serve.BadRequest("override_settings must be a JSON object")
    return fields, images


def _run_fields(fields: Dict[str, Any]) -> Dict[str, Any]:
    seed = fields["seed"]
    return {
        "seed": None if seed == -1 else seed,
        "steps": fields["steps"],
        "guidance_scale": fields["cfg_scale"],
        "negative_prompt": fields["negative_prompt"],
        "sampler": sampler_name(fields),
    }


def validate_txt2img(body: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """`(parameters, model requests)` of a txt2img body."""
    fields, images = _with_defaults(body, TXT2IMG_DEFAULTS)
    _serve._check_prompt(fields["prompt"])
    width, height = _serve.image_side("width", fields["width"]), _serve.image_side("height", fields["height"])
    request = _serve._run_params(fields["prompt"], height, width, **_run_fields(fields))
    return {**fields, "steps": request["steps"]}, compat.with_seeds(request, images)


def validate_img2img(body: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """`(parameters, model requests)` of an img2img body (the parameters without the images, as
    A1111 answers them)."""
    fields, images = _with_defaults(body, IMG2IMG_DEFAULTS)
    init_images = fields["init_images"]
    if not isinstance(init_images, list) or not init_images:
        raise _serve.BadRequest("init_images must be a list of one or more base64 images")
    image = compat.decode_base64_image("init_images[0]", init_images[0], "RGB")
    mask = None if fields["mask"] is None else compat.decode_base64_image("mask", fields["mask"], "L")
    width, height = fields["width"], fields["height"]
    if width is not None or height is not None:
        width = _serve.image_side("width", image.width if width is None else width)
        height = _serve.image_side("height", image.height if height is None else height)
    image, mask = compat.sized(image, mask, width, height)
    run = _run_fields(fields)
    request = _serve.validate_edit_request(fields["prompt"], image, mask, fields["denoising_strength"], **run)
    sizes = {"width": request["width"], "height": request["height"], "steps": request["steps"]}
    parameters = {**fields, "init_images": None, "mask": None, **sizes}
    return parameters, compat.with_seeds(request, images)


def _infotext_value(infotext: str, key: str) -> Optional[str]:
    """The value of `key` on an infotext's settings line (its last line)."""
    found = re.search(rf"(?:^|, ){re.escape(key)}: ([^,]*)", infotext.rsplit("\n", 1)[-1])
    return found.group(1) if found else None


def info(parameters: Dict[str, Any], requests: List[Dict[str, Any]], pngs: List[bytes]) -> Dict[str, Any]:
    """A1111's `info` of a generation (what its `Processed.js()` writes)."""
    infotexts = [compat.png_parameters(png) for png in pngs]
    first = requests[0]
    sampler = parameters["sampler_name"] or _infotext_value(infotexts[0], "Sampler")
    result = {
        "prompt": first["prompt"],
        "all_prompts": [r["prompt"] for r in requests],
        "negative_prompt": first["negative_prompt"] or "",
        "all_negative_prompts": [r["negative_prompt"] or "" for r in requests],
        "seed": first["seed"],
        "all_seeds": [r["seed"] for r in requests],
        "subseed": -1,
        "all_subseeds": [-1] * len(requests),
        "subseed_strength": 0,
        "width": first["width"],
        "height": first["height"],
        "sampler_name": sampler,
        "cfg_scale": first["guidance_scale"],
        "steps": first["steps"],
        "batch_size": parameters["batch_size"],
        "n_iter": parameters["n_iter"],
        "denoising_strength": first.get("strength"),
        "restore_faces": False,
        "sd_model_name": sd_model_name(),
        "sd_model_hash": _infotext_value(infotexts[0], "Model hash"),
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": first.get("mask") is not None,
        "version": "sd_py",
    }
    if parameters["override_settings"]:
        result["notes"] = [_OVERRIDE_NOTE]
    return result


def error_response(e: Exception) -> JSONResponse:
    """A1111's error body with the status of `/imagine`'s answer to the same failure (503 with
    `Retry-After`), counted in the failure metric."""
    serve_metrics().failed(_serve.failure_kind(e))
    message = str(e)
    status = getattr(e, "status_code", 500)
    body = {"error": type(e).__name__, "detail": message, "body": "", "errors": message}
    headers = {"Retry-After": str(_serve.RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _generate(http_request: Request, ingress: Any, img2img: bool) -> JSONResponse:
    try:
        body = await compat.read_json(http_request, images=2 if img2img else 0)
        parameters, requests = (validate_img2img if img2img else validate_txt2img)(body)
        if parameters["override_settings"]:
            _serve.logger.info("%s: %s (%s)", http_request.url.path, _OVERRIDE_NOTE, sorted(parameters["override_settings"]))
        remote = ingress.handle.edit_png.remote if img2img else ingress.handle.generate_png.remote
        # Entered in the job store while it runs: /sdapi/v1/progress and /interrupt see it.
        pngs = await _serve_jobs.tracked_pngs(ingress, "img2img" if img2img else "txt2img", remote, requests)
    except (_serve.BadRequest, _serve.ModelError) as e:
        return error_response(e)
    images = [compat.b64_png(png) for png in pngs] if parameters["send_images"] else []
    result = {"images": images, "parameters": parameters, "info": json.dumps(info(parameters, requests, pngs))}
    return JSONResponse(result)


async def txt2img(http_request: Request, ingress: Any) -> JSONResponse:
    return await _generate(http_request, ingress, img2img=False)


async def img2img(http_request: Request, ingress: Any) -> JSONResponse:
    return await _generate(http_request, ingress, img2img=True)


def samplers(scheduler_names: List[Tuple[str, str, str]]) -> List[Dict[str, Any]]:
    """A1111's sampler list from the model's `(name, class name, overrides)` triples: one entry
    per distinct scheduler, named by its A1111 name (else its first short name)."""
    groups: Dict[Tuple[str, str], List[str]] = {}
    for name, class_name, overrides in scheduler_names:
        groups.setdefault((class_name, overrides), []).append(name)
    entries = []
    for (class_name, overrides), names in groups.items():
        # sd-core's names: the class name, lowercase short names, A1111's (capitalised).
        short = [n for n in names if n == n.lower()]
        a1111 = [n for n in names if n != class_name and n not in short]
        title = (a1111 + short + [class_name])[0]
        options = {"scheduler_class": class_name, **json.loads(overrides)}
        entries.append({"name": title, "aliases": [n for n in names if n != title], "options": options})
    return entries


def sd_models() -> List[Dict[str, Any]]:
    name = sd_model_name()
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": _serve.model_id(), "config": None}]


def options() -> Dict[str, Any]:
    """The settings A1111 clients read most, as this server has them (read-only)."""
    return {
        "sd_model_checkpoint": sd_model_name(),
        "samples_format": "png",
        "enable_pnginfo": _serve.PNG_METADATA,
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
    }
