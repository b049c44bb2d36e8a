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
    """Concurrent requests of the same size share their UNet calls (the replica's step scheduler,
    the default `SD_BATCHING=continuous`: here with different step counts), and each image is the
    one its seed gives alone."""
    before = requests.get(f"{sd_serve}/healthz", timeout=60).json()
    assert before["batching"] == "continuous"
    prompts = ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]
    seeds = [11, 22, 33, 44]
    steps = [40, 30, 40, 30]

    def call(i):
        params = {"prompt": prompts[i], "img_size": 64, "steps": steps[i], "seed": seeds[i]}
        return requests.get(f"{sd_serve}/imagine", params=params, timeout=180)

    with ThreadPoolExecutor(len(prompts)) as ex:
        responses = list(ex.map(call, range(len(prompts))))
    images = [_png(r) for r in responses]
    after = requests.get(f"{sd_serve}/healthz", timeout=60).json()
    assert after["images"] - before["images"] == len(prompts)
    assert after["largest_batch"] >= 2, (before, after)

    from sd_py import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SD2))
    for prompt, seed, n, image in zip(prompts, seeds, steps, images):
        alone = pipe(prompt, height=64, width=64, num_inference_steps=n, generator=seed).images[0]
        diff = np.abs(pixels(image) - pixels(alone))
        assert diff.max() <= 1, (prompt, diff.max())


@pytest.fixture
def request_batching_serve(ray_cluster):
    """The packaged app with `SD_BATCHING=request` (`@serve.batch`), under /request."""
    from ray import serve

    from sd_py.serve import APIIngress, StableDiffusionV2

    base_url, _ = ray_cluster
    # No CPUs reserved: the module's app holds the cluster's two while this one runs beside it.
    options = {"runtime_env": {"env_vars": {"SD_BATCHING": "request"}}, "num_gpus": 0, "num_cpus": 0}
    model = StableDiffusionV2.options(ray_actor_options=options)
    serve.run(APIIngress.options(ray_actor_options={"num_cpus": 0}).bind(model.bind()), name="sd-py-request", route_prefix="/request")
    _wait_ready(base_url, "/request/healthz")
    yield f"{base_url}/request"
    serve.delete("sd-py-request")


