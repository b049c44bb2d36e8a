"""Same images as diffusers (the committed reference PNGs) and as `sd-cli` (byte-identical pixels)."""

import os
import subprocess

import numpy as np
import pytest
from PIL import Image

import sd_py
from sd_py import StableDiffusionPipeline
from conftest import PIPELINES, load_case, pixels, read_safetensors, sd_cli_binary

CASES = sorted(p.stem for p in PIPELINES.glob("*.json"))


def _generator(case: dict):
    """`seed` (one generator for the batch), or `seeds`: one seed for the batch, or one per image."""
    if "seeds" in case:
        seeds = case["seeds"]
        return seeds[0] if len(seeds) == 1 else seeds
    return case["seed"]


def _run_case(case: dict, **extra):
    """The case as a diffusers user writes it: the scheduler class (an A1111 name maps to a class
    plus config overrides, as `sd_py.scheduler_from_name`) from the model's scheduler config.
    `extra`: more call arguments."""
    model = str(PIPELINES / case["model"])
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.scheduler = sd_py.scheduler_from_name(case["scheduler"], pipe.scheduler.config, **case.get("scheduler_config", {}))
    return pipe(
        case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        guidance_rescale=case.get("guidance_rescale", 0.0),
        num_images_per_prompt=case["num_images_per_prompt"],
        generator=_generator(case),
        **extra,
    ).images


def _reference_pngs(name: str, n: int):
    if n == 1:
        return [PIPELINES / f"{name}.png"]
    return [PIPELINES / f"{name}-{i}.png" for i in range(n)]


def test_there_are_reference_cases():
    assert len(CASES) >= 6, CASES



@pytest.mark.parametrize("name", CASES)
def test_matches_diffusers(name):
    """The committed diffusers images (same prompt, size, steps, guidance, scheduler and
    `torch.Generator("cpu").manual_seed(seed)`): 8-bit pixels within mean |diff| 0.5, max 4."""
    case = load_case(name)
    images = _run_case(case)
    refs = _reference_pngs(name, case["num_images_per_prompt"])
    assert len(images) == len(refs)
    for image, ref in zip(images, refs):
        expected = pixels(Image.open(ref))
        got = pixels(image)
        assert got.shape == expected.shape
        diff = np.abs(got - expected)
        assert diff.mean() <= 0.5 and diff.max() <= 4, (ref.name, diff.mean(), diff.max())


@pytest.mark.parametrize("name", ["sd2_ddim", "sd2_euler"])
def test_callback_latents_match_diffusers(name):
    """`callback_kwargs["latents"]` at every step against the latents diffusers handed its
    `callback_on_step_end` (the fixture's `step{i}.latents`), within 1e-4 of their largest value."""
    case = load_case(name)
    refs = read_safetensors(PIPELINES / f"{name}.safetensors")
    seen = []
    _run_case(case, callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].copy()) or kw)
    assert len(seen) == case["num_inference_steps"]
    for i, latents in enumerate(seen):
        expected = refs[f"step{i}.latents"]
        assert latents.shape == expected.shape
        err = np.abs(latents - expected).max() / np.abs(expected).max()
        assert err <= 1e-4, (i, err)


def test_given_latents_give_diffusers_image():
    """diffusers' `latents` argument: the case's initial noise (DDIM's init_noise_sigma is 1),
    given with another seed, gives diffusers' image."""
    case = load_case("sd2_ddim")
    noise = read_safetensors(PIPELINES / "sd2_ddim.safetensors")["init_latents"]
    case_with_other_seed = {**case, "seed": case["seed"] + 1}
    (image,) = _run_case(case_with_other_seed, latents=noise)
    diff = np.abs(pixels(image) - pixels(Image.open(PIPELINES / "sd2_ddim.png")))
    assert diff.mean() <= 0.5 and diff.max() <= 4, (diff.mean(), diff.max())
    (other,) = _run_case(case_with_other_seed)
    assert not np.array_equal(pixels(other), pixels(image))


@pytest.mark.parametrize("negative", ["encoded", "given"])
def test_given_prompt_embeds_give_diffusers_image(negative):
    """diffusers' `prompt_embeds` (and `negative_prompt_embeds`): the embeddings diffusers computed
    for the case, given instead of the prompts, give its image."""
    case = {**load_case("sd2_ddim"), "prompt": None}
    refs = read_safetensors(PIPELINES / "sd2_ddim.safetensors")
    extra = dict(prompt_embeds=refs["prompt_embeds"])
    if negative == "given":
        case["negative_prompt"] = None
        extra["negative_prompt_embeds"] = refs["negative_prompt_embeds"]
    (image,) = _run_case(case, **extra)
    diff = np.abs(pixels(image) - pixels(Image.open(PIPELINES / "sd2_ddim.png")))
    assert diff.mean() <= 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


@pytest.mark.parametrize("name, scheduler", [("sd2_euler", "EulerDiscreteScheduler"), ("sd1_ddim", "DDIMScheduler"), ("sd2_ddim", None)])
def test_same_pixels_as_sd_cli(tmp_path, name, scheduler):
    case = load_case(name)
    model = str(PIPELINES / case["model"])
    out = tmp_path / "cli.png"
    args = [
        str(sd_cli_binary()),
        "generate",
        "--prompt",
        case["prompt"],
        "--model",
        model,
        "--height",
        str(case["height"]),
        "--width",
        str(case["width"]),
        "--steps",
        str(case["num_inference_steps"]),
        "--guidance-scale",
        str(case["guidance_scale"]),
        "--seed",
        str(case["seed"]),
        "--num-images",
        str(case["num_images_per_prompt"]),
        "--out",
        str(out),
    ]
    if scheduler:
        args += ["--scheduler", scheduler]
    if case["negative_prompt"]:
        args += ["--negative-prompt", case["negative_prompt"]]
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    n = case["num_images_per_prompt"]
    cli_files = [out] if n == 1 else [tmp_path / f"cli-{i}.png" for i in range(n)]

    pipe = StableDiffusionPipeline.from_pretrained(model)
    if scheduler:
        pipe.scheduler = getattr(sd_py, scheduler).from_config(pipe.scheduler.config)
    images = pipe(
        case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        num_images_per_prompt=n,
        generator=case["seed"],
    ).images
    assert len(images) == len(cli_files)
    for image, path in zip(images, cli_files):
        cli = Image.open(path)
        assert cli.size == image.size
        assert cli.convert("RGB").tobytes() == image.tobytes(), path.name
