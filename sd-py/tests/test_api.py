"""The diffusers-shaped API: loading, schedulers, call arguments, outputs, callbacks, errors."""

import copy
import json
import pickle
import shutil
import warnings

import numpy as np
import pytest

import sd_py
from sd_py import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from conftest import PIPELINES, SD1, SD2, pixels, read_safetensors


class FakeTorchDtype:
    """What sd_py sees of a torch dtype: only its str()."""

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return f"torch.{self.name}"


class FakeTorchDevice:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


FakeTorchDevice.__name__ = "device"


class FakeTorchGenerator:
    def __init__(self, seed, device="cpu"):
        self.seed = seed
        self.device = FakeTorchDevice(device)
        self.device.type = device.split(":")[0]

    def initial_seed(self):
        return self.seed


# ---- schedulers ----


def test_scheduler_classes_come_from_the_registry():
    classes = sd_py.scheduler_classes()
    assert "EulerDiscreteScheduler" in classes and "DDIMScheduler" in classes
    for name in classes:
        cls = getattr(sd_py, name)
        assert issubclass(cls, sd_py.SchedulerMixin)
        assert cls.__name__ == name and cls.__module__ == "sd_py"
        assert name in sd_py.__all__
    names = sd_py.scheduler_names()
    assert set(classes) <= set(names) and "euler" in names
    with pytest.raises(AttributeError, match="no scheduler"):
        sd_py.NoSuchScheduler  # noqa: B018


def test_scheduler_from_pretrained_reads_the_subfolder(sd2_path):
    s = EulerDiscreteScheduler.from_pretrained(sd2_path, subfolder="scheduler")
    raw = json.loads((SD2 / "scheduler" / "scheduler_config.json").read_text())
    assert s.config["_class_name"] == "EulerDiscreteScheduler"
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "num_train_timesteps", "steps_offset"):
        assert s.config[key] == raw[key], key
    # Keys Euler has and the DDIM config lacks take Euler's defaults (diffusers' from_config).
    assert s.config["use_karras_sigmas"] is False
    assert s.config.prediction_type == "v_prediction"  # FrozenDict attribute access
    assert "EulerDiscreteScheduler" in repr(s)
    with pytest.raises(FileNotFoundError):
        EulerDiscreteScheduler.from_pretrained(sd2_path, subfolder="no_such_folder")


def test_scheduler_config_is_frozen_and_reusable(pipe):
    config = pipe.scheduler.config
    assert isinstance(config, sd_py.FrozenDict)
    for mutate in (lambda: config.__setitem__("beta_start", 1.0), lambda: config.update(a=1), lambda: config.pop("beta_start")):
        with pytest.raises(TypeError):
            mutate()
    with pytest.raises(AttributeError):
        pipe.scheduler.config = {}
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config) == config
    euler = EulerDiscreteScheduler.from_config(config)
    assert type(euler).__name__ == "EulerDiscreteScheduler"
    assert euler.config["beta_end"] == config["beta_end"]
    # Overrides, as from_config(config, key=value).
    karras = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    assert karras.config["use_karras_sigmas"] is True
    assert "use_karras_sigmas" not in karras.config.get("_use_default_values", [])
    # A scheduler pickles (Ray may ship one between processes).
    again = pickle.loads(pickle.dumps(karras))
    assert again == karras and type(again) is type(karras)
    # Constructor keywords, as diffusers' schedulers take them.
    assert DDIMScheduler(beta_schedule="linear").config["beta_schedule"] == "linear"


def test_scheduler_bad_config_values_are_value_errors(pipe):
    with pytest.raises(ValueError, match="beta_schedule"):
        EulerDiscreteScheduler.from_config(pipe.scheduler.config, beta_schedule="no-such-schedule")
    with pytest.raises(ValueError):
        EulerDiscreteScheduler.from_config("not a config")
    with pytest.raises(TypeError):
        sd_py.SchedulerMixin()


def test_scheduler_schedule_matches_the_pipeline(pipe):
    s = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    s.set_timesteps(4)
    assert len(s.timesteps) == 4 and s.num_inference_steps == 4
    assert s.init_noise_sigma > 1.0
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(4)
    assert ddim.timesteps == [751.0, 501.0, 251.0, 1.0]
    assert ddim.init_noise_sigma == 1.0
    assert EulerDiscreteScheduler in s.compatibles


