"""Ray Serve: the blueprint's app with sd_py dropped in, and the packaged `sd_py.serve` app, each
run by a real local Ray Serve over HTTP against the sd2-tiny fixture model."""

import io
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import SD2, pixels

pytestmark = pytest.mark.ray

# The blueprint's ray_serve_sd.py (ai-on-eks, blueprints/inference/stable-diffusion-rayserve-gpu),
# unchanged except for the marked lines: sd_py instead of diffusers, no GPU, "cpu" for "cuda".
BLUEPRINT_APP = textwrap.dedent(
    '''
    from io import BytesIO
    from fastapi import FastAPI
    from fastapi.responses import Response
    import os

    from ray import serve

    app = FastAPI()


    @serve.deployment(num_replicas=1)
    @serve.ingress(app)
    class APIIngress:
        def __init__(self, diffusion_model_handle) -> None:
            self.handle = diffusion_model_handle

        @app.get(
            "/imagine",
            responses={200: {"content": {"image/png": {}}}},
            response_class=Response,
        )
        async def generate(self, prompt: str, img_size: int = 768):
            assert len(prompt), "prompt parameter cannot be empty"

            image = await self.handle.generate.remote(prompt, img_size=img_size)
            file_stream = BytesIO()
            image.save(file_stream, "PNG")
            return Response(content=file_stream.getvalue(), media_type="image/png")


    @serve.deployment(
        name="stable-diffusion-v2",
        ray_actor_options={"num_gpus": 0},  # changed: the blueprint asks for 1 GPU
        autoscaling_config={"min_replicas": 1, "max_replicas": 2},
    )
    class StableDiffusionV2:
        def __init__(self):
            from sd_py import EulerDiscreteScheduler, StableDiffusionPipeline  # changed: was diffusers

            model_id = os.getenv("MODEL_ID")

            scheduler = EulerDiscreteScheduler.from_pretrained(
                model_id, subfolder="scheduler"
            )
            self.pipe = StableDiffusionPipeline.from_pretrained(
                model_id, scheduler=scheduler
            )
            self.pipe = self.pipe.to("cpu")  # changed: was "cuda"

        def generate(self, prompt: str, img_size: int = 768):
            assert len(prompt), "prompt parameter cannot be empty"

            image = self.pipe(prompt, height=img_size, width=img_size).images[0]
            return image


    entrypoint = APIIngress.bind(StableDiffusionV2.bind())
    '''
)


