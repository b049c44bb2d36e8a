"""A Serve ingress without Ray: the real `APIIngress` class over a fake model handle, and a small
FastAPI app routing to the OpenAI and A1111 modules as `sd_py.serve` does."""

import asyncio
import io
from types import SimpleNamespace
from typing import Any, Dict, List

from fastapi import FastAPI, Request
from PIL import Image

from sd_py import _serve_a1111, _serve_openai, serve


class FakeModel:
    """`generate_png` / `edit_png` answering a PNG of the request's size whose `parameters` text
    names its settings, as the model replica's do; `fail` makes them raise it."""

    def __init__(self) -> None:
        self.requests: List[Dict[str, Any]] = []
        self.fail: Any = None
        self.delay_s = 0.0
        remote = SimpleNamespace
        self.handle = SimpleNamespace(generate_png=remote(remote=self._png), edit_png=remote(remote=self._png))

    async def _png(self, r: Dict[str, Any]) -> bytes:
        self.requests.append(r)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        image = Image.new("RGB", (r["width"], r["height"]), (r["seed"] % 256, 0, 0))
        sampler = r.get("sampler") or "DDIM"
        image.info["parameters"] = (
            f"{r['prompt']}\nSteps: {r['steps']}, Sampler: {sampler}, CFG scale: {r['guidance_scale']}, "
            f"Seed: {r['seed']}, Size: {r['width']}x{r['height']}, Model hash: 0123abcd, Model: sd2-tiny"
        )
        return serve._png(image)


def app_with(model: FakeModel) -> FastAPI:
    # The class as written (Serve's ASGI wrapper derives from it).
    ingress = serve.APIIngress.func_or_class.__mro__[1](model.handle)
    app = FastAPI()

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await _serve_openai.generations(request, ingress)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        return await _serve_openai.edits(request, ingress)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await _serve_a1111.txt2img(request, ingress)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await _serve_a1111.img2img(request, ingress)

    return app


def png_bytes(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


# JSON Schemas of AUTOMATIC1111's answers (its `modules/api/models.py`: TextToImageResponse,
# ImageToImageResponse, SamplerItem, SDModelItem; `info` is `Processed.js()`), checked with
# `jsonschema` (a dependency of Ray).
A1111_IMAGES_RESPONSE = {
    "type": "object",
    "required": ["images", "parameters", "info"],
    "additionalProperties": False,
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "parameters": {"type": "object"},
        "info": {"type": "string"},
    },
}
A1111_INFO = {
    "type": "object",
    "required": [
        "prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "width", "height",
        "sampler_name", "cfg_scale", "steps", "batch_size", "sd_model_name", "infotexts",
    ],
    "properties": {
        "prompt": {"type": "string"},
        "all_prompts": {"type": "array", "items": {"type": "string"}},
        "negative_prompt": {"type": "string"},
        "all_negative_prompts": {"type": "array", "items": {"type": "string"}},
        "seed": {"type": "integer", "minimum": 0},
        "all_seeds": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "sampler_name": {"type": "string"},
        "cfg_scale": {"type": "number"},
        "steps": {"type": "integer", "minimum": 1},
        "batch_size": {"type": "integer", "minimum": 1},
        "n_iter": {"type": "integer", "minimum": 1},
        "denoising_strength": {"type": ["number", "null"]},
        "sd_model_name": {"type": "string"},
        "sd_model_hash": {"type": ["string", "null"]},
        "infotexts": {"type": "array", "items": {"type": "string"}},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}
A1111_SAMPLERS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["name", "aliases", "options"],
        "additionalProperties": False,
        "properties": {"name": {"type": "string"}, "aliases": {"type": "array", "items": {"type": "string"}}, "options": {"type": "object"}},
    },
}
A1111_SD_MODELS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["title", "model_name", "hash", "sha256", "filename", "config"],
        "properties": {"title": {"type": "string"}, "model_name": {"type": "string"}, "filename": {"type": "string"}},
    },
}
A1111_OPTIONS = {
    "type": "object",
    "required": ["sd_model_checkpoint", "samples_format", "enable_pnginfo"],
    "properties": {"sd_model_checkpoint": {"type": "string"}, "samples_format": {"const": "png"}, "enable_pnginfo": {"type": "boolean"}},
}


def check_a1111_response(body: Dict[str, Any], images: int) -> Dict[str, Any]:
    """Validates A1111's txt2img/img2img answer and its `info`; returns the parsed info."""
    import json

    import jsonschema

    jsonschema.validate(body, A1111_IMAGES_RESPONSE)
    info = json.loads(body["info"])
    jsonschema.validate(info, A1111_INFO)
    assert len(body["images"]) == len(info["all_seeds"]) == len(info["all_prompts"]) == len(info["infotexts"]) == images
    return info
