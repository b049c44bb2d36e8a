"""The hostile-input suite of sd_py and its Serve app (issue 14): absurd arguments, broken model
folders, non-finite values and bad uploads, one table per entry point.

sd_py: each case names the exact exception class our docs define (`ValueError` for bad
arguments, `FileNotFoundError` for a missing model or file, `OSError` for an unreadable one,
`FloatingPointError` for a run gone NaN or inf, `TypeError` where Python itself says so) and a
piece of the message that names the argument or file. The dangerous ones (those that once
aborted the process or could take it down: absurd sizes and counts, thread counts, corrupt
binary headers, a Rust panic) run in a fresh interpreter, which must exit normally with no panic
in its output.

Serve (`sd_py.serve`): each case names the exact HTTP status (413 or 422 for bad requests, 500
for a failed run) and a piece of the JSON `detail`. They run the real FastAPI app and model class
in this process (the Serve handle replaced by direct calls, so no batching); a few also run under
the real local Ray Serve of `conftest.ray_cluster`.
"""

import asyncio
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import SD2, fill_with_nan

# An ingress made outside Ray: Serve's wrapper class has an `async def __del__` only a replica
# awaits.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__:RuntimeWarning")

EDIT = SD2.parents[1] / "edit"
INIT = EDIT / "init.png"  # 75 x 61
TOKEN_DIM = 32  # the hidden size of sd2-tiny's text encoder


