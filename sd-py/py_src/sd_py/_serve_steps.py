"""The model replica's step scheduler: step-level continuous batching of text-to-image requests
(`SD_BATCHING=continuous`, the default of `sd_py.serve`).

Every request the replica accepts becomes a run of its own (`StableDiffusionPipeline.start_run`:
its prompt encoded, its noise drawn from its seed, its own scheduler state). One thread steps the
runs: at each tick it takes the runs that can share a UNet call (same latent size, prompt length,
LoRA and LoRA scale; steps, guidance, sampler and seed may differ), at most `max_images` images,
and runs one denoising step of all of them in one call (`step_runs`). A request that arrives joins
at the next tick, a finished one leaves for its VAE decode at once, and one whose caller is gone
(hang-up, deadline, job cancel) is dropped at the next tick without disturbing the others. So a
short request is never held behind a long one, and a request gives the same image alone or
batched (within 1 level of 8-bit pixels: the same per-run operations).

When runs of several sizes are active, the ticks take turns: each tick steps the group of the run
that waited longest for a step.
"""

import asyncio
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ._serve_metrics import serve_metrics

logger = logging.getLogger("ray.serve")

if TYPE_CHECKING:  # pragma: no cover
    from .serve import StableDiffusionV2


class RequestGone(Exception):
    """A request's run was stopped, or never started, because its caller is gone (the client hung
    up, the deadline passed, or its job was cancelled). `sd_py.serve.RequestGone` is this class."""