def _wait_ready(base_url: str, path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(base_url + path, timeout=30)
            if r.status_code < 500 and r.status_code != 404:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            last = repr(e)
        time.sleep(0.5)
    raise AssertionError(f"{base_url}{path} not ready after {timeout}s: {last}")


def _png(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == "PNG"
    return image


def test_blueprint_app_with_sd_py_dropped_in(ray_cluster):
    """The blueprint's code, with sd_py's classes imported instead of diffusers', serves
    `GET /imagine` under Ray Serve."""
    from ray import serve
    import importlib

    base_url, app_dir = ray_cluster
    (app_dir / "ray_serve_sd.py").write_text(BLUEPRINT_APP)
    module = importlib.import_module("ray_serve_sd")
    serve.run(module.entrypoint, name="blueprint", route_prefix="/")
    try:
        r = requests.get(f"{base_url}/imagine", params={"prompt": "a photograph of an astronaut riding a horse", "img_size": 64}, timeout=180)
        image = _png(r)
        assert image.size == (64, 64)
        assert image.mode == "RGB"
        # A real image, not a blank one.
        assert pixels(image).std() > 1.0
    finally:
        serve.delete("blueprint")


@pytest.fixture(scope="module")
def sd_serve(ray_cluster):
    """The packaged app `sd_py.serve:entrypoint`, as a Serve config's import_path names it."""
    from ray import serve
    from ray.serve._private.utils import import_attr

    base_url, _ = ray_cluster
    entrypoint = import_attr("sd_py.serve:entrypoint")
    serve.run(entrypoint, name="sd-py", route_prefix="/")
    _wait_ready(base_url, "/healthz")
    yield base_url
    serve.delete("sd-py")


def test_serve_answers_png_of_requested_size(sd_serve):
    r = requests.get(f"{sd_serve}/imagine", params={"prompt": "a red cube on a table", "img_size": 64, "steps": 3}, timeout=180)
    image = _png(r)
    assert image.size == (64, 64)
    assert int(r.headers["x-seed"]) >= 0
    r = requests.get(f"{sd_serve}/imagine", params={"prompt": "a red cube on a table", "img_size": 96, "steps": 2}, timeout=180)
    assert _png(r).size == (96, 96)


def test_serve_seed_gives_the_pipeline_image(sd_serve, sd2_path):
    """A seeded request gives exactly the image of a direct sd_py call with that seed (same
    defaults as diffusers: the model's scheduler, guidance 7.5)."""
    from sd_py import StableDiffusionPipeline

    params = {"prompt": "a lighthouse at dusk", "img_size": 64, "steps": 4, "seed": 1234, "negative_prompt": "blurry"}
    served = _png(requests.get(f"{sd_serve}/imagine", params=params, timeout=180))
    pipe = StableDiffusionPipeline.from_pretrained(sd2_path)
    direct = pipe("a lighthouse at dusk", negative_prompt="blurry", height=64, width=64, num_inference_steps=4, generator=1234).images[0]
    assert np.array_equal(pixels(served), pixels(direct))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"prompt": "", "img_size": 64}, "prompt"),
        ({"prompt": "   ", "img_size": 64}, "prompt"),
        ({"img_size": 64}, "prompt"),
        ({"prompt": "cat", "img_size": 65}, "multiple of 8"),
        ({"prompt": "cat", "img_size": 32}, "between 64 and 2048"),
        ({"prompt": "cat", "img_size": 4096}, "between 64 and 2048"),
        ({"prompt": "cat", "img_size": "big"}, "img_size"),
        ({"prompt": "cat", "img_size": 64, "steps": 0}, "steps"),
        ({"prompt": "cat", "img_size": 64, "steps": 100000}, "steps"),
        ({"prompt": "cat", "img_size": 64, "guidance_scale": "nan"}, "guidance_scale"),
        ({"prompt": "cat", "img_size": 64, "guidance_scale": 1000}, "guidance_scale"),
        ({"prompt": "cat", "img_size": 64, "seed": -1}, "seed"),
    ],
)
def test_serve_rejects_bad_input_with_4xx(sd_serve, params, message):
    r = requests.get(f"{sd_serve}/imagine", params=params, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert message in r.text


def test_serve_stays_up_after_bad_requests(sd_serve):
    for params in ({"prompt": ""}, {"prompt": "x", "img_size": 7}, {"prompt": "x", "img_size": 64, "steps": -3}):
        assert requests.get(f"{sd_serve}/imagine", params=params, timeout=60).status_code in (400, 422)
    health = requests.get(f"{sd_serve}/healthz", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    r = requests.get(f"{sd_serve}/imagine", params={"prompt": "still here", "img_size": 64, "steps": 2}, timeout=180)
    assert _png(r).size == (64, 64)


def test_serve_healthz(sd_serve):
    r = requests.get(f"{sd_serve}/healthz", timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["model"] == str(SD2)
    assert body["device"] == "cpu"


def test_serve_batches_compatible_requests(sd_serve):
    """Concurrent requests with the same size/steps/guidance become one pipeline call, and each
    image is the one its seed gives alone."""
    before = requests.get(f"{sd_serve}/healthz", timeout=60).json()
    prompts = ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]
    seeds = [11, 22, 33, 44]

    def call(i):
        params = {"prompt": prompts[i], "img_size": 64, "steps": 3, "seed": seeds[i]}
        return requests.get(f"{sd_serve}/imagine", params=params, timeout=180)

    with ThreadPoolExecutor(len(prompts)) as ex:
        responses = list(ex.map(call, range(len(prompts))))
    images = [_png(r) for r in responses]
    after = requests.get(f"{sd_serve}/healthz", timeout=60).json()
    assert after["images"] - before["images"] == len(prompts)
    assert after["pipeline_calls"] - before["pipeline_calls"] < len(prompts), (before, after)
    assert after["largest_batch"] >= 2

    from sd_py import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SD2))
    for prompt, seed, image in zip(prompts, seeds, images):
        alone = pipe(prompt, height=64, width=64, num_inference_steps=3, generator=seed).images[0]
        diff = np.abs(pixels(image) - pixels(alone))
        assert diff.max() <= 1, (prompt, diff.max())
