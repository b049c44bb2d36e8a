"""LoRA through sd_py: diffusers' runs of tests/fixtures/lora (`scripts/fixtures/gen_lora.py`) with
the same calls, the API around them (adapters, weights, fusing, scale, `.to()`, hub ids, the edit
pipelines, errors) and the Serve app's `SD_LORAS` allow-list."""

import asyncio
import hashlib
import io
import json
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sd_py import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from conftest import REPO, SD2, pixels

LORA = REPO / "tests" / "fixtures" / "lora"
META = json.loads((LORA / "cases.json").read_text())
EDIT = REPO / "tests" / "fixtures" / "edit"


def _pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(SD2))


def _run(pipe, scale=None, output_type="pil", **extra):
    kwargs = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
    return pipe(
        META["prompt"],
        negative_prompt=META["negative_prompt"],
        num_inference_steps=META["num_inference_steps"],
        guidance_scale=META["guidance_scale"],
        height=META["height"],
        width=META["width"],
        generator=META["seed"],
        output_type=output_type,
        **kwargs,
        **extra,
    ).images


def _assert_matches(image, name):
    """Within the sd-core tests' tolerance of diffusers' image `name`.png."""
    diff = np.abs(pixels(image) - pixels(Image.open(LORA / f"{name}.png")))
    assert diff.mean() <= 0.5 and diff.max() <= 4, (name, diff.mean(), diff.max())


@pytest.mark.parametrize("case", META["cases"], ids=lambda c: c["name"])
def test_lora_cases_match_diffusers(case):
    pipe = _pipe()
    for adapter in case["adapters"]:
        pipe.load_lora_weights(str(LORA), weight_name=f"lora_{adapter}.safetensors", adapter_name=adapter)
    if case["weights"] is not None:
        pipe.set_adapters(case["adapters"], adapter_weights=case["weights"])
    if case["fuse"] is not None:
        pipe.fuse_lora(lora_scale=case["fuse"])
    _assert_matches(_run(pipe, case["scale"])[0], case["name"])


def test_adapters_weights_fuse_unfuse_and_unload():
    pipe = _pipe()
    base = _run(pipe, output_type="latent")
    pipe.load_lora_weights(LORA / "lora_peft.safetensors")
    pipe.load_lora_weights(str(LORA / "lora_kohya.safetensors"), adapter_name="kohya")
    # diffusers: the adapter loaded last is the only active one; unnamed ones are default_<n>.
    assert pipe.get_active_adapters() == ["kohya"]
    assert pipe.get_list_adapters() == {"text_encoder": ["default_0", "kohya"], "unet": ["default_0", "kohya"]}
    pipe.set_adapters(["default_0", "kohya"], adapter_weights=[0.7, 0.4])
    assert pipe.get_active_adapters() == ["default_0", "kohya"]
    unfused = _run(pipe, output_type="latent")
    assert not np.array_equal(unfused, base)
    # cross_attention_kwargs scale 0: the base model, exactly.
    assert np.array_equal(_run(pipe, scale=0.0, output_type="latent"), base)
    # One weight for every adapter; None is 1.
    pipe.set_adapters(["default_0", "kohya"], adapter_weights=0.5)
    half = _run(pipe, output_type="latent")
    pipe.set_adapters(["default_0", "kohya"], adapter_weights=[0.5, None])
    assert not np.array_equal(_run(pipe, output_type="latent"), half)
    pipe.set_adapters(["default_0", "kohya"], adapter_weights=[0.7, 0.4])
    pipe.fuse_lora()
    fused = _run(pipe, output_type="latent")
    np.testing.assert_allclose(fused, unfused, atol=1e-4)
    # Fused, the run's scale is not applied (diffusers).
    assert np.array_equal(_run(pipe, scale=0.0, output_type="latent"), fused)
    pipe.unfuse_lora()
    assert np.array_equal(_run(pipe, output_type="latent"), unfused)
    pipe.delete_adapters("default_0")
    assert pipe.get_list_adapters()["unet"] == ["kohya"]
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    assert np.array_equal(_run(pipe, output_type="latent"), base)


