"""sd_py: Stable Diffusion on sd-core with a diffusers-shaped API (type stubs)."""

from os import PathLike
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

__version__: str
__all__: List[str]

class GenerationCancelled(RuntimeError): ...

def cuda_is_available() -> bool: ...
def scheduler_classes() -> List[str]: ...
def scheduler_names() -> List[str]: ...
def scheduler_from_name(name: str, config: Union[Mapping[str, Any], SchedulerMixin, None] = None, **kwargs: Any) -> SchedulerMixin: ...

class FrozenDict(Dict[str, Any]):
    def __getattr__(self, name: str) -> Any: ...

class SchedulerMixin:
    config_name: str
    timesteps: List[float]
    num_inference_steps: Optional[int]
    def __init__(self, **kwargs: Any) -> None: ...
    @classmethod
    def from_config(
        cls: Type[_S], config: Union[Mapping[str, Any], SchedulerMixin, None] = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> _S: ...
    @classmethod
    def from_pretrained(
        cls: Type[_S],
        pretrained_model_name_or_path: Union[str, PathLike[str], None] = None,
        subfolder: Optional[str] = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> _S: ...
    @property
    def config(self) -> FrozenDict: ...
    def save_config(self, save_directory: Union[str, PathLike[str]], **kwargs: Any) -> None: ...
    def save_pretrained(self, save_directory: Union[str, PathLike[str]], **kwargs: Any) -> None: ...
    def set_timesteps(self, num_inference_steps: int, device: Any = None, **kwargs: Any) -> None: ...
    @property
    def init_noise_sigma(self) -> float: ...
    @property
    def order(self) -> int: ...
    @property
    def compatibles(self) -> List[Type[SchedulerMixin]]: ...

from typing import TypeVar

_S = TypeVar("_S", bound=SchedulerMixin)

# The scheduler classes are generated from sd-core's registry at import time; these are the ones
# every build has. Others (PNDMScheduler, DPMSolverMultistepScheduler, ...) resolve through
# `__getattr__` below.
class EulerDiscreteScheduler(SchedulerMixin): ...
class DDIMScheduler(SchedulerMixin): ...

def __getattr__(name: str) -> Type[SchedulerMixin]: ...

class StableDiffusionPipelineOutput:
    images: Any
    nsfw_content_detected: Optional[List[bool]]
    seeds: List[int]
    def to_tuple(self) -> Tuple[Any, ...]: ...
    def __getitem__(self, key: Union[int, str]) -> Any: ...
    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...

class _Device(str):
    @property
    def type(self) -> str: ...
    @property
    def index(self) -> Optional[int]: ...  # type: ignore[override]

class StableDiffusionPipeline:
    scheduler: SchedulerMixin
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, PathLike[str]],
        scheduler: Optional[SchedulerMixin] = None,
        torch_dtype: Any = None,
        variant: Optional[str] = None,
        revision: Optional[str] = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> StableDiffusionPipeline: ...
    def to(self, *args: Any, **kwargs: Any) -> StableDiffusionPipeline: ...
    @property
    def device(self) -> _Device: ...
    @property
    def dtype(self) -> str: ...
    @property
    def name_or_path(self) -> str: ...
    @property
    def config(self) -> FrozenDict: ...
    @property
    def vae_scale_factor(self) -> int: ...
    @property
    def default_sample_size(self) -> int: ...
    @property
    def interrupt(self) -> bool: ...
    _interrupt: bool
    def enable_attention_slicing(self, slice_size: Any = "auto") -> None: ...
    def disable_attention_slicing(self) -> None: ...
    def enable_vae_slicing(self) -> None: ...
    def disable_vae_slicing(self) -> None: ...
    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None: ...
    def disable_xformers_memory_efficient_attention(self) -> None: ...
    def set_progress_bar_config(self, **kwargs: Any) -> None: ...
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
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
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[[StableDiffusionPipeline, int, float, Dict[str, Any]], Any]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ...,
        **kwargs: Any,
    ) -> Any: ...
