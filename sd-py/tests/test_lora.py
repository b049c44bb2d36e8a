"""LoRA through sd_py: diffusers' runs of tests/fixtures/lora (`scripts/fixtures/gen_lora.py`) with
the same calls, and the API around them (adapters, fusing, scale, errors)."""

import json

import numpy as np
import pytest
from PIL import Image

from sd_py import StableDiffusionPipeline
from conftest import REPO, SD2, pixels

LORA = REPO / "tests" / "fixtures" / "lora"
META = json.loads((LORA / "cases.json").read_text())


def _pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(SD2))


def _run(pipe, scale=None, output_type="pil"):
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
    ).images


@pytest.mark.parametrize("case", META["cases"], ids=lambda c: c["name"])
def test_lora_cases_match_diffusers(case):
    pipe = _pipe()
    for adapter in case["adapters"]:
        pipe.load_lora_weights(str(LORA), weight_name=f"lora_{adapter}.safetensors", adapter_name=adapter)
    if case["weights"] is not None:
        pipe.set_adapters(case["adapters"], adapter_weights=case["weights"])
    if case["fuse"] is not None:
        pipe.fuse_lora(lora_scale=case["fuse"])
    image = _run(pipe, case["scale"])[0]
    diff = np.abs(pixels(image) - pixels(Image.open(LORA / f"{case['name']}.png")))
    assert diff.mean() <= 0.5 and diff.max() <= 4, (case["name"], diff.mean(), diff.max())


def test_adapters_fuse_unfuse_and_unload():
    pipe = _pipe()
    base = _run(pipe, output_type="latent")
    pipe.load_lora_weights(LORA / "lora_peft.safetensors")
    pipe.load_lora_weights(str(LORA / "lora_kohya.safetensors"), adapter_name="kohya")
    assert pipe.get_active_adapters() == ["kohya"]
    assert pipe.get_list_adapters()["unet"] == ["default_0", "kohya"]
    pipe.set_adapters(["default_0", "kohya"], adapter_weights=[0.7, 0.4])
    unfused = _run(pipe, output_type="latent")
    assert not np.array_equal(unfused, base)
    # scale 0 is the base model, exactly
    assert np.array_equal(_run(pipe, scale=0.0, output_type="latent"), base)
    pipe.fuse_lora()
    fused = _run(pipe, output_type="latent")
    np.testing.assert_allclose(fused, unfused, atol=1e-4)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    assert np.array_equal(_run(pipe, output_type="latent"), base)


def test_lora_errors():
    pipe = _pipe()
    with pytest.raises(OSError, match="pickle"):
        pipe.load_lora_weights(str(LORA), weight_name="lora.pt")
    with pytest.raises(ValueError, match="state dicts"):
        pipe.load_lora_weights({})
    with pytest.raises(ValueError, match="only 'scale'"):
        pipe("x", num_inference_steps=1, cross_attention_kwargs={"other": 1})
    with pytest.raises(ValueError, match="nope"):
        pipe.set_adapters("nope")
    pipe.load_lora_weights(str(LORA / "lora_peft.safetensors"), adapter_name="a")
    with pytest.raises(ValueError, match="LoRAs"):
        pipe.to("cpu", "bfloat16")


# ---- Serve: SD_LORAS, `lora` / `lora_scale` (without Ray: the validation and the replica class) ----


@pytest.fixture
def serve_loras(monkeypatch):
    from sd_py import serve

    loras = serve.parse_loras(f" kohya={LORA / 'lora_kohya.safetensors'} , peft={LORA / 'lora_peft.safetensors'}")
    monkeypatch.setattr(serve, "LORAS", loras)
    return serve


def test_serve_lora_requests_are_checked(serve_loras):
    serve = serve_loras
    r = serve.validate_request("a cat", 64, seed=1, lora="kohya", lora_scale="0.5")
    assert (r["lora"], r["lora_scale"]) == ("kohya", 0.5)
    assert "lora" not in serve.validate_request("a cat", 64, seed=1)
    for lora, scale, message in [
        ("/etc/passwd", None, "unknown lora '/etc/passwd'; this deployment has: kohya, peft"),
        (None, 0.5, "lora_scale needs a lora"),
        ("kohya", "x", "lora_scale must be a number"),
        ("kohya", float("nan"), "between -10 and 10"),
    ]:
        with pytest.raises(serve.BadRequest, match=message):
            serve.validate_request("a cat", 64, lora=lora, lora_scale=scale)
    with pytest.raises(ValueError, match="SD_LORAS"):
        serve.parse_loras("a=x,a=y")
    reqs = [serve.validate_request("a", 64, 1, 3, lora=lora, lora_scale=s) for lora, s in [("kohya", None), (None, None), ("kohya", 1), ("peft", None), ("kohya", 0.5)]]
    assert serve.group_requests(reqs) == [[0, 2], [1], [3], [4]]


def test_serve_replica_runs_the_chosen_lora(serve_loras, monkeypatch):
    serve = serve_loras
    monkeypatch.setenv("MODEL_ID", str(SD2))
    monkeypatch.setenv("SD_DEVICE", "cpu")
    replica = serve.StableDiffusionV2.func_or_class()
    assert replica.health()["loras"] == ["kohya", "peft"]
    run = dict(seed=META["seed"], steps=META["num_inference_steps"], guidance_scale=META["guidance_scale"], negative_prompt=META["negative_prompt"])
    with_lora = serve.validate_request(META["prompt"], 64, lora="kohya", lora_scale=0.5, **run)
    plain = serve.validate_request(META["prompt"], 64, **run)
    lora_png, plain_png = replica._run([with_lora])[0], replica._run([plain])[0]
    import io

    diff = np.abs(pixels(Image.open(io.BytesIO(lora_png))) - pixels(Image.open(LORA / "kohya_s05.png")))
    assert diff.mean() <= 0.5 and diff.max() <= 4
    base = _run(_pipe())[0]
    assert np.array_equal(pixels(Image.open(io.BytesIO(plain_png))), pixels(base))
