"""diffusers-shaped scheduler classes, generated from sd-core's scheduler registry.

Each class sd-core implements (`scheduler_classes()`) becomes a subclass of `SchedulerMixin`
named like the diffusers class (`EulerDiscreteScheduler`, `DDIMScheduler`, ...), so a scheduler
added to sd-core appears here without any Python change.

A scheduler object is its resolved config (diffusers' `scheduler.config`, a read-only
`FrozenDict`): the pipeline builds a fresh sd-core scheduler from it for every call, so one
scheduler object can be shared by concurrent calls.
"""

import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, Union

from . import _sd_py as _native

__all__ = ["FrozenDict", "SchedulerMixin", "scheduler_class", "scheduler_classes", "scheduler_from_name", "scheduler_names"]

CONFIG_NAME = "scheduler_config.json"

# Keyword arguments of diffusers' `from_pretrained` that only steer downloading; sd_py reads
# these from the environment (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE, ...) and ignores them.
_IGNORED_LOADING_KWARGS = {
    "force_download",
    "resume_download",
    "proxies",
    "output_loading_info",
    "use_auth_token",
    "mirror",
    "user_agent",
    "_from_pipeline",
    "_from_auto",
    "low_cpu_mem_usage",
    "use_safetensors",
}


class FrozenDict(dict):
    """A read-only dict with attribute access, like diffusers' `FrozenDict` (`scheduler.config`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        dict.__init__(self, *args, **kwargs)

    def _immutable(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"a {type(self).__name__} is read-only; build a new config: dict(config, key=value)")

    __setitem__ = __delitem__ = setdefault = pop = popitem = update = clear = _immutable  # type: ignore[assignment]
    __ior__ = _immutable  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._immutable()

    def __reduce__(self) -> Tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> "FrozenDict":
        return self

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FrozenDict":
        return FrozenDict(json.loads(json.dumps(dict(self))))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"scheduler config value {value!r} ({type(value).__name__}) is not JSON-serializable")


def _to_json(config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(config), default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid scheduler config: {e}") from None


def _with_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """`config` with `overrides` applied as diffusers' `from_config(config, **overrides)` does: an
    overridden key is no longer a defaulted one (`_use_default_values`)."""
    merged = dict(config)
    if overrides:
        defaults = merged.get("_use_default_values")
        if isinstance(defaults, list):
            merged["_use_default_values"] = [k for k in defaults if k not in overrides]
        merged.update(overrides)
    return merged


class SchedulerMixin:
    """Base of the scheduler classes: a diffusers scheduler's config and schedule.

    Build one with `X.from_pretrained(model, subfolder="scheduler")`, `X.from_config(config)` or
    `X(**config_values)`; assign it to `pipe.scheduler`.
    """

    _class_name: str = ""
    config_name = CONFIG_NAME

    def __init__(self, **kwargs: Any) -> None:
        if not self._class_name:
            raise TypeError("SchedulerMixin is abstract; use a scheduler class such as EulerDiscreteScheduler")
        self._set_config(kwargs)

    def _set_config(self, config: Mapping[str, Any]) -> None:
        resolved = _native.resolve_scheduler_config(self._class_name, _to_json(config))
        object.__setattr__(self, "_config", FrozenDict(json.loads(resolved)))
        object.__setattr__(self, "_config_json", resolved)
        self.num_inference_steps: Optional[int] = None
        self.timesteps: List[float] = []

    # -- construction, as in diffusers --

    @classmethod
    def from_config(
        cls,
        config: Union[Mapping[str, Any], "SchedulerMixin", None] = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Builds this class from another scheduler's config (diffusers' `from_config`): keys this
        class does not know are kept but unused; keys it knows but `config` lacks take this class's
        defaults; `kwargs` override config values."""
        if config is None:
            config = {}
        elif isinstance(config, SchedulerMixin):
            config = config.config
        elif not isinstance(config, Mapping):
            raise ValueError(f"from_config expects a dict-like config, got {type(config).__name__}")
        obj = cls.__new__(cls)
        obj._set_config(_with_overrides(config, kwargs))
        return (obj, {}) if return_unused_kwargs else obj

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, "os.PathLike[str]", None] = None,
        subfolder: Optional[str] = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Reads `[subfolder/]scheduler_config.json` of a local diffusers folder or a hub model id
        (only that file is downloaded). Loading options: `revision`, `local_files_only`,
        `cache_dir`, `token`; other keyword arguments override config values."""
        if pretrained_model_name_or_path is None:
            pretrained_model_name_or_path = kwargs.pop("pretrained_model_name_or_path", None)
        if pretrained_model_name_or_path is None:
            raise ValueError("from_pretrained needs a model id or the path of a folder")
        revision = kwargs.pop("revision", None)
        local_files_only = bool(kwargs.pop("local_files_only", False))
        cache_dir = kwargs.pop("cache_dir", None)
        token = kwargs.pop("token", None)
        ignored = sorted(k for k in kwargs if k in _IGNORED_LOADING_KWARGS)
        if ignored:
            warnings.warn(f"{cls.__name__}.from_pretrained: ignoring {', '.join(ignored)}", stacklevel=2)
        overrides = {k: v for k, v in kwargs.items() if k not in _IGNORED_LOADING_KWARGS}
        file = f"{subfolder.strip('/')}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
        text, path = _native.read_model_file(
            os.fspath(pretrained_model_name_or_path),
            file,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            token=token if isinstance(token, str) else None,
        )
        try:
            config = json.loads(text)
        except ValueError as e:
            raise OSError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(config, dict):
            raise OSError(f"{path}: expected a JSON object")
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **overrides)

    # -- the config --

    @property
    def config(self) -> FrozenDict:
        """The resolved config: every key of the class with its value (read-only)."""
        return self._config  # type: ignore[attr-defined,no-any-return]

    def _config_as_json(self) -> str:
        return self._config_json  # type: ignore[attr-defined,no-any-return]

    def save_config(self, save_directory: Union[str, "os.PathLike[str]"], **kwargs: Any) -> None:
        """Writes `scheduler_config.json` into `save_directory` (created if needed)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(dict(self.config), indent=2, sort_keys=True) + "\n")

    save_pretrained = save_config

    # -- the schedule --

    def set_timesteps(self, num_inference_steps: int, device: Any = None, **kwargs: Any) -> None:
        """Computes `self.timesteps` for `num_inference_steps` steps (diffusers' `set_timesteps`).
        The pipeline does this itself for every call; this is for inspection."""
        timesteps, sigma, _ = _native.scheduler_schedule(self._class_name, self._config_as_json(), int(num_inference_steps))
        self.timesteps = timesteps
        self.num_inference_steps = int(num_inference_steps)
        self._init_noise_sigma = sigma

    @property
    def init_noise_sigma(self) -> float:
        sigma = getattr(self, "_init_noise_sigma", None)
        if sigma is None:
            _, sigma, _ = _native.scheduler_schedule(self._class_name, self._config_as_json(), None)
        return float(sigma)

    @property
    def order(self) -> int:
        _, _, order = _native.scheduler_schedule(self._class_name, self._config_as_json(), None)
        return int(order)

    @property
    def compatibles(self) -> List[Type["SchedulerMixin"]]:
        """Every scheduler class of this build (all take each other's configs)."""
        return [_CLASSES[name] for name in scheduler_classes()]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "config":
            raise AttributeError("scheduler.config is read-only; use X.from_config(config, key=value)")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(dict(self.config), indent=2, sort_keys=True)}"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and dict(self.config) == dict(other.config)  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