class _Job:
    """One request in the step scheduler: waiting to start, then running (`run` set)."""

    _arrivals = itertools.count()

    def __init__(self, request: Dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.future: "asyncio.Future[bytes]" = loop.create_future()
        self.arrival = next(self._arrivals)
        self.run: Any = None
        self.pipe: Any = None
        # The tick that last stepped it (-1: none yet), for taking turns between groups.
        self.last_tick = -1

    @property
    def gone(self) -> bool:
        return self.request["gone"].is_set()

    def key(self) -> Tuple[Any, ...]:
        """Runs with equal keys may share a UNet call: sd-core's batch key and the LoRA."""
        return (self.run.batch_key, self.request.get("lora"), self.request.get("lora_scale"))

    def answer(self, png: bytes) -> None:
        """Answers the request's `submit` with its PNG (from the scheduler's thread)."""
        self.loop.call_soon_threadsafe(self._settle, png, None)

    def fail(self, error: BaseException) -> None:
        """Raises `error` from the request's `submit` (from the scheduler's thread)."""
        self.loop.call_soon_threadsafe(self._settle, None, error)

    def _settle(self, png: Optional[bytes], error: Optional[BaseException]) -> None:
        if self.future.done():  # cancelled: the caller is gone
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(png)


class StepScheduler:
    """Step-level continuous batching over a model replica's pipeline (see the module's doc).
    `model` is the replica (`sd_py.serve.StableDiffusionV2`): its pipeline, LoRA and sampler
    helpers, stats, gauges and job progress; `png` turns a PIL image into the answer."""

    def __init__(self, model: "StableDiffusionV2", max_images: int, png: Callable[[Any], bytes]) -> None:
        self._model = model
        self._max_images = max(1, max_images)
        self._png = png
        self._lock = threading.Condition()
        self._pending: List[_Job] = []
        self._thread: Optional[threading.Thread] = None
        self._ticks = 0

    async def submit(self, request: Dict[str, Any]) -> bytes:
        """The PNG of a text-to-image request (the keys of `sd_py.serve._run_params`, with its
        `gone` event); raises what failed it. Cancelling the await sets nothing here: the caller
        sets `gone`, and the run is dropped at the next tick."""
        job = _Job(request, asyncio.get_running_loop())
        with self._lock:
            self._pending.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sd-step-scheduler", daemon=True)
                self._thread.start()
            self._lock.notify()
        return await job.future

    # -- the scheduler's thread --

    def _loop(self) -> None:
        active: List[_Job] = []
        while True:
            try:
                self._tick(active)
            except Exception as e:  # a bug of ours: fail what runs, keep serving
                logger.exception("step scheduler: a tick failed; failing its %d runs", len(active))
                for job in active:
                    if job.run is not None:
                        self._model._track_running(-job.run.images)
                    job.fail(e)
                active.clear()

    def _tick(self, active: List[_Job]) -> None:
        """Admits the requests that arrived, drops the gone ones, steps one batch and completes
        the runs it finished. `active` is changed in place."""
        for job in self._take_pending(wait=not active):
            if self._start(job):
                active.append(job)
        active[:] = [job for job in active if not self._dropped_if_gone(job)]
        if not active:
            return
        batch = self._next_batch(active)
        self._step(batch)
        for job in batch:
            if job.run is None:  # its step failed and was answered
                active.remove(job)
            elif job.run.finished:
                active.remove(job)
                self._complete(job)

    def _take_pending(self, wait: bool) -> List[_Job]:
        """The requests that arrived since the last tick; waits for one when nothing runs."""
        with self._lock:
            while wait and not self._pending:
                self._lock.wait()
            jobs, self._pending = self._pending, []
        return jobs

    def _start(self, job: _Job) -> bool:
        """Starts a request's run (its prompt encoded, its noise drawn); False when it failed or
        its caller left before."""
        model, r = self._model, job.request
        model._dequeue([r])
        if job.gone:
            job.fail(RequestGone("gone before its run started"))
            return False
        try:
            job.pipe = model._with_sampler(model.pipe, r.get("sampler"))
            job.run = model._with_lora(
                r,
                lambda **lora: job.pipe.start_run(
                    r["prompt"],
                    negative_prompt=r["negative_prompt"],
                    height=r["height"],
                    width=r["width"],
                    num_inference_steps=r["steps"],
                    guidance_scale=r["guidance_scale"],
                    generator=r["seed"],
                    output_metadata=True,
                    **lora,
                ),
            )
        except Exception as e:
            model._count_failure(e)
            job.fail(e)
            return False
        model._track_running(job.run.images)
        model._progress.step([r], 0)
        return True

    def _dropped_if_gone(self, job: _Job) -> bool:
        """Drops the run of a request whose caller is gone (answering it `RequestGone`)."""
        if not job.gone:
            return False
        self._model._track_running(-job.run.images)
        self._model._count_stopped()
        job.fail(RequestGone(f"gone (stopped after step {job.run.steps_done})"))
        return True

    def _next_batch(self, active: List[_Job]) -> List[_Job]:
        """The runs of the next tick: those sharing a key with the run that waited longest for a
        step, oldest first, up to `max_images` images (at least one run)."""
        first = min(active, key=lambda job: (job.last_tick, job.arrival))
        key = first.key()
        batch, images = [], 0
        for job in sorted(active, key=lambda job: job.arrival):
            if job.key() != key:
                continue
            if batch and images + job.run.images > self._max_images:
                break
            batch.append(job)
            images += job.run.images
        return batch

    def _step(self, batch: List[_Job]) -> None:
        """One denoising step of `batch`; when the shared call fails, each run is stepped alone, so
        that one bad run fails only itself."""
        self._ticks += 1
        started = time.monotonic()
        try:
            self._step_runs(batch)
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0], e)
            else:
                for job in batch:
                    try:
                        self._step_runs([job])
                    except Exception as e1:
                        self._fail(job, e1)
        serve_metrics().step_seconds.observe(time.monotonic() - started)
        self._model._note_batch(sum(job.run.images for job in batch if job.run is not None))
        for job in batch:
            if job.run is not None:
                job.last_tick = self._ticks
                self._model._progress.step([job.request], job.run.steps_done)

    def _step_runs(self, batch: List[_Job]) -> None:
        runs = [job.run for job in batch]
        self._model._with_lora(batch[0].request, lambda **_: self._model.pipe.step_runs(runs))

    def _fail(self, job: _Job, error: Exception) -> None:
        """Ends a run whose step failed (the whole call, or its own step)."""
        self._model._count_failure(error)
        self._model._track_running(-job.run.images)
        job.run = None
        job.fail(error)

    def _complete(self, job: _Job) -> None:
        """Decodes a finished run and answers its request (or the error of its failed step)."""
        run, model = job.run, self._model
        model._track_running(-run.images)
        try:
            out = model._counted(run.images, lambda: job.pipe.complete_run(run))
            job.answer(self._png(out.images[0]))
        except Exception as e:
            job.fail(e)
