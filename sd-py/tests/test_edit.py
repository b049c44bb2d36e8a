"""Image-to-image and inpainting through sd_py: the diffusers fixtures of tests/fixtures/edit,
sd-cli's pixels, the arguments and errors, `from_pipe` and the Auto pipelines."""

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

import sd_py
from sd_py import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from conftest import PIPELINES, REPO, SD2, pixels, sd_cli_binary

EDIT = REPO / "tests" / "fixtures" / "edit"
INPAINT_MODEL = EDIT / "sd2-inpaint-tiny"
CASES = sorted(p.stem for p in EDIT.glob("*.json"))


def _case(name: str) -> dict:
    return json.loads((EDIT / f"{name}.json").read_text())


def _model(case: dict) -> str:
    return str(PIPELINES / case["model"] if case["model"] == "sd2-tiny" else EDIT / case["model"])


def _init() -> Image.Image:
    return Image.open(EDIT / "init.png")


def _mask() -> Image.Image:
    return Image.open(EDIT / "mask.png")


def _run_case(case: dict, image=None, mask_image=None):
    """The case as a diffusers user writes it (the inpainting runs pass the fixture's size, as the
    fixture generator did)."""
    auto = AutoPipelineForInpainting if case["pipeline"] == "inpaint" else AutoPipelineForImage2Image
    pipe = auto.from_pretrained(_model(case))
    pipe.scheduler = getattr(sd_py, case["scheduler"]).from_config(pipe.scheduler.config)
    extra = {}
    if case["pipeline"] == "inpaint":
        extra = {"mask_image": _mask() if mask_image is None else mask_image, "height": case["height"], "width": case["width"]}
    return pipe(
        case["prompt"],
        image=_init() if image is None else image,
        strength=case["strength"],
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        num_images_per_prompt=case["num_images_per_prompt"],
        generator=case["seed"],
        **extra,
    ).images


def _assert_matches_diffusers(name: str, images) -> None:
    n = _case(name)["num_images_per_prompt"]
    refs = [EDIT / f"{name}.png"] if n == 1 else [EDIT / f"{name}-{i}.png" for i in range(n)]
    assert len(images) == len(refs)
    for image, ref in zip(images, refs):
        expected = pixels(Image.open(ref))
        got = pixels(image)
        assert got.shape == expected.shape
        diff = np.abs(got - expected)
        assert diff.mean() <= 0.5 and diff.max() <= 4, (ref.name, diff.mean(), diff.max())


