"""OpenAI's images API on the Serve app (the routes are declared in `serve.APIIngress`).

- `POST /v1/images/generations` (JSON): `prompt`, `n` (1..10), `size` ("WxH", default
  "768x768"), `response_format` (`b64_json` only: no URLs are served), `model` and `user`
  (accepted, not used: one model is served); ours: `negative_prompt`, `seed`, `steps`,
  `guidance_scale`, `sampler` (a scheduler name, A1111's included) -> `{"created", "data":
  [{"b64_json"}]}`. The n images have seeds seed, seed + 1, ... and are batched.
- `POST /v1/images/edits` (multipart): `image`, optional `mask` (OpenAI's: transparent pixels are
  repainted; an opaque mask is read as white = repaint), `prompt`, `n`, `size` (the inputs are
  resized to it; default: the image's size rounded down to 8) and the fields above, plus ours
  `strength`: image-to-image, or inpainting with a mask.
- `GET /v1/models`: the served model.

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with the route's status:
400 `invalid_request_error` (413 for uploads over the caps), 503 (`overloaded` or
`replica_unavailable`, with `Retry-After`) and 504 (`deadline`) `server_error` as `/imagine`
answers them, 500 `server_error` when the generation fails. Each counts in the failure metric.
"""

import time
from typing import Any, Dict, List, Optional, Tuple

from fastapi import Request
from fastapi.responses import JSONResponse

from . import _serve_compat as compat
from . import serve as _serve
from ._serve_metrics import serve_metrics

MAX_IMAGES = 10
DEFAULT_SIZE = "768x768"
_RESPONSE_FORMATS = ("b64_json", "url")


class OpenAIError(Exception):
    """An error in OpenAI's shape; `kind` is the failure metric's."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "bad_request",
    ) -> None:
        super().__init__(message)
        self.status_code, self.param, self.code, self.kind = status_code, param, code, kind

    def response(self) -> JSONResponse:
        """The answer, counted in the failure metric; a 503 says when to try again."""
        serve_metrics().failed(self.kind)
        error_type = "server_error" if self.status_code >= 500 else "invalid_request_error"
        error = {"message": str(self), "type": error_type, "param": self.param, "code": self.code}
        headers = {"Retry-After": str(_serve.RETRY_AFTER_S)} if self.status_code == 503 else None
        return JSONResponse({"error": error}, status_code=self.status_code, headers=headers)


def parse_size(size: Any) -> Tuple[int, int]:
    """OpenAI's "WxH" as (width, height), each side as `/imagine`'s `img_size`."""
    parts = str(size).lower().split("x")
    if not isinstance(size, str) or len(parts) != 2:
        raise OpenAIError(f"size must be 'WIDTHxHEIGHT', e.g. '{DEFAULT_SIZE}', got {size!r}", param="size")
    try:
        return _serve.image_side("width", parts[0]), _serve.image_side("height", parts[1])
    except _serve.BadRequest as e:
        raise OpenAIError(f"size: {e}", param="size") from None


def check_options(fields: Dict[str, Any]) -> int:
    """Checks the fields both routes share outside the run parameters; returns `n`."""
    response_format = fields.get("response_format") or "b64_json"
    if response_format not in _RESPONSE_FORMATS:
        raise OpenAIError(f"response_format must be one of {', '.join(_RESPONSE_FORMATS)}, got {response_format!r}", param="response_format")
    if response_format == "url":
        message = "response_format 'url' is not supported by this server (no image URLs are served): use 'b64_json'"
        raise OpenAIError(message, param="response_format", code="unsupported_value")
    n = fields.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, (int, str)) or not str(n).isdigit() or not 1 <= int(n) <= MAX_IMAGES:
        raise OpenAIError(f"n must be an integer from 1 to {MAX_IMAGES}, got {n!r}", param="n")
    for field in ("model", "user", "prompt", "negative_prompt", "sampler"):
        if fields.get(field) is not None and not isinstance(fields[field], str):
            raise OpenAIError(f"{field} must be a string", param=field)
    return int(n)


_RUN_FIELDS = ("seed", "steps", "guidance_scale", "negative_prompt", "sampler")
_PARAMS = frozenset(("prompt", "image", "mask", "strength", *_RUN_FIELDS))


def _run_fields(fields: Dict[str, Any]) -> Dict[str, Any]:
    return {f: fields.get(f) for f in _RUN_FIELDS}


def validate_generation(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The model requests of a `/v1/images/generations` body: n, with consecutive seeds."""
    n = check_options(body)
    width, height = parse_size(body.get("size") or DEFAULT_SIZE)
    _serve._check_prompt(body.get("prompt"))
    request = _serve._run_params(body.get("prompt"), height, width, **_run_fields(body))
    return compat.with_seeds(request, n)


