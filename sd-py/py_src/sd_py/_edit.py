"""Image-to-image and inpainting: diffusers' `StableDiffusionImg2ImgPipeline`,
`StableDiffusionInpaintPipeline` and their `AutoPipelineFor...` loaders, on the run of
`StableDiffusionPipeline` (sd-core resizes, encodes and validates)."""

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ._pipeline import StableDiffusionPipeline, _number

__all__ = [
    "AutoPipelineForImage2Image",
    "AutoPipelineForInpainting",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
]

# What the native `generate` takes for an image: (width, height, 8-bit pixel bytes).
_NativeImage = Tuple[int, int, bytes]

# The UNet input channels of diffusers' inpainting models: latents, mask, masked-image latents.
_INPAINT_UNET_CHANNELS = 9

# diffusers' `__call__` arguments that the edit pipelines hand to the shared run unchanged.
_FORWARDED = (
    "prompt",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "num_images_per_prompt",
    "eta",
    "generator",
    "prompt_embeds",
    "negative_prompt_embeds",
    "output_type",
    "return_dict",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "clip_skip",
    "prompt_syntax",
)
# diffusers' `__call__` arguments that every sd_py pipeline refuses (as the text-to-image one).
_REFUSED = ("timesteps", "sigmas", "ip_adapter_image", "ip_adapter_image_embeds", "cross_attention_kwargs")