def test_scheduler_from_name(pipe):
    """sd-cli's names (class names, short names, A1111 names) give the class plus its overrides."""
    s = sd_py.scheduler_from_name("euler_karras", pipe.scheduler.config)
    assert type(s) is EulerDiscreteScheduler and s.config["use_karras_sigmas"] is True
    assert type(sd_py.scheduler_from_name("DDIM", pipe.scheduler.config)) is DDIMScheduler
    assert sd_py.scheduler_from_name("EulerDiscreteScheduler", timestep_spacing="trailing").config["timestep_spacing"] == "trailing"
    for name in sd_py.scheduler_names():
        assert isinstance(sd_py.scheduler_from_name(name, pipe.scheduler.config), sd_py.SchedulerMixin), name
    with pytest.raises(ValueError, match="unknown scheduler"):
        sd_py.scheduler_from_name("no-such-sampler")


def test_guidance_rescale(pipe):
    kw = dict(height=64, width=64, num_inference_steps=2, generator=4, output_type="np")
    plain = pipe("a cat", **kw).images
    rescaled = pipe("a cat", guidance_rescale=0.7, **kw).images
    assert not np.array_equal(plain, rescaled)
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe("a cat", guidance_rescale=-1, **kw)


def test_default_scheduler_is_the_models(pipe):
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # model_index.json of sd2-tiny


@pytest.mark.parametrize("name", sd_py.scheduler_classes())
def test_every_scheduler_generates(sd2_path, name):
    pipe = StableDiffusionPipeline.from_pretrained(sd2_path)
    cls = getattr(sd_py, name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    out = pipe("a red cube", height=64, width=64, num_inference_steps=3, generator=0)
    assert out.images[0].size == (64, 64)


def test_swapping_the_scheduler_changes_the_run(sd2_path):
    pipe = StableDiffusionPipeline.from_pretrained(sd2_path)
    ddim = pipe("a red cube", height=64, width=64, num_inference_steps=3, generator=5).images[0]
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler = pipe("a red cube", height=64, width=64, num_inference_steps=3, generator=5).images[0]
    assert not np.array_equal(pixels(ddim), pixels(euler))
    with pytest.raises(ValueError):
        pipe.scheduler = "euler"


# ---- loading ----


def cpu_has_bf16_products():
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512_BF16), read from Linux's
    CPU flags independently of sd-core's own detection, which the test checks."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def test_from_pretrained_dtypes(sd2_path):
    for dtype, expected in [
        (None, "float32"),
        ("float32", "float32"),
        ("float16", "float16"),
        (FakeTorchDtype("float16"), "float16"),
        (FakeTorchDtype("float32"), "float32"),
    ]:
        pipe = StableDiffusionPipeline.from_pretrained(sd2_path, torch_dtype=dtype)
        assert pipe.dtype == expected, dtype
    # bf16 on the CPU runs in bf16 where the CPU multiplies bf16 in hardware (AMX or
    # AVX512_BF16); elsewhere (AVX2-only CPUs, such as AMD Zen 3) it runs f32 and warns, since
    # emulated bf16 would be slower than f32.
    if cpu_has_bf16_products():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = StableDiffusionPipeline.from_pretrained(sd2_path, torch_dtype="bfloat16")
        assert not [w for w in caught if "instead of" in str(w.message)], [str(w.message) for w in caught]
        assert pipe.dtype == "bfloat16"
    else:
        with pytest.warns(UserWarning, match="running float32 instead of bfloat16: this CPU has neither"):
            pipe = StableDiffusionPipeline.from_pretrained(sd2_path, torch_dtype="bfloat16")
        assert pipe.dtype == "float32"
    image = pipe("a cat", height=64, width=64, num_inference_steps=2, generator=1).images[0]
    assert image.size == (64, 64)
    with pytest.raises(ValueError):
        StableDiffusionPipeline.from_pretrained(sd2_path, torch_dtype="int8")
    with pytest.raises(ValueError):
        StableDiffusionPipeline.from_pretrained(sd2_path, torch_dtype=3)