def openai_mask(mask: Any) -> Any:
    """An OpenAI edit mask (RGBA: transparent = repaint) as the pipeline's (L: white = repaint); a
    mask without transparency is read as the pipeline's (white = repaint)."""
    from PIL import ImageOps

    alpha = mask.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return mask.convert("L")
    return ImageOps.invert(alpha)


def validate_edit(fields: Dict[str, Any], image: Any, mask: Optional[Any]) -> List[Dict[str, Any]]:
    """The model requests of a `/v1/images/edits` form (`image` RGB, `mask` as `openai_mask`)."""
    n = check_options(fields)
    width, height = parse_size(fields["size"]) if fields.get("size") else (None, None)
    image, mask = compat.sized(image, mask, width, height)
    request = _serve.validate_edit_request(fields.get("prompt"), image, mask, fields.get("strength"), **_run_fields(fields))
    return compat.with_seeds(request, n)


def images_response(pngs: List[bytes]) -> Dict[str, Any]:
    return {"created": int(time.time()), "data": [{"b64_json": compat.b64_png(png)} for png in pngs]}


def as_openai_error(e: Exception) -> OpenAIError:
    """A refusal of the shared validation or a model error in OpenAI's shape."""
    if isinstance(e, OpenAIError):
        return e
    status = getattr(e, "status_code", 500)
    kind = _serve.failure_kind(e)
    # OpenAI's codes for these; the others have none.
    code = {"overloaded": "rate_limit_exceeded", "deadline": "timeout"}.get(kind)
    # The shared messages start with the field they refuse ("steps must be ...").
    field = str(e).split(" ", 1)[0]
    param = field if kind == "bad_request" and field in _PARAMS else None
    return OpenAIError(str(e), status_code=400 if status == 422 else status, param=param, code=code, kind=kind)


async def generations(http_request: Request, ingress: Any) -> JSONResponse:
    try:
        body = await compat.read_json(http_request, images=0)
        requests = validate_generation(body)
        pngs = await _serve.model_pngs(ingress.handle.generate_png.remote, requests)
    except (OpenAIError, _serve.BadRequest, _serve.ModelError) as e:
        return as_openai_error(e).response()
    return JSONResponse(images_response(pngs))


_EDIT_FIELDS = ("prompt", "n", "size", "response_format", "model", "user", "strength", *_RUN_FIELDS)


async def edits(http_request: Request, ingress: Any) -> JSONResponse:
    try:
        form = await _serve.read_form(http_request, files=2)
        try:
            image = _serve.decode_upload("image", await _serve._read_upload(form, "image"), "RGB")
            mask = None
            if form.get("mask") is not None:
                mask = openai_mask(_serve.decode_upload("mask", await _serve._read_upload(form, "mask"), "RGBA"))
            fields = {f: _serve._form_field(form, f) for f in _EDIT_FIELDS}
        finally:
            await form.close()
        requests = validate_edit(fields, image, mask)
        pngs = await _serve.model_pngs(ingress.handle.edit_png.remote, requests)
    except (OpenAIError, _serve.BadRequest, _serve.ModelError) as e:
        return as_openai_error(e).response()
    return JSONResponse(images_response(pngs))


def models() -> Dict[str, Any]:
    model = {"id": _serve.model_id(), "object": "model", "created": 0, "owned_by": "sd_py"}
    return {"object": "list", "data": [model]}
