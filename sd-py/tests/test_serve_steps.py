"""The model replica's step scheduler (`sd_py._serve_steps`, `SD_BATCHING=continuous`) on the tiny
pipeline, without Ray: requests join and leave between steps, each image is the one its request
gives alone, a short request is not held behind a long one, and a request whose caller is gone,
or whose step fails, leaves without disturbing the others."""

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

import sd_py.serve as s
from sd_py import StableDiffusionPipeline, scheduler_from_name

from conftest import replica_without_ray


@pytest.fixture
def model(pipe):
    """A model replica's object around the session's tiny pipeline, with its step scheduler."""
    return replica_without_ray(pipe)


def request(prompt="a red cube", height=64, width=None, seed=1, steps=3, guidance_scale=None, negative_prompt=None, sampler=None):
    """A checked text-to-image request, as the routes make them."""
    return s._run_params(prompt, height, width or height, seed, steps, guidance_scale, negative_prompt, sampler)


def image_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def alone(pipe, r) -> np.ndarray:
    if r.get("sampler"):
        pipe = StableDiffusionPipeline.from_pipe(pipe, scheduler=scheduler_from_name(r["sampler"], pipe.scheduler.config))
    out = pipe(r["prompt"], negative_prompt=r["negative_prompt"], height=r["height"], width=r["width"],
               num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"], generator=r["seed"])
    return np.asarray(out.images[0], dtype=np.int16)


async def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_requests_that_arrive_together_share_steps_and_give_their_own_images(model, pipe):
    requests = [
        request("a red cube", seed=11, steps=6),
        request("a blue sphere", seed=22, steps=3, guidance_scale=1.0),
        request("a green cone", seed=33, steps=4, sampler="euler_a", negative_prompt="blurry"),
    ]

    async def main():
        return await asyncio.gather(*(model._serve_one(r, model._steps.submit) for r in requests))

    pngs = asyncio.run(main())
    assert model.stats["largest_batch"] >= 2, model.stats
    assert model.stats["images"] == 3 and model.stats["pipeline_calls"] == 3
    for r, png in zip(requests, pngs):
        diff = np.abs(image_of(png) - alone(pipe, r)).max()
        assert diff <= 1, (r["prompt"], diff)
        assert f"Seed: {r['seed']}, Size: 64x64" in Image.open(io.BytesIO(png)).info["parameters"]
    assert model._queued == 0 and model._running_images == 0


def test_a_short_request_is_not_held_behind_a_long_one(model):
    done = {}

    async def timed(name, r):
        await model._serve_one(r, model._steps.submit)
        done[name] = time.monotonic()

    async def main():
        long = asyncio.ensure_future(timed("long", request("a long one", steps=300)))
        await wait_until(lambda: model._running_images == 1)
        await timed("short", request("a short one", steps=2))
        assert "long" not in done, "the long request finished before the short one"
        await long

    asyncio.run(main())
    assert done["short"] < done["long"]


def test_a_request_whose_caller_is_gone_leaves_at_the_next_step(model):
    async def main():
        r = {**request("a long one", steps=s.MAX_STEPS)}
        long = asyncio.ensure_future(model._serve_one(r, model._steps.submit))
        other = asyncio.ensure_future(model._serve_one(request("another", steps=3), model._steps.submit))
        await wait_until(lambda: model._running_images == 2)
        long.cancel()  # what model_pngs does when the client hangs up or the deadline passes
        with pytest.raises(asyncio.CancelledError):
            await long
        assert (await other)[:8] == b"\x89PNG\r\n\x1a\n"
        await wait_until(lambda: model.stats["stopped_calls"] == 1)

    asyncio.run(main())
    assert model.stats["failures"] == 0 and model._problem() is None
    assert model._queued == 0 and model._running_images == 0


def test_a_request_gone_before_its_run_started_is_not_run(model):
    r = {**request(), "gone": threading.Event(), "queued": False}
    r["gone"].set()

    async def main():
        return await model._steps.submit(r)

    with pytest.raises(s.RequestGone, match="before its run started"):
        asyncio.run(main())
    assert model.stats["images"] == 0


def test_a_failing_request_fails_alone(model):
    # Past the routes' checks: a model fault (non-finite latents) in one run of the tick.
    overflowing = {**request(steps=3), "guidance_scale": 1e308}

    async def main():
        bad = model._serve_one(overflowing, model._steps.submit)
        good = model._serve_one(request(steps=3), model._steps.submit)
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, FloatingPointError) and "after step 1 of 3" in str(bad), bad
    assert good[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.stats["failures"] == 1 and model.stats["images"] == 1


def test_a_bad_request_is_a_value_error_and_not_a_failure(model):
    async def main():
        return await model._serve_one(request(sampler="no such sampler"), model._steps.submit)

    with pytest.raises(ValueError, match="no such sampler"):
        asyncio.run(main())
    assert model.stats["failures"] == 0


def test_runs_of_different_sizes_take_turns(model, pipe):
    requests = [request("square", 64, steps=4, seed=5), request("wide", 64, 72, steps=4, seed=6)]

    async def main():
        return await asyncio.gather(*(model._serve_one(r, model._steps.submit) for r in requests))

    pngs = asyncio.run(main())
    for r, png in zip(requests, pngs):
        assert Image.open(io.BytesIO(png)).size == (r["width"], r["height"])
        assert np.abs(image_of(png) - alone(pipe, r)).max() <= 1


def test_the_batching_mode_is_read_when_a_replica_starts(monkeypatch):
    monkeypatch.delenv("SD_BATCHING", raising=False)
    assert s.batching_mode() == "continuous"
    for mode in ("request", " None "):
        monkeypatch.setenv("SD_BATCHING", mode)
        assert s.batching_mode() == mode.strip().lower()
    monkeypatch.setenv("SD_BATCHING", "step")
    with pytest.raises(ValueError, match="SD_BATCHING must be one of continuous, request, none, got 'step'"):
        s.batching_mode()


@pytest.mark.parametrize("mode", ["continuous", "none"])
def test_generate_png_goes_through_the_mode(model, mode):
    """`generate_png` (every text-to-image route's model call) in the modes that need no Ray:
    continuous batching shares steps, `none` runs the requests one at a time."""
    model.batching = mode
    model._one_at_a_time = asyncio.Lock()
    if mode == "none":
        model._steps = None
    requests = [request("a red cube", seed=1, steps=8), request("a blue sphere", seed=2, steps=8)]

    async def main():
        return await asyncio.gather(*(model.generate_png(r) for r in requests))

    pngs = asyncio.run(main())
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in pngs)
    assert model.stats["images"] == 2
    assert model.stats["largest_batch"] == (2 if mode == "continuous" else 1), model.stats