def test_there_are_edit_cases():
    assert {"img2img_heun", "img2img_euler_two", "inpaint4_euler_a", "inpaint4_euler_a_s07", "inpaint9_ddim"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_matches_diffusers(name):
    """diffusers' Img2Img / Inpaint pipelines with the same arguments and
    `torch.Generator("cpu").manual_seed(seed)`: 8-bit pixels within mean |diff| 0.5, max 4."""
    _assert_matches_diffusers(name, _run_case(_case(name)))


def test_numpy_inputs_give_the_pil_result():
    """`image=` as an HWC uint8 array or a float one in [0, 1], `mask_image=` as an HW array."""
    case = _case("inpaint4_euler_a")
    image = np.asarray(_init().convert("RGB"))
    mask = np.asarray(_mask())
    _assert_matches_diffusers("inpaint4_euler_a", _run_case(case, image=image, mask_image=mask))
    _assert_matches_diffusers("inpaint4_euler_a", _run_case(case, image=[image.astype(np.float32) / 255], mask_image=mask / 255.0))


def test_same_pixels_as_sd_cli(tmp_path):
    name = "inpaint9_ddim"
    case = _case(name)
    out = tmp_path / "cli.png"
    args = [str(sd_cli_binary()), "generate", "--prompt", case["prompt"], "--model", _model(case)]
    args += ["--image", str(EDIT / "init.png"), "--mask", str(EDIT / "mask.png"), "--strength", str(case["strength"])]
    args += ["--steps", str(case["num_inference_steps"]), "--guidance-scale", str(case["guidance_scale"])]
    args += ["--seed", str(case["seed"]), "--scheduler", case["scheduler"], "--out", str(out)]
    if case["negative_prompt"]:
        args += ["--negative-prompt", case["negative_prompt"]]
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    (image,) = _run_case(case)
    assert Image.open(out).convert("RGB").tobytes() == image.tobytes()


def test_inpaint_default_size_is_the_models():
    """As diffusers: without height/width the image and mask are resized to
    `unet.sample_size * vae_scale_factor`; img2img keeps the image's size (rounded down to 8)."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(INPAINT_MODEL))
    side = pipe.default_sample_size
    image = pipe("a cat", image=_init(), mask_image=_mask(), num_inference_steps=1, generator=0).images[0]
    assert image.size == (side, side)
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(str(SD2))
    image = img2img("a cat", image=_init(), num_inference_steps=2, generator=0).images[0]
    assert image.size == (72, 56)


def test_from_pipe_shares_the_loaded_weights():
    base = StableDiffusionPipeline.from_pretrained(str(SD2))
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(base)
    inpaint = AutoPipelineForInpainting.from_pipe(img2img)
    back = StableDiffusionPipeline.from_pipe(inpaint)
    assert type(img2img) is StableDiffusionImg2ImgPipeline and type(inpaint) is StableDiffusionInpaintPipeline
    assert base._native is img2img._native is inpaint._native is back._native
    assert img2img.scheduler is base.scheduler
    euler = sd_py.EulerDiscreteScheduler.from_config(base.scheduler.config)
    assert AutoPipelineForImage2Image.from_pipe(base, scheduler=euler).scheduler is euler
    with pytest.warns(UserWarning, match="ignoring"):
        StableDiffusionImg2ImgPipeline.from_pipe(base, torch_dtype="float16")
    with pytest.raises(ValueError, match="sd_py pipeline"):
        StableDiffusionImg2ImgPipeline.from_pipe("not a pipeline")


def test_auto_pipelines_choose_by_the_unet():
    inpaint = AutoPipelineForInpainting.from_pretrained(str(INPAINT_MODEL))
    assert isinstance(inpaint, StableDiffusionInpaintPipeline)
    assert isinstance(AutoPipelineForInpainting.from_pretrained(str(SD2)), StableDiffusionInpaintPipeline)
    assert isinstance(AutoPipelineForImage2Image.from_pretrained(str(SD2)), StableDiffusionImg2ImgPipeline)
    with pytest.raises(ValueError, match="inpainting model"):
        AutoPipelineForImage2Image.from_pretrained(str(INPAINT_MODEL))
    with pytest.raises(ValueError, match="inpainting model"):
        AutoPipelineForImage2Image.from_pipe(inpaint)
    # Text-to-image with an inpainting UNet: sd-core's message.
    text = StableDiffusionPipeline.from_pipe(inpaint)
    with pytest.raises(ValueError, match="give an init image and a mask"):
        text("a cat", num_inference_steps=1)
    with pytest.raises(EnvironmentError):
        AutoPipelineForImage2Image()


@pytest.fixture(scope="module")
def img2img():
    return StableDiffusionImg2ImgPipeline.from_pretrained(str(SD2))


@pytest.fixture(scope="module")
def inpaint():
    return StableDiffusionInpaintPipeline.from_pretrained(str(SD2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 0}, "strength must be in (0, 1]"),
        ({"strength": 1.5}, "strength must be in (0, 1]"),
        ({"strength": "much"}, "`strength` must be a number"),
        ({"strength": 0.1, "num_inference_steps": 2}, "leaves no step to run"),
        ({"image": None}, "`image` input cannot be undefined"),
        ({"image": []}, "empty list"),
        ({"image": "init.png"}, "`image` must be a PIL image or an HWC / HW array"),
        ({"image": np.zeros((8, 8, 3), dtype=np.int32)}, "uint8 or float"),
        ({"image": np.full((8, 8, 3), 2.0)}, "values in [0, 1]"),
        ({"image": [_init(), _init()]}, "2 init images for 1 prompts"),
        ({"timesteps": [1, 2]}, "sd_py does not support timesteps"),
        ({"sigmas": [1.0]}, "sd_py does not support sigmas"),
    ],
)
def test_img2img_rejects_bad_arguments(img2img, kwargs, message):
    args = {"image": _init(), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError) as info:
        img2img("a cat", **args)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_image": None}, "`mask_image` input cannot be undefined"),
        ({"mask_image": _mask().resize((40, 40))}, "the mask is 40x40 but the image is 75x61"),
        ({"strength": 0}, "strength must be in (0, 1]"),
        ({"height": 60}, "multiple"),
        ({"padding_mask_crop": 32}, "sd_py does not support padding_mask_crop"),
        ({"masked_image_latents": np.zeros((1, 4, 7, 9))}, "sd_py does not support masked_image_latents"),
        ({"latents": np.zeros((1, 4, 7, 9))}, "sd_py does not support latents"),
    ],
)
def test_inpaint_rejects_bad_arguments(inpaint, kwargs, message):
    args = {"image": _init(), "mask_image": _mask(), "height": 56, "width": 72, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError) as info:
        inpaint("a cat", **args)
    assert message in str(info.value)


def test_unknown_arguments_warn(img2img):
    with pytest.warns(UserWarning, match="StableDiffusionImg2ImgPipeline.__call__: ignoring unsupported argument"):
        img2img("a cat", image=_init(), num_inference_steps=1, strength=1.0, generator=0, foo=1)


def test_outputs_and_callback(inpaint):
    """The txt2img machinery is shared: output types, return_dict and the step callback."""
    seen = []

    def on_step(pipe, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape))
        return kwargs

    out = inpaint("a cat", image=_init(), mask_image=_mask(), height=56, width=72, num_inference_steps=3, strength=1.0,
                  generator=1, output_type="np", callback_on_step_end=on_step)
    assert isinstance(out, sd_py.StableDiffusionPipelineOutput)
    assert out.images.shape == (1, 56, 72, 3) and out.nsfw_content_detected is None
    assert seen == [(0, (1, 4, 7, 9)), (1, (1, 4, 7, 9)), (2, (1, 4, 7, 9))]
    images, nsfw = inpaint("a cat", image=_init(), mask_image=_mask(), height=56, width=72, num_inference_steps=1,
                           generator=1, return_dict=False)
    assert len(images) == 1 and images[0].size == (72, 56) and nsfw is None
