"""What the OpenAI and AUTOMATIC1111 routes of the Serve app share: JSON bodies within the upload
caps, base64 images, sized edit inputs and the seeds of a request for several images."""

import base64
import binascii
import json
from typing import Any, Dict, List, Optional, Tuple

from fastapi import Request

from . import serve as _serve

# Room for the fields of a JSON body besides its base64 images (init image and mask).
_JSON_OVERHEAD_BYTES = 1024 * 1024


async def read_json(http_request: Request, images: int) -> Dict[str, Any]:
    """The JSON object of a request body that may hold `images` base64 images within the upload
    caps (larger bodies are refused before they are read)."""
    limit = images * (_serve.MAX_UPLOAD_BYTES * 4 // 3 + 4) + _JSON_OVERHEAD_BYTES
    length = http_request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _serve.PayloadTooLarge(f"the request body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in http_request.stream():  # a body without a length stops at the limit too
        size += len(chunk)
        if size > limit:
            raise _serve.PayloadTooLarge(f"the request body is over {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        value = json.loads(body)
    except ValueError as e:
        raise _serve.BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise _serve.BadRequest("the body must be a JSON object")
    return value


def decode_base64_image(what: str, data: Any, mode: str) -> Any:
    """A base64 image (a `data:image/...;base64,` prefix is allowed) as a PIL image in `mode`,
    with the caps and checks of `serve.decode_upload`."""
    if not isinstance(data, str):
        raise _serve.BadRequest(f"{what} must be a base64 string")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    if len(data) > _serve.MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise _serve.PayloadTooLarge(f"{what} is over {_serve.MAX_UPLOAD_BYTES} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _serve.BadRequest(f"{what} is not valid base64") from None
    return _serve.decode_upload(what, raw, mode)


def sized(image: Any, mask: Optional[Any], width: Optional[int], height: Optional[int]) -> Tuple[Any, Optional[Any]]:
    """The edit inputs resized to `width` x `height` when asked (Lanczos, as diffusers resizes an
    init image). A mask of another size than the image is left for `validate_edit_request` to
    refuse."""
    if width is None or height is None or image.size == (width, height):
        return image, mask
    from PIL import Image

    if mask is not None and mask.size == image.size:
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    return image.resize((width, height), Image.Resampling.LANCZOS), mask


def with_seeds(request: Dict[str, Any], count: int) -> List[Dict[str, Any]]:
    """`count` copies of `request` with seeds seed, seed + 1, ... (as AUTOMATIC1111 numbers the
    images of a batch), to be sent together so that the model deployment batches them."""
    if request["seed"] + count > 2**64:
        raise _serve.BadRequest(f"seed + {count - 1} must be below 2**64, got seed {request['seed']}")
    return [{**request, "seed": request["seed"] + i} for i in range(count)]


def b64_png(png: bytes) -> str:
    """A PNG of the model as a route answers it (`serve.answered_png`), in base64."""
    return base64.b64encode(_serve.answered_png(png)).decode("ascii")


def png_parameters(png: bytes) -> str:
    """The `parameters` text of a PNG the model answered ("" when it has none)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return str(image.info.get("parameters", ""))
