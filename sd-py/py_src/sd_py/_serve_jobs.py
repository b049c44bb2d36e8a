"""Jobs with progress on the Serve app, and AUTOMATIC1111's `/sdapi/v1/progress` and
`/sdapi/v1/interrupt` (the routes are declared in `serve.APIIngress`).

- `POST /v1/jobs` (body: A1111's txt2img JSON, checked as `/sdapi/v1/txt2img` checks it) answers
  202 `{"id", "state"}` at once; the run goes through the same model path as the other routes
  (`serve.model_pngs`: bounded queue, deadline, batching, metrics) in a task of the ingress.
- `GET /v1/jobs/{id}`: `state` (queued, running, done, failed, cancelled), `step`, `steps`,
  `progress` (0..1), `eta` (seconds, null until a step is done), `created`/`started`/`finished`
  (Unix times), `error`, and `result` when done (A1111's txt2img answer: base64 PNGs, parameters,
  info). 404 for an unknown (or expired) id.
- `DELETE /v1/jobs/{id}`: cancels a queued or running job (its run stops at the next step boundary,
  as a request whose client hung up); a finished job is removed. Answers the job.
- `GET /v1/jobs/{id}/events`: server-sent events: `progress` when the step changes (at most
  `REPORTS_PER_S` a second, so steps may be skipped), then one `done`, `failed` or `cancelled`
  event with the job, and the stream ends.
- `GET /sdapi/v1/progress`: the running jobs and `/sdapi/v1/txt2img|img2img` requests (both are
  entries of the store; a synchronous request's entry lives while it is answered).
- `POST /sdapi/v1/interrupt`: every running entry stops at its next step. A job ends `cancelled`
  ("interrupted"); a synchronous request is answered 409 (A1111 would answer the partly denoised
  images: a batched run cannot stop one image early, so we answer none).

The state lives in `JobStore`, a detached Ray actor named after the Serve application (made by
the ingress on first use, `get_if_exists`), reachable from every ingress and model replica. It is
bounded: at most `SD_MAX_JOBS` jobs (256; the oldest finished job makes room, and when every one
is queued or running a new one is refused with 503), finished jobs are dropped `SD_JOB_TTL_S`
(3600) after they end, and a job not finished `SD_REQUEST_TIMEOUT_S` + 60 s after it was made (its
ingress died) is failed. The model replicas report steps to it from a thread
(`ProgressReporter`), a few times a second in one call, and learn there which runs to stop: the
step callback itself only writes a number.
"""

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Set, Tuple

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import _serve_a1111
from . import _serve_compat as compat
from . import serve as _serve
from ._serve_metrics import serve_metrics

logger = logging.getLogger("ray.serve")

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")
# How often a model replica sends its step reports (and learns what to stop).
REPORTS_PER_S = 4
# Past the deadline, a job that is still not finished has lost its ingress.
_STALE_MARGIN_S = 60.0
NAMESPACE = "sd_py"
INTERRUPTED = "interrupted by POST /sdapi/v1/interrupt"


def max_jobs() -> int:
    return max(1, _serve._env_int("SD_MAX_JOBS", 256))


def job_ttl_s() -> float:
    return max(1.0, _serve._env_float("SD_JOB_TTL_S", 3600.0))


def run_steps(request: Dict[str, Any]) -> int:
    """The steps a model request runs: `int(steps * strength)` for an edit, as sd-core."""
    if "strength" in request:
        return max(1, int(request["steps"] * request["strength"]))
    return int(request["steps"])