def scheduler_classes() -> List[str]:
    """The diffusers class names of the schedulers this build has, in sd-core's registry order."""
    return list(_native.scheduler_classes())


def scheduler_names() -> List[str]:
    """Every scheduler name sd-core accepts: class names and short names (`euler`, `ddim`, ...)."""
    return list(_native.scheduler_names())


def scheduler_from_name(name: str, config: Union[Mapping[str, Any], SchedulerMixin, None] = None, **kwargs: Any) -> SchedulerMixin:
    """The scheduler `name` names, built from `config` like `X.from_config(config, **overrides)`:
    `name` is a diffusers class name, a short name (`euler_karras`, `dpmpp_2m`) or an A1111 name
    ("DPM++ 2M Karras"), as `sd-cli --scheduler` takes them; `kwargs` override config values too.

        pipe.scheduler = sd_py.scheduler_from_name("DPM++ 2M Karras", pipe.scheduler.config)
    """
    class_name, overrides = _native.scheduler_entry(name)
    cls = _CLASSES[class_name]
    return cls.from_config(config, **{**json.loads(overrides), **kwargs})  # type: ignore[no-any-return]


def _make_class(name: str) -> Type[SchedulerMixin]:
    doc = (
        f"diffusers' `{name}`, computed by sd-core.\n\n"
        f"`{name}.from_pretrained(model, subfolder=\"scheduler\")`, `{name}.from_config(config)`, "
        f"`{name}(**config_values)`; assign to `pipe.scheduler`."
    )
    return type(name, (SchedulerMixin,), {"_class_name": name, "__module__": "sd_py", "__qualname__": name, "__doc__": doc})


_CLASSES: Dict[str, Type[SchedulerMixin]] = {name: _make_class(name) for name in scheduler_classes()}


def scheduler_class(name: str) -> Optional[Type[SchedulerMixin]]:
    """The scheduler class called `name` (a diffusers class name), or None."""
    return _CLASSES.get(name)