def _split_call_args(args: Dict[str, Any], refused: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A `__call__`'s arguments (its `locals()`) as the shared run's keyword arguments and the
    refused ones (an empty `cross_attention_kwargs` counts as not given)."""
    unsupported = {name: args[name] for name in refused}
    unsupported["cross_attention_kwargs"] = unsupported["cross_attention_kwargs"] or None
    return {name: args[name] for name in _FORWARDED}, unsupported


def _to_pil(what: str, value: Any, mode: str) -> Any:
    """A PIL image, or a numpy array (HWC or HW; uint8, or float in [0, 1] as diffusers'
    `PipelineImageInput`, quantised here to 8 bits), converted to `mode` by Pillow."""
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value if value.mode == mode else value.convert(mode)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"`{what}` must be a PIL image or a numpy array: {e}") from None
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"`{what}` must be a PIL image or an HWC / HW array, got an array of shape {list(array.shape)}")
    if array.dtype.kind == "f":
        if not np.all((array >= 0) & (array <= 1)):
            raise ValueError(f"`{what}`: a float array must hold values in [0, 1]")
        array = np.round(array * 255)
    elif array.dtype != np.uint8:
        raise ValueError(f"`{what}` must be a uint8 or float array, got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).convert(mode)


def _native_image(what: str, value: Any, mode: str) -> _NativeImage:
    image = _to_pil(what, value, mode)
    return (image.width, image.height, image.tobytes())


def _init_images(image: Any) -> List[_NativeImage]:
    """`image=`: one image, a list of them (one per prompt), or a numpy batch `[n, h, w, c]`."""
    if image is None:
        raise ValueError("`image` input cannot be undefined.")
    batch = getattr(image, "ndim", 0) == 4
    images = list(image) if batch or isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("`image` is an empty list")
    return [_native_image("image", img, "RGB") for img in images]


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Image-to-image with a Stable Diffusion model, as diffusers' pipeline of that name: the
    image is noised to `strength` and denoised towards the prompt. Images as diffusers': Pillow's
    Lanczos resize to the image's size rounded down to a multiple of 8."""

    @classmethod
    def _check_unet(cls, native: Any) -> None:
        if native.unet_in_channels == _INPAINT_UNET_CHANNELS:
            raise ValueError(
                f"{native.folder} is an inpainting model (its UNet takes {_INPAINT_UNET_CHANNELS} input channels): "
                "use StableDiffusionInpaintPipeline or AutoPipelineForInpainting"
            )

    def __call__(  # type: ignore[override]
        self,
        prompt: Union[str, List[str], None] = None,
        image: Any = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Union[str, List[str], None] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: Any = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[..., Any]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_syntax: str = "plain",
        **kwargs: Any,
    ) -> Any:
        """Edits `image`, as diffusers' `StableDiffusionImg2ImgPipeline.__call__`.

        - `image`: a PIL image (converted to RGB), a numpy array (HWC uint8, or float in [0, 1],
          taken to 8 bits), a list of them (one per prompt) or a numpy batch `[n, h, w, c]`. The
          output has its size rounded down to a multiple of 8.
        - `strength` in (0, 1]: how far the image is noised; `int(num_inference_steps *
          strength)` steps run.

        The other arguments are those of `StableDiffusionPipeline.__call__`; `timesteps`,
        `sigmas`, IP-adapter inputs and `cross_attention_kwargs` are not supported
        (ValueError), other unknown keyword arguments are ignored with a warning.
        """
        forwarded, unsupported = _split_call_args(locals(), _REFUSED)
        edit = {"init_images": _init_images(image), "strength": _number("strength", strength)}
        return self._generate(unsupported, kwargs, height=None, width=None, latents=None, guidance_rescale=0.0, edit=edit, **forwarded)


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """Inpainting, as diffusers' pipeline of that name: the white part of the mask is repainted,
    the rest kept. Works with an inpainting model (9-channel UNet: latents, mask, masked image)
    and with a text-to-image one (4 channels: the known part is blended back after every step)."""

    def __call__(  # type: ignore[override]
        self,
        prompt: Union[str, List[str], None] = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: Any = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        padding_mask_crop: Optional[int] = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Union[str, List[str], None] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: Any = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[..., Any]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_syntax: str = "plain",
        **kwargs: Any,
    ) -> Any:
        """Repaints the white part of `mask_image` in `image`, as diffusers'
        `StableDiffusionInpaintPipeline.__call__`.

        - `image`: as in `StableDiffusionImg2ImgPipeline` (one, or one per prompt).
        - `mask_image`: a PIL image (converted to "L" by Pillow) or a numpy array (HW or HWC,
          uint8 or float in [0, 1]), the size of the image; white = repaint, binarised at half.
          diffusers converts to "L" after resizing, sd_py before (Pillow's resize in mode L):
          the same when image and mask need no resize (sizes that are multiples of 8).
        - `height`, `width`: the output size (multiples of 8); default, as diffusers, the
          model's `unet.sample_size * vae_scale_factor` (512 for SD 2 inpainting), to which the
          image and mask are resized.
        - `strength` in (0, 1]: 1 starts from pure noise; below 1 from the noised image.

        `masked_image_latents`, `padding_mask_crop`, `latents`, `timesteps`, `sigmas`,
        IP-adapter inputs and `cross_attention_kwargs` are not supported
        (ValueError); other unknown keyword arguments are ignored with a warning.
        """
        refused = ("masked_image_latents", "padding_mask_crop", "latents") + _REFUSED
        forwarded, unsupported = _split_call_args(locals(), refused)
        if mask_image is None:
            raise ValueError("`mask_image` input cannot be undefined.")
        edit = {
            "init_images": _init_images(image),
            "mask": _native_image("mask_image", mask_image, "L"),
            "strength": _number("strength", strength),
        }
        # diffusers' default size is the model's, to which image and mask are resized.
        height = self.default_sample_size if height is None else height
        width = self.default_sample_size if width is None else width
        return self._generate(unsupported, kwargs, height=height, width=width, latents=None, guidance_rescale=0.0, edit=edit, **forwarded)


class _AutoPipeline:
    """diffusers' `AutoPipelineFor...`: `from_pretrained` and `from_pipe` give the sd_py pipeline
    class of the task (SD 1.x/2.x models only)."""

    _pipeline_class: Any = StableDiffusionPipeline

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(f"use {type(self).__name__}.from_pretrained(...) or .from_pipe(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_or_path: Union[str, "os.PathLike[str]"], **kwargs: Any) -> Any:
        return cls._pipeline_class.from_pretrained(pretrained_model_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: StableDiffusionPipeline, **kwargs: Any) -> Any:
        return cls._pipeline_class.from_pipe(pipeline, **kwargs)


class AutoPipelineForImage2Image(_AutoPipeline):
    """`from_pretrained` / `from_pipe` give a `StableDiffusionImg2ImgPipeline`; an inpainting
    model (9-channel UNet) is refused."""

    _pipeline_class = StableDiffusionImg2ImgPipeline


class AutoPipelineForInpainting(_AutoPipeline):
    """`from_pretrained` / `from_pipe` give a `StableDiffusionInpaintPipeline` (for an inpainting
    model or a text-to-image one)."""

    _pipeline_class = StableDiffusionInpaintPipeline