def test_request_batching_runs_requests_that_arrive_together_as_one_call(request_batching_serve):
    """`SD_BATCHING=request`: concurrent requests with the same size/steps/guidance become one
    pipeline call (they arrive within `SD_BATCH_WAIT_S`), each image the one its seed gives alone."""
    url = request_batching_serve
    before = requests.get(f"{url}/healthz", timeout=60).json()
    assert before["batching"] == "request"
    seeds = [11, 22, 33]

    def call(seed):
        return requests.get(f"{url}/imagine", params={"prompt": "a red cube", "img_size": 64, "steps": 3, "seed": seed}, timeout=180)

    with ThreadPoolExecutor(len(seeds)) as ex:
        images = [_png(r) for r in ex.map(call, seeds)]
    after = requests.get(f"{url}/healthz", timeout=60).json()
    assert after["images"] - before["images"] == len(seeds)
    assert after["pipeline_calls"] - before["pipeline_calls"] < len(seeds), (before, after)
    from sd_py import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SD2))
    for seed, image in zip(seeds, images):
        alone = pipe("a red cube", height=64, width=64, num_inference_steps=3, generator=seed).images[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1


EDIT = SD2.parents[1] / "edit"


def _upload(path_or_bytes, name="image.png"):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return (name, data, "application/octet-stream")


def _png_of_size(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, "PNG")
    return buf.getvalue()


def test_serve_img2img_and_inpaint_give_the_pipeline_images(sd_serve, sd2_path):
    """POST /img2img and /inpaint with a seed give exactly sd_py's images for the same arguments
    (the model's scheduler; the fixture image's size rounded down to 8), through pipelines that
    share the served model's weights."""
    from sd_py import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    fields = {"prompt": "a red cube on a table", "seed": "3", "steps": "4", "negative_prompt": "blurry"}
    files = {"image": _upload(EDIT / "init.png")}
    r = requests.post(f"{sd_serve}/img2img", data={**fields, "strength": "0.6"}, files=files, timeout=180)
    served_img2img = _png(r)
    assert r.headers["x-seed"] == "3"
    files["mask"] = _upload(EDIT / "mask.png", "mask.png")
    served_inpaint = _png(requests.post(f"{sd_serve}/inpaint", data=fields, files=files, timeout=180))

    init, mask = Image.open(EDIT / "init.png"), Image.open(EDIT / "mask.png")
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(sd2_path)
    args = {"negative_prompt": "blurry", "num_inference_steps": 4, "generator": 3}
    direct = img2img("a red cube on a table", image=init, strength=0.6, **args).images[0]
    assert served_img2img.size == direct.size == (72, 56)
    assert np.array_equal(pixels(served_img2img), pixels(direct))
    inpaint = StableDiffusionInpaintPipeline.from_pipe(img2img)
    direct = inpaint("a red cube on a table", image=init, mask_image=mask, height=56, width=72, **args).images[0]
    assert np.array_equal(pixels(served_inpaint), pixels(direct))


@pytest.mark.parametrize(
    "route, files, data, status, message",
    [
        ("img2img", {}, {"prompt": "cat"}, 422, "image file is required"),
        ("img2img", {"image": _upload(b"not an image")}, {"prompt": "cat"}, 422, "not an image"),
        ("img2img", {"image": _upload(EDIT / "init.png")}, {"prompt": ""}, 422, "prompt"),
        ("img2img", {"image": _upload(EDIT / "init.png")}, {"prompt": "cat", "strength": "0"}, 422, "strength"),
        ("img2img", {"image": _upload(EDIT / "init.png")}, {"prompt": "cat", "strength": "0.1", "steps": "2"}, 422, "no step"),
        ("inpaint", {"image": _upload(EDIT / "init.png")}, {"prompt": "cat"}, 422, "mask file is required"),
        ("inpaint", {"image": _upload(EDIT / "init.png"), "mask": _upload(_png_of_size((40, 40)))}, {"prompt": "cat"}, 422, "same size"),
        ("img2img", {"image": _upload(_png_of_size((4096, 4096)))}, {"prompt": "cat"}, 413, "pixels"),
        ("inpaint", {"image": _upload(EDIT / "init.png"), "mask": _upload(b"\0" * (8 * 1024 * 1024 + 1))}, {"prompt": "cat"}, 413, "bytes"),
    ],
)
def test_serve_edit_rejects_bad_input(sd_serve, route, files, data, status, message):
    r = requests.post(f"{sd_serve}/{route}", data=data, files=files or None, timeout=60)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert message in r.json()["detail"]


def test_serve_edit_rejects_a_body_that_is_not_a_form(sd_serve):
    r = requests.post(f"{sd_serve}/img2img", json={"prompt": "cat"}, timeout=60)
    assert r.status_code == 422 and "image file is required" in r.json()["detail"]


def test_serve_png_carries_the_pipeline_parameters(sd_serve, sd2_path):
    """Every PNG answered holds A1111's `parameters` text, the one sd_py's `output_metadata=True`
    gives for the same run."""
    from sd_py import StableDiffusionPipeline

    params = {"prompt": "a lighthouse at dusk", "img_size": 64, "steps": 2, "seed": 99}
    served = _png(requests.get(f"{sd_serve}/imagine", params=params, timeout=180))
    pipe = StableDiffusionPipeline.from_pretrained(sd2_path)
    direct = pipe("a lighthouse at dusk", height=64, width=64, num_inference_steps=2, generator=99, output_metadata=True).images[0]
    assert served.info["parameters"] == direct.info["parameters"]
    assert ", Seed: 99, Size: 64x64, " in served.info["parameters"]


def test_serve_openai_client(sd_serve, sd2_path):
    """The official `openai` client against the served /v1 routes: n seeded images batched in one
    pipeline call (each the image its seed gives alone, within 1 level), its error shapes, models."""
    import base64

    import openai
    from sd_py import StableDiffusionPipeline, scheduler_from_name

    client = openai.OpenAI(api_key="unused", base_url=f"{sd_serve}/v1", max_retries=0, timeout=180)
    extra = {"seed": 21, "steps": 3, "negative_prompt": "blurry", "sampler": "DPM++ 2M Karras"}
    out = client.images.generate(prompt="a red cube", n=2, size="64x64", model="sd2", extra_body=extra)
    served = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
    assert len(served) == 2 and abs(out.created - time.time()) < 600
    pipe = StableDiffusionPipeline.from_pretrained(sd2_path)
    pipe.scheduler = scheduler_from_name("DPM++ 2M Karras", pipe.scheduler.config)
    for seed, image in zip((21, 22), served):
        alone = pipe("a red cube", negative_prompt="blurry", height=64, width=64, num_inference_steps=3, generator=seed).images[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1
        assert "Sampler: DPM++ 2M, Schedule type: Karras, " in image.info["parameters"] and f"Seed: {seed}," in image.info["parameters"]

    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a red cube", response_format="url")
    assert info.value.body["param"] == "response_format" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="scheduler"):
        client.images.generate(prompt="a red cube", size="64x64", extra_body={"sampler": "no such sampler", "steps": 1})
    edit = client.images.edit(image=("init.png", (EDIT / "init.png").read_bytes()), prompt="a red cube", extra_body={"steps": 2, "seed": 3})
    assert Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))).size == (72, 56)
    assert [m.id for m in client.models.list()] == [str(SD2)]


