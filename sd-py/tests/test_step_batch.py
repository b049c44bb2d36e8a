"""Step-level batching through sd_py (`start_run`, `step_runs`, `complete_run`): runs that join
and leave between steps give the images of `__call__`, and misuse is a clear Python error."""

import numpy as np
import pytest

import sd_py
from sd_py import StableDiffusionPipeline

from conftest import SD2


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


RUNS = [
    # (prompt, seed, steps, guidance, scheduler argument or None)
    ("a red cube", 1, 4, 7.5, None),
    ("a blue sphere", 2, 2, 1.0, None),
    ("a green cone", 3, 3, 5.0, "euler_a"),
]


def with_scheduler(pipe, name):
    return pipe if name is None else StableDiffusionPipeline.from_pipe(pipe, scheduler=sd_py.scheduler_from_name(name, pipe.scheduler.config))


def test_runs_joining_between_steps_give_the_images_of_call(pipe):
    alone = [
        with_scheduler(pipe, s)(p, height=64, width=64, num_inference_steps=n, guidance_scale=g, generator=seed, output_metadata=True).images[0]
        for p, seed, n, g, s in RUNS
    ]

    def start(i):
        p, seed, n, g, s = RUNS[i]
        return with_scheduler(pipe, s).start_run(p, height=64, width=64, num_inference_steps=n, guidance_scale=g, generator=seed, output_metadata=True)

    first = start(0)
    assert (first.total_steps, first.steps_done, first.images, first.finished, first.output) == (4, 0, 1, False, "pil")
    pipe.step_runs([first])
    # Two runs join at step 1 of the first: one without guidance, one with another scheduler.
    active = {0: first, 1: start(1), 2: start(2)}
    assert len({run.batch_key for run in active.values()}) == 1
    images = {}
    while active:
        pipe.step_runs(list(active.values()))
        for i in [i for i, run in active.items() if run.finished]:
            images[i] = pipe.complete_run(active.pop(i)).images[0]
    assert first.steps_done == 0 and first.finished  # completed: nothing left to read
    for i, expected in enumerate(alone):
        diff = np.abs(pixels(images[i]) - pixels(expected)).max()
        assert diff <= 1, f"run {i}: max |diff| {diff} levels against the call alone"
        assert images[i].info["parameters"] == expected.info["parameters"]


def test_latents_and_arrays_come_back_as_call_gives_them(pipe):
    run = pipe.start_run("a cat", height=64, width=64, num_inference_steps=2, generator=5, output_type="latent")
    while not run.finished:
        pipe.step_runs([run])
    latents = pipe.complete_run(run).images
    expected = pipe("a cat", height=64, width=64, num_inference_steps=2, generator=5, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-5)
    images, nsfw = pipe.complete_run(pipe.start_run("a cat", height=64, width=64, num_inference_steps=1, output_type="np"), return_dict=False)
    assert images.shape == (1, 64, 64, 3) and nsfw is None


def test_a_run_whose_step_fails_raises_alone(pipe):
    bad = pipe.start_run("a", height=64, width=64, num_inference_steps=2, guidance_scale=1e308, generator=1)
    good = pipe.start_run("a", height=64, width=64, num_inference_steps=2, generator=1)
    pipe.step_runs([bad, good])
    assert bad.finished and not good.finished
    with pytest.raises(FloatingPointError, match="after step 1 of 2 of the UNet"):
        pipe.complete_run(bad)
    pipe.step_runs([good])
    assert len(pipe.complete_run(good).images) == 1


def test_misuse_is_a_value_error(pipe):
    small = pipe.start_run("a", height=64, width=64, num_inference_steps=1)
    large = pipe.start_run("a", height=64, width=72, num_inference_steps=1)
    assert small.batch_key != large.batch_key
    with pytest.raises(ValueError, match="must share a batch key"):
        pipe.step_runs([small, large])
    pipe.step_runs([small])
    with pytest.raises(ValueError, match="no step left"):
        pipe.step_runs([small])
    pipe.complete_run(small)
    with pytest.raises(ValueError, match="completed already"):
        pipe.complete_run(small)
    with pytest.raises(ValueError, match="was completed"):
        pipe.step_runs([small])
    other = StableDiffusionPipeline.from_pretrained(str(SD2))
    with pytest.raises(ValueError, match="started by another pipeline"):
        other.step_runs([large])
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        pipe.start_run("a", height=63, width=64)
    with pytest.raises(ValueError, match="only .scale. in cross_attention_kwargs"):
        pipe.start_run("a", cross_attention_kwargs={"other": 1})
    with pytest.warns(UserWarning, match="StableDiffusionPipeline.start_run: ignoring unsupported argument"):
        pipe.start_run("a", height=64, width=64, num_inference_steps=1, no_such_argument=1)
    with pytest.raises(ValueError, match="unknown run argument `steps`"):
        pipe._native.start_run({"prompts": ["a"], "steps": 2})
