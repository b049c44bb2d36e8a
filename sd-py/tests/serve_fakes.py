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