# ---- breaking a copy of the fixture model ----


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_header(path, edit):
    """Rewrites the JSON header of a safetensors file; the tensor data stays as it is."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _broken_model(tmp_path, breaks):
    model = tmp_path / "model"
    shutil.copytree(SD2, model)
    breaks(model)
    return model


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def _check(info, cls, message):
    """The raised exception is exactly `cls` and its message matches `message` (a regex)."""
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert re.search(message, str(info.value)), str(info.value)


# ---- sd_py: call arguments ----

BASE_CALL = dict(prompt="a cat", height=64, width=64, num_inference_steps=1)


def _returns(shape):
    """A step callback that returns latents of `shape`, NaN if shape is None."""

    def callback(pipe, step, timestep, kwargs):
        latents = kwargs["latents"]
        return {"latents": np.full(latents.shape, np.nan, np.float32) if shape is None else np.zeros(shape, np.float32)}

    return callback


CALL_CASES = [
    # Sizes.
    ("height 0", dict(height=0), ValueError, r"height must be a positive multiple of 8, got 0"),
    ("width 7", dict(width=7), ValueError, r"width must be a positive multiple of 8, got 7"),
    ("height negative", dict(height=-8), ValueError, r"`height` must not be negative"),
    ("height str", dict(height="64"), ValueError, r"`height` must be an integer"),
    ("height 1.5", dict(height=1.5), ValueError, r"`height` must be an integer"),
    ("height nan", dict(height=float("nan")), ValueError, r"`height` must be an integer, got nan"),
    ("height 2**70", dict(height=2**70), ValueError, r"`height` is too large"),
    ("height 10**9", dict(height=10**9), ValueError, r"height 1000000000 is larger than the supported maximum"),
    # Steps.
    ("steps 0", dict(num_inference_steps=0), ValueError, r"num_inference_steps must be at least 1"),
    ("steps -1", dict(num_inference_steps=-1), ValueError, r"`num_inference_steps` must not be negative"),
    ("steps 10**9", dict(num_inference_steps=10**9), ValueError, r"num_inference_steps \(1000000000\) cannot be larger"),
    ("steps None", dict(num_inference_steps=None), ValueError, r"`num_inference_steps` must be an integer"),
    # Guidance and the other floats.
    ("guidance nan", dict(guidance_scale=float("nan")), ValueError, r"guidance_scale must be a finite number, got NaN"),
    ("guidance inf", dict(guidance_scale=float("inf")), ValueError, r"guidance_scale must be a finite number, got inf"),
    ("guidance 1e308", dict(guidance_scale=1e308), FloatingPointError, r"after step 1 of 1 of the UNet: guidance_scale 1e308"),
    ("guidance str", dict(guidance_scale="high"), ValueError, r"`guidance_scale` must be a number"),
    ("eta nan", dict(eta=float("nan")), ValueError, r"eta must be between 0 and 1, got NaN"),
    ("guidance_rescale -1", dict(guidance_rescale=-1.0), ValueError, r"guidance_rescale must be a finite number >= 0"),
    # Seeds and counts.
    ("generator 2**64", dict(generator=2**64), ValueError, r"seed 18446744073709551616 is out of range"),
    ("generator str", dict(generator="seed"), ValueError, r"`generator` must be an int seed"),
    ("generator list length", dict(generator=[1, 2]), ValueError, r"list of generators of length 2"),
    ("num_images 0", dict(num_images_per_prompt=0), ValueError, r"num_images_per_prompt must be at least 1"),
    ("num_images 2**70", dict(num_images_per_prompt=2**70), ValueError, r"`num_images_per_prompt` is too large"),
    # Prompts.
    ("prompt None", dict(prompt=None), ValueError, r"at least one prompt is required"),
    ("prompt int", dict(prompt=123), ValueError, r"`prompt` has to be of type `str` or `list` of `str`"),
    ("prompt empty list", dict(prompt=[]), ValueError, r"at least one prompt is required"),
    ("prompt lone surrogate", dict(prompt="a \ud800 cat"), ValueError, r"`prompt` is not valid Unicode text"),
    (
        "negative prompts count",
        dict(prompt=["a", "b"], negative_prompt=["x"]),
        ValueError,
        r"`negative_prompt` has 1 entries but there are 2 prompts",
    ),
    # Arrays.
    ("latents shape", dict(latents=np.zeros((1, 4, 9, 8), np.float32)), ValueError, r"latents have shape \[1, 4, 9, 8\], expected \[1, 4, 8, 8\]"),
    ("latents strings", dict(latents=np.array([["a"]])), ValueError, r"latents must be an array of numbers"),
    ("latents nan", dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), ValueError, r"latents contain NaN or infinite values"),
    (
        "prompt_embeds inf",
        dict(prompt=None, prompt_embeds=np.full((1, 77, TOKEN_DIM), np.inf, np.float32)),
        ValueError,
        r"prompt_embeds contain NaN or infinite",
    ),
    (
        "prompt_embeds shape",
        dict(prompt=None, prompt_embeds=np.zeros((1, 77, 33), np.float32)),
        ValueError,
        r"prompt_embeds have shape \[1, 77, 33\]",
    ),
    # Outputs and callbacks.
    ("output_type jpeg", dict(output_type="jpeg"), ValueError, r"`output_type` must be 'pil', 'np' or 'latent'"),
    ("callback latents shape", dict(callback_on_step_end=_returns((2, 2))), ValueError, r"callback_on_step_end returned latents of shape \[2, 2\]"),
    (
        "callback latents nan",
        dict(num_inference_steps=2, callback_on_step_end=_returns(None)),
        FloatingPointError,
        r"non-finite values \(NaN or inf\) after step 2 of 2 of the UNet",
    ),
    ("timesteps", dict(timesteps=[999, 500]), ValueError, r"sd_py does not support timesteps"),
]


@pytest.mark.parametrize("kwargs, cls, message", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_hostile_call_arguments(pipe, kwargs, cls, message):
    with pytest.raises(Exception) as info:
        pipe(**{**BASE_CALL, **kwargs})
    _check(info, cls, message)


@pytest.mark.parametrize(
    "prompt",
    ["a\0cat\x1b[31m\r\n", "cat " * 5000, ""],
    ids=["prompt control chars", "prompt very long", "prompt empty"],
)
def test_hostile_but_valid_prompts_work(pipe, prompt):
    out = pipe(**{**BASE_CALL, "prompt": prompt}, generator=1)
    assert out.images[0].size == (64, 64)


# ---- sd_py: loading ----

LOAD_CASES = [
    ("model missing", lambda m: shutil.rmtree(m), {}, FileNotFoundError, r"model: not found"),
    ("model is a file", lambda m: None, {"path": "model_index.json"}, ValueError, r"model_index.json` is a file; expected a diffusers model folder"),
    ("no model_index.json", lambda m: (m / "model_index.json").unlink(), {}, FileNotFoundError, r"model_index.json: not found"),
    ("no unet/", lambda m: shutil.rmtree(m / "unet"), {}, FileNotFoundError, r"unet: not found"),
    ("no vae weights", lambda m: (m / VAE_WEIGHTS).unlink(), {}, OSError, r"vae: no `diffusion_pytorch_model.safetensors` weights"),
    (
        "truncated safetensors",
        lambda m: os.truncate(m / UNET_WEIGHTS, 1000),
        {},
        OSError,
        r"unet/diffusion_pytorch_model.safetensors: not a valid safetensors file",
    ),
    (
        "safetensors offsets lie",
        lambda m: _edit_header(m / UNET_WEIGHTS, lambda h: h["conv_in.bias"].update(data_offsets=[0, 10**9])),
        {},
        OSError,
        r"unet/diffusion_pytorch_model.safetensors: not a valid safetensors file",
    ),
    (
        "tensor of the wrong shape",
        lambda m: _edit_header(m / "text_encoder/model.safetensors", lambda h: h["final_layer_norm.weight"].update(shape=[16, 2])),
        {},
        OSError,
        r"tensor `final_layer_norm.weight` has shape \[16, 2\], expected \[32\]",
    ),
    (
        "config with wrong types",
        lambda m: _edit_json(m / "unet/config.json", layers_per_block="two"),
        {},
        OSError,
        r"unet/config.json: invalid config",
    ),
    (
        "attention heads 0",
        lambda m: _edit_json(m / "text_encoder/config.json", num_attention_heads=0),
        {},
        OSError,
        r"text_encoder: .*num_attention_heads 0",
    ),
    (
        "vocab.json not JSON",
        lambda m: (m / "tokenizer/vocab.json").write_text("not json {"),
        {},
        OSError,
        r"tokenizer/vocab.json: invalid config: not valid JSON",
    ),
    ("merges.txt empty", lambda m: (m / "tokenizer/merges.txt").write_text(""), {}, OSError, r"tokenizer/merges.txt: invalid config: no merges"),
    (
        "beta_start 1.5",
        lambda m: _edit_json(m / SCHEDULER_CONFIG, beta_start=1.5, beta_end=2.0),
        {},
        OSError,
        r"scheduler_config.json: .*betas must be in \(0, 1\)",
    ),
    (
        "unknown scheduler class",
        lambda m: _edit_json(m / "model_index.json", scheduler=["diffusers", "WarpScheduler"]),
        {},
        ValueError,
        r"unknown scheduler `WarpScheduler`",
    ),
    ("dtype float64", lambda m: None, {"torch_dtype": "float64"}, ValueError, r"unknown dtype `float64`"),
    ("device tpu", lambda m: None, {"device": "tpu"}, ValueError, r"unknown device `tpu`"),
    ("device -1", lambda m: None, {"device": -1}, ValueError, r"invalid device ordinal -1"),
    ("variant not a string", lambda m: None, {"variant": 16}, ValueError, r"`variant` must be a string"),
    ("path None", lambda m: None, {"path": None}, TypeError, r"expected str, bytes or os.PathLike"),
]


@pytest.mark.parametrize("breaks, kwargs, cls, message", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_hostile_model_folders(tmp_path, breaks, kwargs, cls, message):
    from sd_py import StableDiffusionPipeline

    model = _broken_model(tmp_path, breaks)
    kwargs = dict(kwargs)
    path = kwargs.pop("path", "")
    with pytest.raises(Exception) as info:
        StableDiffusionPipeline.from_pretrained(None if path is None else str(model / path), **kwargs)
    _check(info, cls, message)


def test_hostile_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    from sd_py import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(Exception) as info:
        StableDiffusionPipeline.from_pretrained("nobody/no-such-model")
    _check(info, OSError, r"nobody/no-such-model")


def test_hostile_nan_weights_in_the_vae(tmp_path):
    from sd_py import StableDiffusionPipeline

    model = _broken_model(tmp_path, lambda m: fill_with_nan(m / VAE_WEIGHTS, "decoder.conv_out.bias"))
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    with pytest.raises(Exception) as info:
        pipe(**BASE_CALL)
    _check(info, FloatingPointError, r"non-finite values \(NaN or inf\) in the VAE decode")


# ---- sd_py: image-to-image and inpainting ----

EDIT_CASES = [
    ("image None", False, dict(image=None), ValueError, r"`image` input cannot be undefined"),
    ("strength nan", False, dict(strength=float("nan")), ValueError, r"strength must be in \(0, 1\], got NaN"),
    ("strength 2", False, dict(strength=2), ValueError, r"strength must be in \(0, 1\], got 2"),
    ("strength 0", False, dict(strength=0), ValueError, r"strength must be in \(0, 1\], got 0"),
    ("image empty array", False, dict(image=np.zeros((0, 0, 3), np.uint8)), ValueError, r"height must be a positive multiple of 8, got 0"),
    (
        "image nan array",
        False,
        dict(image=np.full((64, 64, 3), np.nan, np.float32)),
        ValueError,
        r"`image`: a float array must hold values in \[0, 1\]",
    ),
    ("image 5-d array", False, dict(image=np.zeros((1, 1, 8, 8, 3), np.uint8)), ValueError, r"`image` must be a PIL image or an HWC / HW array"),
    ("image too wide", False, dict(image=Image.new("RGB", (4104, 8))), ValueError, r"width 4104 is larger than the supported maximum"),
    ("mask of another size", True, dict(mask_image=Image.new("L", (16, 16))), ValueError, r"the mask is 16x16 but the image is 75x61"),
    ("mask None", True, dict(mask_image=None), ValueError, r"`mask_image` input cannot be undefined"),
    ("inpaint latents", True, dict(latents=np.zeros((1, 4, 7, 9), np.float32)), ValueError, r"sd_py does not support latents"),
]


@pytest.mark.parametrize("inpaint, kwargs, cls, message", [c[1:] for c in EDIT_CASES], ids=[c[0] for c in EDIT_CASES])
def test_hostile_edit_arguments(pipe, inpaint, kwargs, cls, message):
    from sd_py import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    edit = (StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline).from_pipe(pipe)
    args = dict(prompt="a cat", image=Image.open(INIT), num_inference_steps=2)
    if inpaint:
        args["mask_image"] = Image.open(EDIT / "mask.png")
    with pytest.raises(Exception) as info:
        edit(**{**args, **kwargs})
    _check(info, cls, message)


# ---- sd_py: the dangerous ones, each in a fresh interpreter ----

_ISOLATED = """
import json, os, sys
from sd_py import StableDiffusionPipeline
SD2 = os.environ["SD_HOSTILE_MODEL"]
def load(path=SD2):
    return StableDiffusionPipeline.from_pretrained(path)