def test_output_metadata_names_the_loras(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the hash cache, not the user's
    pipe = _pipe()
    pipe.load_lora_weights(LORA / "lora_kohya.safetensors", adapter_name="kohya")
    image = _run(pipe, 0.5, output_metadata=True)[0]
    _assert_matches(image, "kohya_s05")
    text = image.info["parameters"]
    digest = hashlib.sha256((LORA / "lora_kohya.safetensors").read_bytes()).hexdigest()
    assert text.startswith(f"{META['prompt']} <lora:lora_kohya:0.5>\n"), text
    assert f'Lora hashes: "lora_kohya: {digest[:10]}"' in text, text


def test_unfuse_after_unload_restores_the_base_model():
    pipe = _pipe()
    base = _run(pipe, output_type="latent")
    pipe.load_lora_weights(LORA / "lora_kohya.safetensors", adapter_name="kohya")
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()  # fused weights stay fused until unfuse_lora, as in diffusers
    assert not np.array_equal(_run(pipe, output_type="latent"), base)
    pipe.unfuse_lora()
    assert np.array_equal(_run(pipe, output_type="latent"), base)


def test_to_reloads_the_loras():
    pipe = _pipe()
    pipe.load_lora_weights(LORA / "lora_peft.safetensors", adapter_name="peft")
    pipe.load_lora_weights(LORA / "lora_kohya.safetensors", adapter_name="kohya")
    pipe.set_adapters(["peft", "kohya"], [0.7, 0.4])
    pipe.fuse_lora(lora_scale=0.6)
    reloaded = pipe.to(dtype="bfloat16").to(dtype="float32")
    assert reloaded.get_list_adapters()["unet"] == ["peft", "kohya"]
    _assert_matches(_run(reloaded)[0], "both_fused")
    reloaded.unfuse_lora()
    _assert_matches(_run(reloaded)[0], "both")


def test_hub_id_with_weight_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sd-test--lora"
    (repo / "snapshots" / sha).mkdir(parents=True)
    shutil.copy(LORA / "lora_kohya.safetensors", repo / "snapshots" / sha / "style.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    pipe = _pipe()
    pipe.load_lora_weights("sd-test/lora", weight_name="style.safetensors", adapter_name="kohya", local_files_only=True)
    _assert_matches(_run(pipe)[0], "kohya")
    with pytest.raises(OSError, match="offline"):
        pipe.load_lora_weights("sd-test/lora", local_files_only=True)  # no pytorch_lora_weights.safetensors


def test_edit_pipelines_take_the_scale():
    base = _pipe()
    base.load_lora_weights(LORA / "lora_kohya.safetensors", adapter_name="kohya")
    init, mask = Image.open(EDIT / "init.png"), Image.open(EDIT / "mask.png")
    for cls, extra in [
        (StableDiffusionImg2ImgPipeline, {"image": init, "strength": 0.75}),
        (StableDiffusionInpaintPipeline, {"image": init, "mask_image": mask, "height": 64, "width": 64}),
    ]:
        pipe = cls.from_pipe(base)  # shares the adapters, as diffusers' components

        def run(**kwargs):
            return pipe("a red cube", num_inference_steps=3, generator=3, output_type="latent", **extra, **kwargs).images

        with_lora, half, none = run(), run(cross_attention_kwargs={"scale": 0.5}), run(cross_attention_kwargs={"scale": 0.0})
        base.set_adapters([])
        without = run()
        base.set_adapters("kohya")
        assert np.array_equal(none, without), cls.__name__
        assert not np.array_equal(with_lora, without) and not np.array_equal(half, with_lora), cls.__name__
        with pytest.raises(ValueError, match="only 'scale' in cross_attention_kwargs, got 'other'"):
            run(cross_attention_kwargs={"scale": 1.0, "other": 1})


def test_lora_errors(tmp_path):
    pipe = _pipe()
    (tmp_path / "lora.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match=r"lora\.pt.*pickle"):
        pipe.load_lora_weights(str(tmp_path), weight_name="lora.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"junk\.safetensors.*not a valid safetensors file"):
        pipe.load_lora_weights(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"ti\.safetensors: \d+ LoRA keys match no layer"):
        pipe.load_lora_weights(REPO / "tests" / "fixtures" / "text" / "ti.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        pipe.load_lora_weights("missing.safetensors")  # a missing file, not a hub id
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        pipe.load_lora_weights(str(SD2))  # a folder without the file
    with pytest.raises(ValueError, match="state dicts"):
        pipe.load_lora_weights({})
    with pytest.raises(ValueError, match="only 'scale' in cross_attention_kwargs, got 'other'"):
        pipe("x", num_inference_steps=1, cross_attention_kwargs={"other": 1})
    with pytest.raises(ValueError, match=r"cross_attention_kwargs\['scale'\]"):
        pipe("x", num_inference_steps=1, cross_attention_kwargs={"scale": "big"})
    with pytest.raises(ValueError, match="no adapter named `nope` is loaded"):
        pipe.set_adapters("nope")
    pipe.load_lora_weights(LORA / "lora_peft.safetensors", adapter_name="a")
    with pytest.raises(ValueError, match="an adapter named `a` is loaded"):
        pipe.load_lora_weights(LORA / "lora_kohya.safetensors", adapter_name="a")
    with pytest.raises(ValueError, match="2 adapter_weights for 1 adapters"):
        pipe.set_adapters(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="per-block"):
        pipe.set_adapters(["a"], [{"unet": 1.0}])
    with pytest.raises(ValueError, match="no adapter named `b` is loaded"):
        pipe.delete_adapters("b")
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused: unfuse them before loading"):
        pipe.load_lora_weights(LORA / "lora_kohya.safetensors", adapter_name="b")
    with pytest.raises(ValueError, match="fused already"):
        pipe.fuse_lora()
    with pytest.raises(ValueError, match="both the text encoder and the UNet"):
        pipe.fuse_lora(components=["unet"])
    # A failed load leaves nothing behind.
    assert pipe.get_list_adapters()["unet"] == ["a"]


# ---- Serve: SD_LORAS, `lora` / `lora_scale` ----


@pytest.fixture
def serve_loras(monkeypatch):
    pytest.importorskip("ray")
    from sd_py import serve

    monkeypatch.setenv("SD_LORAS", f" kohya={LORA / 'lora_kohya.safetensors'} , peft={LORA / 'lora_peft.safetensors'}")
    return serve


def test_serve_lora_requests_are_checked(serve_loras):
    serve = serve_loras
    r = serve.validate_request("a cat", 64, seed=1, lora="kohya", lora_scale="0.5")
    assert (r["lora"], r["lora_scale"]) == ("kohya", 0.5)
    assert "lora" not in serve.validate_request("a cat", 64, seed=1)
    for lora, scale, message in [
        ("/etc/passwd", None, "unknown lora '/etc/passwd'; this deployment has: kohya, peft"),
        (str(LORA / "lora_kohya.safetensors"), None, "unknown lora"),
        (None, 0.5, "lora_scale needs a lora"),
        ("kohya", "x", "lora_scale must be a number"),
        ("kohya", float("nan"), "between -10 and 10"),
        ("kohya", 11, "between -10 and 10"),
    ]:
        with pytest.raises(serve.BadRequest, match=message):
            serve.validate_request("a cat", 64, lora=lora, lora_scale=scale)
    for spec in ("a=x,a=y", "a", "=x", "a="):
        with pytest.raises(ValueError, match="SD_LORAS"):
            serve.parse_loras(spec)
    runs = [("kohya", None), (None, None), ("kohya", 1), ("peft", None), ("kohya", 0.5)]
    reqs = [serve.validate_request("a", 64, 1, 3, lora=lora, lora_scale=s) for lora, s in runs]
    assert serve.group_requests(reqs) == [[0, 2], [1], [3], [4]]


def _client(monkeypatch, serve, model):
    """A TestClient of `sd_py.serve.app` whose ingress calls `model` directly instead of through a
    Serve handle (as test_hostile.py's)."""
    import ray.serve
    from fastapi.testclient import TestClient

    async def generate_png(request):
        # What `_serve_one` adds to a request before its pipeline call.
        request = {**request, "gone": threading.Event(), "queued": False}
        return (await asyncio.to_thread(model._run, [request]))[0]

    ingress = object.__new__(serve.APIIngress.func_or_class)
    ingress.handle = SimpleNamespace(generate_png=SimpleNamespace(remote=generate_png), edit_png=SimpleNamespace(remote=model.edit_png))
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    return TestClient(serve.app)


def test_serve_replica_runs_the_chosen_lora(serve_loras, monkeypatch):
    serve = serve_loras
    monkeypatch.setenv("MODEL_ID", str(SD2))
    monkeypatch.setattr(serve, "_DEVICE_ENV", "cpu")  # no `ray.get_gpu_ids()`: no Ray start
    replica = serve.StableDiffusionV2.func_or_class()
    assert replica.health()["loras"] == ["kohya", "peft"]
    client = _client(monkeypatch, serve, replica)
    query = {
        "prompt": META["prompt"],
        "negative_prompt": META["negative_prompt"],
        "img_size": 64,
        "seed": META["seed"],
        "steps": META["num_inference_steps"],
        "guidance_scale": META["guidance_scale"],
    }
    answer = client.get("/imagine", params={**query, "lora": "nope"})
    assert answer.status_code == 422
    assert answer.json()["detail"] == "unknown lora 'nope'; this deployment has: kohya, peft"
    answer = client.get("/imagine", params={**query, "lora": "kohya", "lora_scale": 0.5})
    assert answer.status_code == 200, answer.text
    _assert_matches(Image.open(io.BytesIO(answer.content)), "kohya_s05")
    # The next request without a LoRA runs the base model, exactly.
    plain = client.get("/imagine", params=query)
    assert np.array_equal(pixels(Image.open(io.BytesIO(plain.content))), pixels(_run(_pipe())[0]))
    answer = client.post(
        "/img2img",
        files={"image": ("init.png", (EDIT / "init.png").read_bytes())},
        data={"prompt": "a cat", "steps": "2", "lora": "../peft"},
    )
    assert answer.status_code == 422 and "unknown lora '../peft'" in answer.json()["detail"]