class Jobs:
    """The store's state and rules, without Ray (`JobStore` serves it). Entries are jobs
    (`kind` "job") and synchronous A1111 requests (`kind` "txt2img"/"img2img", removed by `end`,
    never counted in the cap). `clock` is injectable for tests."""

    def __init__(self, max_jobs: int, ttl_s: float, stale_after_s: float, clock: Any = time.time) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.entries: Dict[str, Dict[str, Any]] = {}
        # Ids of jobs dropped (evicted, expired, deleted), newest last: a run of one may still be
        # going (a cancelled job is finished at once), and must still be told to stop.
        self.dropped: Dict[str, None] = {}
        # Bumped by every change; an entry keeps the value of its last change (`watch`).
        self.version = 0

    def _drop(self, entry_id: str) -> None:
        del self.entries[entry_id]
        self.dropped[entry_id] = None
        while len(self.dropped) > 4 * self.max_jobs:
            del self.dropped[next(iter(self.dropped))]

    def _changed(self, entry: Dict[str, Any]) -> None:
        self.version += 1
        entry["version"] = self.version

    def add(self, kind: str, images: int, steps: int) -> Optional[str]:
        """A new queued entry's id; None when `SD_MAX_JOBS` jobs are all queued or running."""
        now = self.clock()
        self.sweep()
        if kind == "job":
            jobs = [e for e in self.entries.values() if e["kind"] == "job"]
            if len(jobs) >= self.max_jobs:
                done = [e for e in jobs if e["state"] in FINAL_STATES]
                if not done:
                    return None
                self._drop(min(done, key=lambda e: e["finished"])["id"])
        entry = {
            "id": uuid.uuid4().hex,
            "kind": kind,
            "state": "queued",
            "images": images,
            "steps": steps,
            "parts": {},
            "created": now,
            "started": None,
            "finished": None,
            "error": None,
            "status": None,
            "result": None,
            "interrupted": False,
        }
        self.entries[entry["id"]] = entry
        self._changed(entry)
        return str(entry["id"])

    def sweep(self) -> None:
        """Drops jobs finished more than `ttl_s` ago; fails those unfinished `stale_after_s` after
        they were made (what ran them is gone)."""
        now = self.clock()
        for entry in list(self.entries.values()):
            if entry["state"] in FINAL_STATES:
                if now - entry["finished"] > self.ttl_s:
                    self._drop(entry["id"])
            elif now - entry["created"] > self.stale_after_s:
                if entry["kind"] == "job":
                    self._end(entry, "failed", error="lost: the job was not finished in time (its ingress may have died)", status=500)
                else:
                    del self.entries[entry["id"]]

    def report(self, updates: List[Tuple[str, int, int]], active: List[str]) -> List[str]:
        """Takes `(id, part, step)` reports of a model replica (step 0: its run started) and
        answers which of the `active` ids it runs should stop (cancelled or interrupted)."""
        now = self.clock()
        for entry_id, part, step in updates:
            entry = self.entries.get(entry_id)
            if entry is None or entry["state"] in FINAL_STATES:
                continue
            entry["parts"][part] = max(step, entry["parts"].get(part, 0))
            if entry["state"] == "queued":
                entry["state"], entry["started"] = "running", now
            self._changed(entry)
        stop = []
        for entry_id in active:
            entry = self.entries.get(entry_id)
            if entry_id in self.dropped or (entry is not None and (entry["interrupted"] or entry["state"] == "cancelled")):
                stop.append(entry_id)
        return stop

    def _end(self, entry: Dict[str, Any], state: str, **fields: Any) -> None:
        entry.update(state=state, finished=self.clock(), **fields)
        self._changed(entry)

    def finish(self, entry_id: str, result: Any) -> Optional[str]:
        """Records a job's result (a synchronous entry is removed); answers its state (a job
        cancelled meanwhile stays cancelled and its result is dropped)."""
        entry = self.entries.get(entry_id)
        if entry is None:
            return None
        if entry["kind"] != "job":
            del self.entries[entry_id]
            return "done"
        if entry["state"] not in FINAL_STATES:
            entry["parts"] = {i: entry["steps"] for i in range(entry["images"])}
            # A run shorter than the replica's report interval may finish before any report.
            entry["started"] = entry["started"] or self.clock()
            self._end(entry, "done", result=result)
        return str(entry["state"])

    def fail(self, entry_id: str, error: str, status: int) -> Optional[str]:
        """Records a job's failure (a cancelled job stays cancelled); answers its state."""
        entry = self.entries.get(entry_id)
        if entry is None:
            return None
        if entry["state"] not in FINAL_STATES:
            self._end(entry, "failed", error=error, status=status)
        return str(entry["state"])

    def end(self, entry_id: str) -> bool:
        """Removes a synchronous entry; answers whether it was interrupted."""
        entry = self.entries.pop(entry_id, None)
        return bool(entry and entry["interrupted"])

    def cancel(self, entry_id: str) -> Optional[Dict[str, Any]]:
        """Cancels a queued or running job (its run is stopped by the replica's next report),
        or removes a finished one; answers the job (None: unknown)."""
        entry = self.entries.get(entry_id)
        if entry is None or entry["kind"] != "job":
            return None
        if entry["state"] in FINAL_STATES:
            self._drop(entry_id)
        else:
            self._end(entry, "cancelled", error="cancelled by DELETE /v1/jobs/{id}", status=409)
        return self.snapshot(entry_id, entry)

    def interrupt(self) -> int:
        """Marks every running entry to stop at its next step (jobs end cancelled at once);
        answers how many."""
        running = [e for e in self.entries.values() if e["state"] == "running" and not e["interrupted"]]
        for entry in running:
            entry["interrupted"] = True
            if entry["kind"] == "job":
                self._end(entry, "cancelled", error=INTERRUPTED, status=409)
            else:
                self._changed(entry)
        return len(running)

    def _progress(self, entry: Dict[str, Any]) -> float:
        total = entry["images"] * entry["steps"]
        return min(1.0, sum(entry["parts"].values()) / total) if total else 0.0

    def snapshot(self, entry_id: str, entry: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        """A job as `GET /v1/jobs/{id}` answers it (None: unknown, or not a job)."""
        entry = entry or self.entries.get(entry_id)
        if entry is None or entry["kind"] != "job":
            return None
        progress = self._progress(entry)
        eta = None
        if entry["state"] in FINAL_STATES:
            eta = 0.0
        elif entry["started"] is not None and progress > 0:
            eta = (self.clock() - entry["started"]) * (1 - progress) / progress
        return {
            "id": entry["id"],
            "state": entry["state"],
            # Steps per image; with several images, the mean over them.
            "step": int(progress * entry["steps"]),
            "steps": entry["steps"],
            "images": entry["images"],
            "progress": progress,
            "eta": eta,
            "created": entry["created"],
            "started": entry["started"],
            "finished": entry["finished"],
            "error": entry["error"],
            "result": entry["result"],
            "version": entry["version"],
        }

    def a1111_progress(self) -> Dict[str, Any]:
        """A1111's `/sdapi/v1/progress` answer: the running entry that started first (else the
        oldest queued one); `job_count` counts every queued or running entry."""
        active = [e for e in self.entries.values() if e["state"] in ("queued", "running")]
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(active), "job_timestamp": "0"}
        state |= {"job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        answer: Dict[str, Any] = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        if not active:
            return answer
        current = min(active, key=lambda e: (e["started"] is None, e["started"] or e["created"]))
        progress = self._progress(current)
        step = int(progress * current["steps"])
        eta = 0.0
        if current["started"] is not None and progress > 0:
            eta = (self.clock() - current["started"]) * (1 - progress) / progress
        started = current["started"] or current["created"]
        state |= {"interrupted": current["interrupted"], "job": f"{current['kind']}({current['id']})"}
        state |= {"job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(started))}
        state |= {"sampling_step": step, "sampling_steps": current["steps"]}
        answer |= {"progress": progress, "eta_relative": eta}
        answer["textinfo"] = f"{current['kind']} {current['id']}: {current['state']}, step {step}/{current['steps']}"
        return answer


class JobStore:
    """The Ray actor over `Jobs` (async: one event loop, so no locks; `watch` waits for a change
    without holding the others up). Made by `job_store`."""

    def __init__(self, max_jobs: int, ttl_s: float, stale_after_s: float) -> None:
        self.jobs = Jobs(max_jobs, ttl_s, stale_after_s)
        self._change: Optional[asyncio.Event] = None

    def _notify(self) -> None:
        if self._change is not None:
            self._change.set()
            self._change = None

    async def add(self, kind: str, images: int, steps: int) -> Optional[str]:
        entry_id = self.jobs.add(kind, images, steps)
        self._notify()
        return entry_id

    async def report(self, updates: List[Tuple[str, int, int]], active: List[str]) -> List[str]:
        stop = self.jobs.report(updates, active)
        if updates:
            self._notify()
        return stop

    async def finish(self, entry_id: str, result: Any) -> Optional[str]:
        state = self.jobs.finish(entry_id, result)
        self._notify()
        return state

    async def fail(self, entry_id: str, error: str, status: int) -> Optional[str]:
        state = self.jobs.fail(entry_id, error, status)
        self._notify()
        return state

    async def end(self, entry_id: str) -> bool:
        return self.jobs.end(entry_id)

    async def cancel(self, entry_id: str) -> Optional[Dict[str, Any]]:
        job = self.jobs.cancel(entry_id)
        self._notify()
        return job

    async def interrupt(self) -> int:
        count = self.jobs.interrupt()
        self._notify()
        return count

    async def get(self, entry_id: str) -> Optional[Dict[str, Any]]:
        self.jobs.sweep()
        return self.jobs.snapshot(entry_id)

    async def a1111_progress(self) -> Dict[str, Any]:
        self.jobs.sweep()
        return self.jobs.a1111_progress()

    async def watch(self, entry_id: str, after_version: int, timeout_s: float) -> Optional[Dict[str, Any]]:
        """The job once it changed after `after_version` (at once if it has), or as it is after
        `timeout_s`; None when unknown."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.jobs.snapshot(entry_id)
            remaining = deadline - time.monotonic()
            if job is None or job["version"] > after_version or remaining <= 0:
                return job
            if self._change is None:
                self._change = asyncio.Event()
            try:
                await asyncio.wait_for(self._change.wait(), remaining)
            except asyncio.TimeoutError:
                pass


def store_name() -> Optional[str]:
    """The store's actor name: one per Serve application (None outside a Serve replica)."""
    try:
        from ray import serve

        return f"sd_py-jobs:{serve.get_replica_context().app_name}"
    except Exception:
        return None


def job_store(ingress: Any) -> Any:
    """The ingress's handle on the application's `JobStore` (made when missing), or None outside
    a Serve replica (the routes then run untracked; jobs are refused)."""
    store = getattr(ingress, "_job_store", None)
    if store is not None:
        return store
    import ray

    name = store_name()
    if name is None or not ray.is_initialized():
        return None
    stale_after_s = _serve.request_timeout_s() + _STALE_MARGIN_S
    # Detached, so that a restarted ingress finds its jobs (get_if_exists); no CPU reserved: it
    # only keeps small records.
    store = (
        ray.remote(JobStore)
        .options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0)
        .remote(max_jobs(), job_ttl_s(), stale_after_s)
    )
    ingress._job_store = store
    return store


def _tagged(requests: List[Dict[str, Any]], entry_id: str, steps: int) -> List[Dict[str, Any]]:
    """The model requests of an entry, marked for the replica's `ProgressReporter`."""
    name = store_name()
    return [{**r, "job": {"id": entry_id, "part": i, "steps": steps, "store": name}} for i, r in enumerate(requests)]


def _no_store(e: Exception) -> JSONResponse:
    logger.warning("job store unavailable: %s", e)
    return _serve._failure_answer(503, "error", f"the job store is unavailable, try again: {e}")


# Background tasks of the ingress's jobs (a task that nothing references may be collected).
_TASKS: Set["asyncio.Task[None]"] = set()


async def create(http_request: Request, ingress: Any) -> JSONResponse:
    """`POST /v1/jobs`."""
    try:
        body = await compat.read_json(http_request, images=0)
        parameters, requests = _serve_a1111.validate_txt2img(body)
    except _serve.BadRequest as e:
        return _serve._failure_answer(e.status_code, "bad_request", str(e))
    store = job_store(ingress)
    if store is None:
        return _serve._failure_answer(503, "error", "jobs need the app under Ray Serve (no job store)")
    steps = run_steps(requests[0])
    try:
        job_id = await store.add.remote("job", len(requests), steps)
    except Exception as e:
        return _no_store(e)
    if job_id is None:
        message = f"too many jobs: all SD_MAX_JOBS ({max_jobs()}) are queued or running, try again later"
        return _serve._failure_answer(503, "overloaded", message)
    remote = ingress.handle.generate_png.remote
    task = asyncio.get_running_loop().create_task(_run_job(store, job_id, remote, parameters, _tagged(requests, job_id, steps)))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return JSONResponse({"id": job_id, "state": "queued"}, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


async def _run_job(store: Any, job_id: str, remote: Any, parameters: Dict[str, Any], requests: List[Dict[str, Any]]) -> None:
    try:
        pngs = await _serve.model_pngs(remote, requests)
        images = [compat.b64_png(png) for png in pngs] if parameters["send_images"] else []
        info = _serve_a1111.info(parameters, requests, pngs)
        await store.finish.remote(job_id, {"images": images, "parameters": parameters, "info": json.dumps(info)})
    except _serve.ModelError as e:
        state = await store.fail.remote(job_id, str(e), e.status_code)
        if state != "cancelled":
            serve_metrics().failed(e.kind)
    except Exception as e:  # never lose a job silently
        logger.exception("job %s failed", job_id)
        await store.fail.remote(job_id, f"the job failed: {e}", 500)
        serve_metrics().failed("error")


def _public(job: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in job.items() if k != "version"}


def _unknown(job_id: str) -> JSONResponse:
    return JSONResponse({"detail": f"no job {job_id!r} (unknown, or expired after SD_JOB_TTL_S)"}, status_code=404)


async def get(job_id: str, ingress: Any) -> JSONResponse:
    """`GET /v1/jobs/{id}`."""
    return await _answer_job(job_id, ingress, lambda store: store.get.remote(job_id))


async def delete(job_id: str, ingress: Any) -> JSONResponse:
    """`DELETE /v1/jobs/{id}`."""
    return await _answer_job(job_id, ingress, lambda store: store.cancel.remote(job_id))


async def _answer_job(job_id: str, ingress: Any, call: Callable[[Any], Any]) -> JSONResponse:
    """The job that `call(store)` returns, 404 when there is none (or no store yet)."""
    store = job_store(ingress)
    if store is None:
        return _unknown(job_id)
    try:
        job = await call(store)
    except Exception as e:
        return _no_store(e)
    return _unknown(job_id) if job is None else JSONResponse(_public(job))


def _event(name: str, job: Dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(_public(job))}\n\n"


async def events(job_id: str, ingress: Any) -> Any:
    """`GET /v1/jobs/{id}/events`: server-sent events until the job ends."""
    store = job_store(ingress)
    job = None if store is None else await store.get.remote(job_id)
    if job is None:
        return _unknown(job_id)

    async def stream() -> AsyncIterator[str]:
        version, step = -1, -1
        while True:
            job = await store.watch.remote(job_id, version, 15.0)
            if job is None:  # removed by DELETE or expired
                yield f"event: failed\ndata: {json.dumps({'id': job_id, 'state': 'failed', 'error': 'the job is gone'})}\n\n"
                return
            if job["version"] == version:
                yield ": keep-alive\n\n"  # a comment, so that proxies keep the stream open
                continue
            version = job["version"]
            if job["state"] in FINAL_STATES:
                yield _event(job["state"], job)
                return
            if job["step"] != step:
                step = job["step"]
                yield _event("progress", job)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def tracked_pngs(ingress: Any, kind: str, remote: Any, requests: List[Dict[str, Any]]) -> List[bytes]:
    """`serve.model_pngs` for a synchronous A1111 request, entered in the store while it runs (for
    `/sdapi/v1/progress` and `/sdapi/v1/interrupt`). An interrupted one raises `ModelError` 409."""
    store = job_store(ingress)
    entry_id = None
    steps = run_steps(requests[0])
    if store is not None:
        try:
            entry_id = await store.add.remote(kind, len(requests), steps)
        except Exception as e:  # the request runs anyway, unseen by progress
            logger.warning("job store unavailable: %s", e)
    if entry_id is None:
        return await _serve.model_pngs(remote, requests)
    try:
        return await _serve.model_pngs(remote, _tagged(requests, entry_id, steps))
    except _serve.ModelError as e:
        if e.kind == "cancelled":
            raise _serve.ModelError(INTERRUPTED, 409, "cancelled") from None
        raise
    finally:
        store.end.remote(entry_id)  # not awaited: the answer need not wait for it


async def a1111_progress(ingress: Any) -> Dict[str, Any]:
    """`GET /sdapi/v1/progress`."""
    store = job_store(ingress)
    if store is None:
        return Jobs(1, 1.0, 1.0).a1111_progress()
    return dict(await store.a1111_progress.remote())


async def a1111_interrupt(ingress: Any) -> Dict[str, Any]:
    """`POST /sdapi/v1/interrupt` (A1111 answers an empty object)."""
    store = job_store(ingress)
    if store is not None:
        count = await store.interrupt.remote()
        logger.info("/sdapi/v1/interrupt: %d running generation(s) to stop", count)
    return {}


class ProgressReporter:
    """A model replica's side: the step callbacks record `(id, part) -> step` (a dict write); a
    thread sends what changed to the store `REPORTS_PER_S` times a second, in one call, and sets
    the `gone` event (serve.py's cancellation: the run stops at its next step) of the requests the
    store says to stop. Requests without a `job` tag are ignored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Dict[Tuple[str, str, int], int] = {}
        # (store, id) -> the gone events of its requests this replica holds.
        self._active: Dict[Tuple[str, str], List[threading.Event]] = {}
        self._stores: Dict[str, Any] = {}
        self._thread: Optional[threading.Thread] = None

    def register(self, request: Dict[str, Any]) -> None:
        job = request.get("job")
        if not job:
            return
        with self._lock:
            self._active.setdefault((job["store"], job["id"]), []).append(request["gone"])
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sd-job-progress", daemon=True)
                self._thread.start()

    def unregister(self, request: Dict[str, Any]) -> None:
        job = request.get("job")
        if not job:
            return
        with self._lock:
            key = (job["store"], job["id"])
            events = self._active.get(key, [])
            if request["gone"] in events:
                events.remove(request["gone"])
            if not events:
                self._active.pop(key, None)

    def step(self, batch: List[Dict[str, Any]], step: int) -> None:
        """Called at the start of a run (step 0) and after each step."""
        with self._lock:
            for r in batch:
                job = r.get("job")
                if job:
                    self._pending[(job["store"], job["id"], job["part"])] = step

    def _store(self, name: str) -> Any:
        import ray

        if name not in self._stores:
            self._stores[name] = ray.get_actor(name, namespace=NAMESPACE)
        return self._stores[name]

    def _loop(self) -> None:
        while True:
            time.sleep(1.0 / REPORTS_PER_S)
            self.flush(self._send)

    def _send(self, name: str, updates: List[Tuple[str, int, int]], ids: List[str]) -> List[str]:
        import ray

        try:
            return list(ray.get(self._store(name).report.remote(updates, ids), timeout=5))
        except Exception:
            self._stores.pop(name, None)  # looked up again next time (the store may be new)
            raise

    def flush(self, send: Any) -> None:
        """Sends the pending steps and the active ids to each store (`send(name, updates, ids)`
        answers the ids to stop) and sets the stopped requests' `gone` events."""
        with self._lock:
            pending, self._pending = self._pending, {}
            active = list(self._active)
        by_store: Dict[str, Tuple[List[Tuple[str, int, int]], List[str]]] = {}
        for (name, entry_id, part), step in pending.items():
            by_store.setdefault(name, ([], []))[0].append((entry_id, part, step))
        for name, entry_id in active:
            by_store.setdefault(name, ([], []))[1].append(entry_id)
        for name, (updates, ids) in by_store.items():
            try:
                stop = send(name, updates, ids)
            except Exception as e:  # progress is best effort: the runs go on
                logger.warning("job progress not reported to %s: %s", name, e)
                continue
            with self._lock:
                for entry_id in stop:
                    for event in self._active.get((name, entry_id), []):
                        event.set()