try:
    exec(sys.argv[1])
except Exception as e:
    print(json.dumps({"class": type(e).__name__, "message": str(e)}))
"""

ISOLATED_CASES = [
    (
        "num_images 10**9",
        None,
        {},
        "load()('a cat', height=64, width=64, num_images_per_prompt=10**9)",
        ValueError,
        r"exceed the limit of 1024 images per run",
    ),
    (
        "images cap not a number",
        None,
        {"SD_MAX_IMAGES_PER_RUN": "lots"},
        "load()('a cat', height=64, width=64)",
        ValueError,
        r"SD_MAX_IMAGES_PER_RUN must be a whole number",
    ),
    ("threads 100000", None, {"RAYON_NUM_THREADS": "100000"}, "load()", ValueError, r"RAYON_NUM_THREADS 100000 is far above"),
    (
        "num_train_timesteps 10**12",
        lambda m: _edit_json(m / SCHEDULER_CONFIG, num_train_timesteps=10**12),
        {},
        "load()",
        OSError,
        r"num_train_timesteps 1000000000000 is over the supported maximum",
    ),
    (
        "safetensors header length lie",
        lambda m: (m / VAE_WEIGHTS).write_bytes(struct.pack("<Q", 10**12) + (m / VAE_WEIGHTS).read_bytes()[8:]),
        {},
        "load()",
        OSError,
        r"vae/diffusion_pytorch_model.safetensors: not a valid safetensors file",
    ),
    (
        "zero-length safetensors",
        lambda m: os.truncate(m / UNET_WEIGHTS, 0),
        {},
        "load()",
        OSError,
        r"unet/diffusion_pytorch_model.safetensors: not a valid safetensors",
    ),
    (
        "a Rust panic",
        None,
        {},
        "from sd_py import _sd_py; _sd_py._panic_for_tests('boom')",
        RuntimeError,
        r"internal error in sd-core \(Rust panic\): boom",
    ),
]


@pytest.mark.parametrize("breaks, env, code, cls, message", [c[1:] for c in ISOLATED_CASES], ids=[c[0] for c in ISOLATED_CASES])
def test_hostile_inputs_in_a_fresh_interpreter(tmp_path, breaks, env, code, cls, message):
    model = SD2 if breaks is None else _broken_model(tmp_path, breaks)
    run = subprocess.run(
        [sys.executable, "-c", _ISOLATED, code],
        env={**os.environ, **env, "SD_HOSTILE_MODEL": str(model)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"exit code {run.returncode}:\n{output[-3000:]}"
    assert "PanicException" not in output, output[-3000:]
    if "_panic_for_tests" not in code:  # Rust's panic hook reports the deliberate one on stderr
        assert "panicked" not in output, output[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["class"] == cls.__name__, result
    assert re.search(message, result["message"]), result


# ---- Serve: the app in this process ----


def _png(size, fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt)
    return buf.getvalue()


def _png_header(width, height) -> bytes:
    """A PNG whose header declares `width` x `height` pixels (a decompression bomb's header)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _serve_model(monkeypatch, model_dir):
    """`StableDiffusionV2` (the model deployment's class) made in this process, on the CPU."""
    pytest.importorskip("ray")
    import sd_py.serve as serve_app

    monkeypatch.setattr(serve_app, "_DEVICE_ENV", "cpu")  # no `ray.get_gpu_ids()`: no Ray start
    monkeypatch.setenv("MODEL_ID", str(model_dir))
    return serve_app.StableDiffusionV2.func_or_class()


def _serve_client(monkeypatch, model):
    """A TestClient of `sd_py.serve.app` whose ingress calls `model` directly instead of through a
    Serve handle (`generate_png` as a batch of one)."""
    import ray.serve
    import sd_py.serve as serve_app
    from fastapi.testclient import TestClient

    async def generate_png(request):
        return (await asyncio.to_thread(model._run, [request]))[0]

    async def health():
        return model.health()

    def remote(call):
        return SimpleNamespace(remote=call)

    ingress = object.__new__(serve_app.APIIngress.func_or_class)
    ingress.handle = SimpleNamespace(generate_png=remote(generate_png), edit_png=remote(model.edit_png), health=remote(health))
    # Serve's class-based routes find their instance through the replica context.
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    return TestClient(serve_app.app)


@pytest.fixture(scope="module")
def serve_model():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _serve_model(monkeypatch, SD2)


@pytest.fixture
def serve_client(monkeypatch, serve_model):
    return _serve_client(monkeypatch, serve_model)


def _get(**params):
    return ("get", "/imagine", {"params": {"prompt": "a cat", "img_size": 64, "steps": 1, **params}})


def _post(route="/img2img", files=None, **data):
    files = {"image": ("init.png", INIT.read_bytes())} if files is None else files
    return ("post", route, {"files": files, "data": {"prompt": "a cat", "steps": "2", **data}})


SERVE_CASES = [
    # GET /imagine query parameters.
    ("guidance nan", _get(guidance_scale="nan"), 422, r"guidance_scale must be between 0 and 50, got nan"),
    ("guidance inf", _get(guidance_scale="inf"), 422, r"guidance_scale must be between 0 and 50, got inf"),
    ("guidance 1e308", _get(guidance_scale="1e308"), 422, r"guidance_scale must be between 0 and 50"),
    ("seed 2**64", _get(seed=2**64), 422, r"seed must be between 0 and 2\*\*64 - 1"),
    ("seed 1e3", _get(seed="1e3"), 422, r"seed"),
    ("img_size 10**30", _get(img_size=10**30), 422, r"img_size must be a multiple of 8 between 64 and 2048"),
    ("img_size negative", _get(img_size=-64), 422, r"img_size must be a multiple of 8 between 64 and 2048, got -64"),
    ("steps 10**30", _get(steps=10**30), 422, r"steps must be between 1 and"),
    ("prompt blank", _get(prompt=" \t\n"), 422, r"prompt parameter cannot be empty"),
    ("prompt control chars", _get(prompt="a\0cat\x1b[31m"), 200, None),
    ("prompt very long", _get(prompt="cat " * 2000), 200, None),
    ("prompt invalid UTF-8", ("get", "/imagine?prompt=%FF%FE&img_size=64&steps=1", {}), 200, None),
    # POST /img2img and /inpaint uploads and fields.
    ("upload GIF", _post(files={"image": ("i.gif", _png((64, 64), "GIF"))}), 422, r"image is not an image"),
    ("upload truncated", _post(files={"image": ("i.png", INIT.read_bytes()[:100])}), 422, r"image could not be decoded"),
    ("upload empty", _post(files={"image": ("i.png", b"")}), 422, r"image is empty"),
    ("upload 4x4", _post(files={"image": ("i.png", _png((4, 4)))}), 422, r"the image sides must be between 8 and 2048 pixels, got 4x4"),
    ("upload bomb header", _post(files={"image": ("b.png", _png_header(100_000, 100_000))}), 413, r"image is over \d+ pixels"),
    ("strength inf", _post(strength="inf"), 422, r"strength must be in \(0, 1\], got inf"),
    ("strength -0", _post(strength="-0"), 422, r"strength must be in \(0, 1\], got -0.0"),
    ("strength leaves no step", _post(strength="0.1"), 422, r"no step"),
    ("three files", _post("/inpaint", files={f: (f"{f}.png", INIT.read_bytes()) for f in ("image", "mask", "extra")}), 422, r"Too many files"),
    ("mask as text", _post("/inpaint", mask="white"), 422, r"mask must be a file upload"),
    (
        "multipart cut short",
        ("post", "/img2img", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        422,
        r"image file is required",
    ),
    (
        "content-length lie",
        ("post", "/img2img", {"content": b"x" * 100, "headers": {"content-type": "multipart/form-data; boundary=x", "content-length": str(10**12)}}),
        413,
        r"the request body is over \d+ bytes",
    ),
]


@pytest.mark.parametrize("request_, status, detail", [c[1:] for c in SERVE_CASES], ids=[c[0] for c in SERVE_CASES])
def test_hostile_serve_requests(serve_client, request_, status, detail):
    method, url, kwargs = request_
    r = getattr(serve_client, method)(url, **kwargs)
    assert r.status_code == status, (r.status_code, r.text[:300])
    if detail is None:
        assert r.headers["content-type"] == "image/png"
    else:
        assert re.search(detail, json.dumps(r.json()["detail"])), r.text[:300]
    # The service is still up and healthy.
    assert serve_client.get("/healthz").status_code == 200


def test_hostile_serve_nan_model_is_500_then_unhealthy(monkeypatch, tmp_path):
    model_dir = _broken_model(tmp_path, lambda m: fill_with_nan(m / VAE_WEIGHTS, "decoder.conv_out.bias"))
    model = _serve_model(monkeypatch, model_dir)
    client = _serve_client(monkeypatch, model)
    for _ in range(model.MAX_CONSECUTIVE_FAILURES):
        r = client.get("/imagine", params={"prompt": "a cat", "img_size": 64, "steps": 1})
        assert r.status_code == 500, r.text[:300]
        assert r.json()["detail"].startswith("image generation failed: non-finite values (NaN or inf) in the VAE decode")
    health = client.get("/healthz")
    assert health.status_code == 503 and "failed in a row" in health.json()["detail"]


# ---- Serve: a few through the real local Ray Serve ----

RAY_CASES = [
    ("guidance -inf", _get(guidance_scale="-inf"), 422, r"guidance_scale"),
    ("upload bomb header", _post(files={"image": ("b.png", _png_header(2**31 - 1, 2**31 - 1))}), 413, r"pixels"),
    ("three files", _post("/inpaint", files={f: (f"{f}.png", INIT.read_bytes()) for f in ("image", "mask", "extra")}), 422, r"Too many files"),
]


@pytest.fixture(scope="module")
def ray_serve_url(ray_cluster):
    """The packaged app under the real local Ray Serve, at /hostile."""
    from ray import serve
    from ray.serve._private.utils import import_attr

    base_url, _ = ray_cluster
    serve.run(import_attr("sd_py.serve:entrypoint"), name="sd-py-hostile", route_prefix="/hostile")
    url = f"{base_url}/hostile"
    for _ in range(120):
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    yield url
    serve.delete("sd-py-hostile")


@pytest.mark.ray
@pytest.mark.parametrize("request_, status, detail", [c[1:] for c in RAY_CASES], ids=[c[0] for c in RAY_CASES])
def test_hostile_serve_requests_under_ray(ray_serve_url, request_, status, detail):
    method, route, kwargs = request_
    r = requests.request(method, ray_serve_url + route, timeout=120, **kwargs)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert re.search(detail, r.json()["detail"]), r.text[:300]
    health = requests.get(f"{ray_serve_url}/healthz", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"

