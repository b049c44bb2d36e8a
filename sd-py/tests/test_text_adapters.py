"""Textual inversion, clip_skip and the A1111 prompt syntax through sd_py: diffusers' runs of
tests/fixtures/text (images within mean |diff| 0.5 / max 4), sd-cli's pixels, and the refusals."""

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from sd_py import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from conftest import REPO, SD2, pixels, sd_cli_binary

TEXT = REPO / "tests" / "fixtures" / "text"


def _case(name: str) -> dict:
    return json.loads((TEXT / f"{name}.json").read_text())


def _with_embeddings() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(SD2))
    pipe.load_textual_inversion(str(TEXT / "ti_emb_params.safetensors"), token="<red-cube>")
    pipe.load_textual_inversion(TEXT / "ti_a1111.safetensors")
    return pipe


def _run(pipe, case: dict, **extra):
    return pipe(
        case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        generator=case["seed"],
        **extra,
    ).images[0]


def _assert_close(image, name: str):
    diff = np.abs(pixels(image) - pixels(Image.open(TEXT / f"{name}.png")))
    assert diff.mean() <= 0.5 and diff.max() <= 4, (name, diff.mean(), diff.max())


def test_textual_inversion_matches_diffusers():
    _assert_close(_run(_with_embeddings(), _case("ti")), "ti")


def test_clip_skip_matches_diffusers():
    _assert_close(_run(StableDiffusionPipeline.from_pretrained(str(SD2)), _case("clip_skip"), clip_skip=1), "clip_skip")


def test_a1111_long_prompt_matches_reference_and_sd_cli(tmp_path):
    case = _case("a1111_long")
    image = _run(StableDiffusionPipeline.from_pretrained(str(SD2)), case, prompt_syntax="a1111")
    _assert_close(image, "a1111_long")
    out = tmp_path / "cli.png"
    args = [str(sd_cli_binary()), "generate", "--prompt", case["prompt"], "--negative-prompt", case["negative_prompt"]]
    args += ["--model", str(SD2), "--height", str(case["height"]), "--width", str(case["width"])]
    args += ["--steps", str(case["num_inference_steps"]), "--guidance-scale", str(case["guidance_scale"])]
    args += ["--seed", str(case["seed"]), "--prompt-syntax", "a1111", "--out", str(out)]
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert Image.open(out).convert("RGB").tobytes() == image.tobytes()


def test_embeddings_are_shared_by_from_pipe_and_kept_by_to():
    pipe = _with_embeddings()
    case = _case("ti")
    edit = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    image = edit(case["prompt"], image=Image.open(TEXT / "ti.png"), num_inference_steps=2, generator=1).images[0]
    assert image.size == (64, 48)
    pipe.to("cpu", "float32")  # same place: nothing reloaded
    reloaded = pipe.to(dtype="bfloat16").to(dtype="float32")
    _assert_close(_run(reloaded, case), "ti")


def test_refusals(tmp_path):
    pipe = _with_embeddings()
    pickle = tmp_path / "learned_embeds.bin"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle files are not loaded"):
        pipe.load_textual_inversion(str(pickle), token="<x>")
    with pytest.raises(ValueError, match="<blue-ball> is already in the tokenizer"):
        pipe.load_textual_inversion(str(TEXT / "ti_a1111.safetensors"))
    with pytest.raises(ValueError, match="not from a dict"):
        pipe.load_textual_inversion({"emb_params": np.zeros(32, np.float32)}, token="<y>")
    with pytest.raises(ValueError, match="clip_skip 2 must be less than"):
        _run(pipe, _case("clip_skip"), clip_skip=2)
    with pytest.raises(ValueError, match="unknown prompt syntax"):
        _run(pipe, _case("clip_skip"), prompt_syntax="comfy")
