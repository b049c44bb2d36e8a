"""Concurrency: the GIL is released while generating, and concurrent calls on one pipeline give
the images of serial calls."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sd_py import StableDiffusionPipeline
from conftest import SD2, pixels

JOBS = [("a red cube on a table", 1), ("a blue ball", 2), ("a green tree", 3), ("a small house", 4), ("a red cube on a table", 5), ("a cat", 6)]


def _generate(pipe, prompt, seed):
    return pipe(prompt, height=64, width=64, num_inference_steps=4, generator=seed).images[0]


def test_concurrent_calls_equal_serial_calls():
    pipe = StableDiffusionPipeline.from_pretrained(str(SD2))
    serial = [pixels(_generate(pipe, p, s)) for p, s in JOBS]
    with ThreadPoolExecutor(max_workers=4) as ex:
        concurrent = [pixels(img) for img in ex.map(lambda job: _generate(pipe, *job), JOBS)]
    for (prompt, seed), a, b in zip(JOBS, serial, concurrent):
        assert np.array_equal(a, b), (prompt, seed)


def test_concurrent_calls_with_different_schedulers_and_outputs():
    """Calls in flight are independent: a scheduler swap or another output type in one thread does
    not change another thread's run."""
    from sd_py import EulerDiscreteScheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(SD2))
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ddim = pipe.scheduler
    ref_ddim = pixels(_generate(pipe, "a cat", 9))
    pipe.scheduler = euler
    ref_euler = pixels(_generate(pipe, "a cat", 9))
    pipe.scheduler = ddim

    def run(i):
        if i % 2:
            # Each call reads pipe.scheduler once, at its start.
            p = StableDiffusionPipeline.from_pretrained(str(SD2), scheduler=euler)
            return "euler", pixels(_generate(p, "a cat", 9))
        return "ddim", pixels(_generate(pipe, "a cat", 9))

    with ThreadPoolExecutor(max_workers=4) as ex:
        for kind, image in ex.map(run, range(6)):
            assert np.array_equal(image, ref_euler if kind == "euler" else ref_ddim)


def test_gil_is_released_while_generating():
    """A Python thread keeps running while another thread is inside a long native call (here the
    VAE decode of a large image, which has no per-step callback into Python)."""
    pipe = StableDiffusionPipeline.from_pretrained(str(SD2))
    beats = []
    stop = threading.Event()

    def heartbeat():
        while not stop.is_set():
            beats.append(time.monotonic())
            time.sleep(0.005)

    t = threading.Thread(target=heartbeat)
    t.start()
    try:
        start = time.monotonic()
        # 384 px: the decode must outlast the heartbeat's resolution by far, on fast CPUs too
        # (at 256 px it had come down to 0.29 s).
        pipe("a wide landscape", height=384, width=384, num_inference_steps=1, generator=0)
        duration = time.monotonic() - start
    finally:
        stop.set()
        t.join()
    during = [b for b in beats if start <= b <= start + duration]
    gaps = np.diff([start] + during + [start + duration])
    assert duration > 0.3, duration  # long enough for the check to mean something
    # Holding the GIL would stall the heartbeat for the whole VAE decode, most of the run.
    assert gaps.max() < max(0.2, duration / 4), (gaps.max(), duration)