def test_fp16_only_model_in_float16():
    pipe = StableDiffusionPipeline.from_pretrained(str(SD1), torch_dtype=FakeTorchDtype("float16"), variant="fp16")
    out = pipe("a cat", height=64, width=64, num_inference_steps=2, generator=0, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_unknown_kwargs_warn(sd2_path):
    with pytest.warns(UserWarning, match="no_such_option"):
        StableDiffusionPipeline.from_pretrained(sd2_path, no_such_option=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StableDiffusionPipeline.from_pretrained(sd2_path, safety_checker=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline.from_pretrained(sd2_path)
    with pytest.warns(UserWarning, match="mystery"):
        pipe("a", height=64, width=64, num_inference_steps=1, mystery=True)


def test_to_returns_the_pipeline(sd2_path):
    pipe = StableDiffusionPipeline.from_pretrained(sd2_path)
    before = pipe("a", height=64, width=64, num_inference_steps=2, generator=1).images[0]
    assert pipe.to("cpu") is pipe
    assert pipe.to(FakeTorchDevice("cpu")) is pipe
    assert pipe.device == "cpu" and pipe.device.type == "cpu"
    assert pipe.to("float16") is pipe and pipe.dtype == "float16"
    assert pipe.to(device="cpu", dtype=FakeTorchDtype("float32")) is pipe and pipe.dtype == "float32"
    after = pipe("a", height=64, width=64, num_inference_steps=2, generator=1).images[0]
    assert np.array_equal(pixels(before), pixels(after))
    with pytest.raises(ValueError):
        pipe.to("tpu")


@pytest.mark.skipif(sd_py.cuda_is_available(), reason="this build has CUDA")
def test_to_cuda_without_cuda_is_a_clear_error(pipe):
    for device in ("cuda", FakeTorchDevice("cuda:0"), 0):
        with pytest.raises(RuntimeError, match="no CUDA support"):
            pipe.to(device)
    with pytest.raises(RuntimeError, match="no CUDA support"):
        StableDiffusionPipeline.from_pretrained(str(SD2), device="cuda")
    assert pipe.device == "cpu"


def test_missing_model_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        StableDiffusionPipeline.from_pretrained(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError):
        EulerDiscreteScheduler.from_pretrained(str(tmp_path / "no-such-model"), subfolder="scheduler")
    # A folder without the model files.
    with pytest.raises(FileNotFoundError):
        StableDiffusionPipeline.from_pretrained(str(tmp_path))


def test_corrupt_weights_are_os_errors_not_panics(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(SD2, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError) as info:
        StableDiffusionPipeline.from_pretrained(str(model))
    assert "diffusion_pytorch_model" in str(info.value)


def _fake_hub_cache(root, repo_id):
    """A Hugging Face cache holding `repo_id` = the sd2-tiny fixture, as huggingface_hub lays it out."""
    org, name = repo_id.split("/")
    repo = root / "hub" / f"models--{org}--{name}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(SD2, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha


def test_hub_ids_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    snapshot = _fake_hub_cache(tmp_path, "sd-test/tiny")
    scheduler = EulerDiscreteScheduler.from_pretrained("sd-test/tiny", subfolder="scheduler", local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained("sd-test/tiny", scheduler=scheduler, local_files_only=True)
    assert pipe.config["_name_or_path"] == "sd-test/tiny"
    assert str(snapshot) in repr(pipe._native)
    assert pipe("a", height=64, width=64, num_inference_steps=1, generator=0).images[0].size == (64, 64)
    # Not in the cache, offline: an OSError naming offline mode, and no network access.
    with pytest.raises(OSError, match="offline"):
        StableDiffusionPipeline.from_pretrained("sd-test/missing", local_files_only=True)
    with pytest.raises(OSError, match="offline"):
        EulerDiscreteScheduler.from_pretrained("sd-test/missing", subfolder="scheduler", local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="offline"):
        StableDiffusionPipeline.from_pretrained("sd-test/missing")


# ---- call arguments and outputs ----


def test_output_types(pipe):
    kw = dict(height=64, width=64, num_inference_steps=2, generator=3)
    pil = pipe("a red cube", **kw).images
    assert len(pil) == 1 and pil[0].size == (64, 64) and pil[0].mode == "RGB"
    arr = pipe("a red cube", output_type="np", **kw).images
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (1, 64, 64, 3)
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    # The PIL image is the numpy output rounded, as diffusers' numpy_to_pil.
    assert np.array_equal(np.round(arr[0] * 255).astype(np.int16), pixels(pil[0]))
    lat = pipe("a red cube", output_type="latent", **kw).images
    assert lat.shape == (1, 4, 8, 8) and lat.dtype == np.float32
    images, nsfw = pipe("a red cube", return_dict=False, **kw)
    assert nsfw is None and images[0].size == (64, 64)
    out = pipe("a red cube", **kw)
    assert out[0] is out.images and out["images"] is out.images and out.seeds == [3]
    with pytest.raises(ValueError, match="output_type"):
        pipe("a red cube", output_type="pt", **kw)


def test_np_output_matches_diffusers_decoded_tensor(sd2_path):
    """`output_type="np"` is diffusers' float output: compare with the decoded image diffusers
    computed for the sd2_ddim case."""
    from conftest import load_case

    case = load_case("sd2_ddim")
    refs = read_safetensors(PIPELINES / "sd2_ddim.safetensors")
    expected = np.clip(refs["decoded"].astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    pipe = StableDiffusionPipeline.from_pretrained(sd2_path)
    got = pipe(
        case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        generator=case["seed"],
        output_type="np",
    ).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 2e-3


def test_sizes_and_default_size(pipe):
    out = pipe("a", height=48, width=80, num_inference_steps=1, generator=0)
    assert out.images[0].size == (80, 48)
    assert pipe.default_sample_size == 64
    assert pipe("a", num_inference_steps=1, generator=0).images[0].size == (64, 64)


def test_prompt_lists_and_generator_lists(pipe):
    kw = dict(height=64, width=64, num_inference_steps=2)
    both = pipe(["a red cube", "a blue ball"], generator=[10, 20], **kw).images
    assert len(both) == 2
    alone = [pipe(p, generator=s, **kw).images[0] for p, s in (("a red cube", 10), ("a blue ball", 20))]
    for a, b in zip(both, alone):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    # num_images_per_prompt with one generator for the batch (diffusers' generator=one Generator).
    four = pipe(["a", "b"], num_images_per_prompt=2, generator=1, **kw)
    assert len(four.images) == 4 and four.seeds == [1]
    # A torch.Generator-like object gives the image of its seed.
    g = pipe("a red cube", generator=FakeTorchGenerator(10), **kw).images[0]
    assert np.array_equal(pixels(g), pixels(alone[0]))
    with pytest.warns(UserWarning, match="CUDA generator"):
        pipe("a red cube", generator=FakeTorchGenerator(10, "cuda"), **kw)
    # Negative seeds map as torch.manual_seed maps them.
    neg = pipe("a", generator=-1, **kw)
    assert neg.seeds == [2**64 - 1]
    # Without a generator a random seed is drawn and reported.
    rnd = pipe("a", **kw)
    assert len(rnd.seeds) == 1 and 0 <= rnd.seeds[0] < 2**64


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(height=65),
        dict(width=100),
        dict(height=0),
        dict(height=-8),
        dict(height=64.5),
        dict(num_inference_steps=0),
        dict(num_inference_steps=5000),
        dict(num_images_per_prompt=0),
        dict(guidance_scale=float("nan")),
        dict(guidance_scale="high"),
        dict(prompt=None),
        dict(prompt=3),
        dict(prompt=[]),
        dict(negative_prompt=["x", "y"]),
        # diffusers takes a list of negative prompts only with one entry per prompt.
        dict(prompt=["a cat", "a dog"], negative_prompt=["x"]),
        dict(generator=[1, 2]),
        dict(generator="seed"),
        dict(generator=2**64),
        dict(latents=np.zeros((1, 4, 8, 4))),
        dict(latents="noise"),
        dict(prompt_embeds=np.zeros((1, 77, 32))),
        dict(prompt=None, prompt_embeds=np.zeros((1, 77, 7))),
        dict(prompt=None, prompt_embeds="embeddings"),
        dict(prompt=None, prompt_embeds=np.zeros((1, 20, 32))),
        dict(prompt=None, prompt_embeds=np.zeros((1, 77, 32)), negative_prompt_embeds=np.zeros((2, 77, 32))),
        dict(negative_prompt="x", negative_prompt_embeds=np.zeros((1, 77, 32))),
        dict(eta=1.5),
        dict(guidance_rescale="lots"),
        dict(timesteps=[999, 500]),
        dict(callback_on_step_end=42),
    ],
)
def test_bad_arguments_are_value_errors(pipe, kwargs):
    args = dict(prompt="a cat", height=64, width=64, num_inference_steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError):
        pipe(**args)


def test_height_65_message(pipe):
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe("a cat", height=65, width=64, num_inference_steps=1)


def test_rust_panics_become_runtime_errors():
    from sd_py import _sd_py

    with pytest.raises(RuntimeError, match="boom") as info:
        _sd_py._panic_for_tests("boom")
    assert type(info.value) is RuntimeError  # not pyo3's PanicException (a BaseException)


# ---- callbacks and interruption ----


def test_callback_on_step_end(pipe):
    calls = []

    def cb(p, step, timestep, callback_kwargs):
        calls.append((p, step, timestep, dict(callback_kwargs)))
        return callback_kwargs

    out = pipe("a", height=64, width=64, num_inference_steps=4, generator=0, callback_on_step_end=cb, output_type="latent")
    assert [c[1] for c in calls] == [0, 1, 2, 3]
    assert all(c[0] is pipe for c in calls)
    s = DDIMScheduler.from_config(pipe.scheduler.config)
    s.set_timesteps(4)
    assert [c[2] for c in calls] == s.timesteps
    latents = [c[3]["latents"] for c in calls]
    assert all(set(c[3]) == {"latents"} for c in calls)
    assert all(l.dtype == np.float32 and l.shape == (1, 4, 8, 8) for l in latents)
    assert not np.array_equal(latents[0], latents[1])
    assert np.array_equal(latents[-1], out.images)

    # Without "latents" in the tensor inputs, callback_kwargs is empty, as in diffusers.
    seen = []
    pipe("a", height=64, width=64, num_inference_steps=2, generator=0,
         callback_on_step_end=lambda p, i, t, kw: seen.append(dict(kw)) or kw, callback_on_step_end_tensor_inputs=[])
    assert seen == [{}, {}]


def _latents_at_every_step(pipe, steps, **kwargs):
    captured = []

    def keep(p, step, timestep, kw):
        captured.append(kw["latents"].copy())
        return kw

    pipe("a", height=64, width=64, num_inference_steps=steps, generator=0, callback_on_step_end=keep, **kwargs)
    return captured


def test_callback_can_replace_the_latents(pipe):
    """The latents in the returned dict, or the array changed in place, are what the run goes on with."""
    every_step = _latents_at_every_step(pipe, 3)

    def swap_in_step_one(p, step, timestep, kw):
        return {"latents": every_step[0]} if step == 2 else kw

    def zero_in_place(p, step, timestep, kw):
        if step == 2:
            kw["latents"][...] = 0.0
        return kw

    def returns_nothing(p, step, timestep, kw):
        if step == 2:
            kw["latents"][...] = 0.0

    swapped = pipe("a", height=64, width=64, num_inference_steps=3, generator=0, callback_on_step_end=swap_in_step_one, output_type="latent")
    assert np.array_equal(swapped.images, every_step[0])
    for cb in (zero_in_place, returns_nothing):
        zeroed = pipe("a", height=64, width=64, num_inference_steps=3, generator=0, callback_on_step_end=cb, output_type="latent")
        assert not zeroed.images.any(), cb.__name__


@pytest.mark.parametrize(
    "returned, message",
    [
        (np.zeros((1, 4, 8, 4), np.float32), r"shape \[1, 4, 8, 4\], expected \[1, 4, 8, 8\]"),
        ("not latents", "must be an array of numbers"),
    ],
)
def test_callback_latents_of_the_wrong_kind_are_a_value_error(pipe, returned, message):
    with pytest.raises(ValueError, match=message):
        pipe("a", height=64, width=64, num_inference_steps=2, generator=0,
             callback_on_step_end=lambda p, i, t, kw: {"latents": returned})
    assert pipe("a", height=64, width=64, num_inference_steps=1, generator=0).images[0].size == (64, 64)


def test_callback_tensor_inputs_other_than_latents_are_a_value_error(pipe):
    with pytest.raises(ValueError, match="'prompt_embeds'"):
        pipe("a", height=64, width=64, num_inference_steps=1, generator=0,
             callback_on_step_end=lambda p, i, t, kw: kw, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])


def test_callback_exception_propagates(pipe):
    class Stop(Exception):
        pass

    seen = []

    def cb(p, step, timestep, kw):
        seen.append(step)
        if step == 1:
            raise Stop("enough")
        return kw

    with pytest.raises(Stop, match="enough"):
        pipe("a", height=64, width=64, num_inference_steps=5, generator=0, callback_on_step_end=cb)
    assert seen == [0, 1]
    # The pipeline still works afterwards.
    assert pipe("a", height=64, width=64, num_inference_steps=1, generator=0).images[0].size == (64, 64)


def test_interrupt_decodes_the_latents_of_that_step(pipe):
    """As diffusers: `pipe._interrupt = True` skips the remaining steps, and the call returns the
    latents of the step it was set at, decoded."""
    every_step = _latents_at_every_step(pipe, 5)
    seen = []

    def cb(p, step, timestep, kw):
        seen.append(step)
        if step == 1:
            p._interrupt = True
        return kw

    early = pipe("a", height=64, width=64, num_inference_steps=5, generator=0, callback_on_step_end=cb, output_type="latent")
    assert seen == [0, 1] and pipe.interrupt
    assert np.array_equal(early.images, every_step[1])

    # The image is the decoder's on those latents: the same as a full run whose last step is handed them.
    interrupted = pipe("a", height=64, width=64, num_inference_steps=5, generator=0, callback_on_step_end=cb).images[0]
    handed = pipe("a", height=64, width=64, num_inference_steps=5, generator=0,
                  callback_on_step_end=lambda p, i, t, kw: {"latents": every_step[1]} if i == 4 else kw).images[0]
    full = pipe("a", height=64, width=64, num_inference_steps=5, generator=0).images[0]
    assert np.array_equal(pixels(interrupted), pixels(handed))
    assert not np.array_equal(pixels(interrupted), pixels(full))
    # The call that started after the interrupt reset the flag, as diffusers does.
    assert not pipe.interrupt


def test_native_step_callback_protocol(pipe):
    """The native `on_step` behind callback_on_step_end: a falsy return or "cancel" stops the run
    with GenerationCancelled, "finish" ends it with the latents as they are, a malformed reply is a
    ValueError."""
    native = pipe._native

    def run(on_step, steps=3):
        args = {"prompts": ["a"], "height": 64, "width": 64, "num_inference_steps": steps, "seeds": [0], "output": "latent"}
        return native.generate(args, on_step=on_step, step_latents=True)

    assert issubclass(sd_py.GenerationCancelled, RuntimeError)
    for reply in (False, ("cancel", None)):
        with pytest.raises(sd_py.GenerationCancelled):
            run(lambda i, t, latents: reply)
    seen = []
    out = run(lambda i, t, latents: seen.append(latents) or ("finish" if i == 1 else "continue", None))
    assert len(seen) == 2 and (out.latents.data, out.latents.shape) == (seen[1].data, seen[1].shape)
    for reply, message in [(("stop", None), "unknown action `stop`"), (("continue", "text"), "pair"), (("continue", b"abc"), "pair"),
                           (("continue", b"\0\0\0\0"), "returned 1 latent values, the run has 256")]:
        with pytest.raises(ValueError, match=message):
            run(lambda i, t, latents: reply)


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long_prompt = " ".join(["word"] * 100)
    with caplog.at_level("WARNING", logger="sd_py"):
        pipe(long_prompt, height=64, width=64, num_inference_steps=1, generator=0)
    assert "truncated" in caplog.text


def test_lazy_import_does_not_load_the_extension():
    """`import sd_py.serve` must not need the native module (a Ray head node without a GPU
    driver imports the Serve app of a CUDA build)."""
    import subprocess
    import sys

    code = (
        "import sys, sd_py, sd_py.serve\n"
        "assert 'sd_py._sd_py' not in sys.modules, 'native module loaded'\n"
        "print(sd_py.serve.entrypoint is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_cuda_build_without_cuda_libraries_is_a_clear_import_error(monkeypatch):
    """The CUDA wheel's extension links libcuda.so.1 and the CUDA 13 libraries: where they are
    missing, the first use of the extension says so (scripts/ci/cuda-wheel.sh checks the real
    wheel); other import errors pass through unchanged."""
    def missing(name: str, package: str) -> None:
        raise ImportError("libcuda.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(sd_py, "import_module", missing)
    with pytest.raises(ImportError, match=r"CUDA build, and its native extension needs libcuda\.so\.1") as info:
        sd_py.__getattr__("StableDiffusionPipeline")
    assert "install the CPU wheel" in str(info.value) and isinstance(info.value.__cause__, ImportError)

    def other(name: str, package: str) -> None:
        raise ImportError("libfoo.so: cannot open shared object file")

    monkeypatch.setattr(sd_py, "import_module", other)
    with pytest.raises(ImportError, match=r"^libfoo\.so: cannot open shared object file$"):
        sd_py.__getattr__("StableDiffusionPipeline")
