"""Native half of sd_py (Rust, pyo3). Internal: use the classes of `sd_py`."""

from os import PathLike
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

__version__: str

class GenerationCancelled(RuntimeError): ...

class _Pipeline:
    @staticmethod
    def load(
        model: Union[str, PathLike[str]],
        dtype: str = "float32",
        device: str = "cpu",
        variant: Optional[str] = None,
        revision: Optional[str] = None,
        local_files_only: bool = False,
        cache_dir: Optional[Union[str, PathLike[str]]] = None,
        token: Optional[str] = None,
    ) -> _Pipeline: ...
    def reload(self, dtype: str, device: str) -> _Pipeline: ...
    @property
    def folder(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def variant(self) -> Optional[str]: ...
    @property
    def default_size(self) -> int: ...
    @property
    def vae_scale_factor(self) -> int: ...
    @property
    def scheduler_class(self) -> str: ...
    @property
    def scheduler_config(self) -> str: ...
    @property
    def max_prompt_tokens(self) -> int: ...
    def truncated_text(self, prompt: str) -> Optional[str]: ...
    def generate(
        self,
        prompts: List[str],
        negative_prompts: Optional[List[str]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        seeds: List[int] = ...,
        scheduler: Optional[str] = None,
        scheduler_config: Optional[str] = None,
        output: str = "pil",
        on_step: Optional[Callable[..., Any]] = None,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        step_latents: bool = False,
        latents: Optional[Tuple[bytes, List[int]]] = None,
        prompt_embeds: Optional[Tuple[bytes, List[int]]] = None,
        negative_prompt_embeds: Optional[Tuple[bytes, List[int]]] = None,
    ) -> Dict[str, Any]: ...

def scheduler_classes() -> List[str]: ...
def scheduler_names() -> List[str]: ...
def scheduler_entry(name: str) -> Tuple[str, str]: ...
def resolve_scheduler_config(class_name: str, config_json: str) -> str: ...
def scheduler_schedule(class_name: str, config_json: str, num_inference_steps: Optional[int] = None) -> Tuple[List[float], float, int]: ...
def read_model_file(
    model: Union[str, PathLike[str]],
    file: str,
    revision: Optional[str] = None,
    local_files_only: bool = False,
    cache_dir: Optional[Union[str, PathLike[str]]] = None,
    token: Optional[str] = None,
) -> Tuple[str, str]: ...
def cuda_is_available() -> bool: ...
def normalize_dtype(name: str) -> str: ...
def _panic_for_tests(message: str) -> None: ...