def test_serve_a1111_txt2img_gives_sd_cli_image(sd_serve, tmp_path):
    """/sdapi/v1/txt2img with a seed and an A1111 sampler name gives the image (and the PNG text)
    sd-cli gives for the same settings; the A1111 read-only routes answer their schemas."""
    import base64
    import subprocess

    import jsonschema
    from conftest import sd_cli_binary, sd_cli_env
    from serve_fakes import A1111_OPTIONS, A1111_SAMPLERS, A1111_SD_MODELS, check_a1111_response

    body = {"prompt": "a blue sphere", "negative_prompt": "dark", "seed": 8, "sampler_name": "Euler a", "steps": 3, "cfg_scale": 6}
    r = requests.post(f"{sd_serve}/sdapi/v1/txt2img", json={**body, "width": 64, "height": 64}, timeout=180)
    assert r.status_code == 200, r.text[:500]
    answer = r.json()
    info = check_a1111_response(answer, 1)
    assert info["all_seeds"] == [8] and info["sampler_name"] == "Euler a" and info["sd_model_name"] == SD2.name
    served = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert served.info["parameters"] == info["infotexts"][0]

    out = tmp_path / "cli.png"
    args = ["--prompt", "a blue sphere", "--negative-prompt", "dark", "--seed", "8", "--scheduler", "Euler a"]
    args += ["--steps", "3", "--guidance-scale", "6", "--height", "64", "--width", "64", "--model", str(SD2)]
    env = sd_cli_env(tmp_path)
    subprocess.run([str(sd_cli_binary()), "generate", *args, "--out", str(out)], check=True, capture_output=True, env=env)
    cli = Image.open(out)
    assert np.array_equal(pixels(served), pixels(cli))
    assert served.info["parameters"] == cli.info["parameters"]

    samplers = requests.get(f"{sd_serve}/sdapi/v1/samplers", timeout=60).json()
    jsonschema.validate(samplers, A1111_SAMPLERS)
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= {s["name"] for s in samplers}
    models = requests.get(f"{sd_serve}/sdapi/v1/sd-models", timeout=60).json()
    jsonschema.validate(models, A1111_SD_MODELS)
    assert models[0]["model_name"] == SD2.name
    options = requests.get(f"{sd_serve}/sdapi/v1/options", timeout=60).json()
    jsonschema.validate(options, A1111_OPTIONS)
    assert options["sd_model_checkpoint"] == SD2.name


def test_serve_a1111_img2img_and_openai_edit_give_the_pipeline_images(sd_serve, sd2_path):
    """/sdapi/v1/img2img (n_iter 2: seeds 3, 4) and /v1/images/edits with a mask (the official
    client) give exactly sd_py's img2img and inpainting images, with the same `parameters` text."""
    import base64

    import openai
    from sd_py import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from serve_fakes import check_a1111_response

    init_png, mask_png = (EDIT / "init.png").read_bytes(), (EDIT / "mask.png").read_bytes()
    body = {"prompt": "a red cube on a table", "negative_prompt": "blurry", "seed": 3, "steps": 4, "cfg_scale": 6}
    body |= {"denoising_strength": 0.6, "init_images": [base64.b64encode(init_png).decode()], "n_iter": 2}
    r = requests.post(f"{sd_serve}/sdapi/v1/img2img", json=body, timeout=180)
    assert r.status_code == 200, r.text[:500]
    answer = r.json()
    info = check_a1111_response(answer, 2)
    assert answer["parameters"]["init_images"] is None
    assert info["all_seeds"] == [3, 4] and info["denoising_strength"] == 0.6 and (info["width"], info["height"]) == (72, 56)
    served = [Image.open(io.BytesIO(base64.b64decode(b))) for b in answer["images"]]

    init, mask = Image.open(EDIT / "init.png"), Image.open(EDIT / "mask.png")
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(sd2_path)
    args = {"negative_prompt": "blurry", "num_inference_steps": 4, "output_metadata": True}
    for seed, image in zip((3, 4), served):
        direct = img2img("a red cube on a table", image=init, strength=0.6, guidance_scale=6, generator=seed, **args).images[0]
        assert np.array_equal(pixels(image), pixels(direct))
        assert image.info["parameters"] == direct.info["parameters"] == info["infotexts"][seed - 3]

    client = openai.OpenAI(api_key="unused", base_url=f"{sd_serve}/v1", max_retries=0, timeout=180)
    edit = client.images.edit(
        image=("init.png", init_png), mask=("mask.png", mask_png), prompt="a red cube on a table",
        extra_body={"seed": 3, "steps": 4, "negative_prompt": "blurry"},
    )
    served_inpaint = Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json)))
    inpaint = StableDiffusionInpaintPipeline.from_pipe(img2img)
    direct = inpaint("a red cube on a table", image=init, mask_image=mask, height=56, width=72, generator=3, **args).images[0]
    assert np.array_equal(pixels(served_inpaint), pixels(direct))
    assert served_inpaint.info["parameters"] == direct.info["parameters"]
