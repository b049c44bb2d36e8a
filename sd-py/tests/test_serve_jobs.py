"""sd_py.serve's jobs (`/v1/jobs`) and AUTOMATIC1111's progress/interrupt: the store's rules and
the replica's reporter without Ray, then the routes through a real local Ray Serve over HTTP with
the sd2-tiny fixture model (one Serve application for the module)."""

import asyncio
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import pixels
from sd_py import _serve_jobs, serve
from sd_py._serve_jobs import Jobs, JobStore, ProgressReporter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def jobs(max_jobs=4, ttl_s=100.0, stale_after_s=500.0):
    clock = Clock()
    return Jobs(max_jobs, ttl_s, stale_after_s, clock=clock), clock


def test_job_lifecycle_progress_and_eta():
    store, clock = jobs()
    job_id = store.add("job", images=2, steps=10)
    assert len(job_id) == 32 and int(job_id, 16) >= 0  # uuid4 hex
    job = store.snapshot(job_id)
    assert (job["state"], job["step"], job["steps"], job["eta"], job["started"]) == ("queued", 0, 10, None, None)
    store.report([(job_id, 0, 0), (job_id, 1, 0)], [job_id])
    clock.now += 1
    store.report([(job_id, 0, 4), (job_id, 1, 2)], [job_id])
    job = store.snapshot(job_id)
    # The mean over the images: 6 of 20 steps, 1 s for 30 %.
    assert (job["state"], job["step"], job["progress"], job["started"]) == ("running", 3, 0.3, 1000.0)
    assert job["eta"] == pytest.approx(1 * 0.7 / 0.3)
    assert store.finish(job_id, {"images": ["x"]}) == "done"
    job = store.snapshot(job_id)
    assert (job["state"], job["step"], job["progress"], job["eta"], job["result"]) == ("done", 10, 1.0, 0.0, {"images": ["x"]})
    # A late report of the replica changes nothing.
    store.report([(job_id, 0, 5)], [])
    assert store.snapshot(job_id)["step"] == 10


def test_job_failure_keeps_its_message_and_status():
    store, _ = jobs()
    job_id = store.add("job", 1, 5)
    assert store.fail(job_id, "no image within SD_REQUEST_TIMEOUT_S (1 s)", 504) == "failed"
    job = store.snapshot(job_id)
    assert job["state"] == "failed" and "SD_REQUEST_TIMEOUT_S" in job["error"] and job["result"] is None
    assert store.fail("nope", "x", 500) is None and store.finish("nope", None) is None


def test_job_count_cap_evicts_the_oldest_finished_then_refuses():
    store, clock = jobs(max_jobs=2)
    a, b = store.add("job", 1, 5), store.add("job", 1, 5)
    assert store.add("job", 1, 5) is None  # both active
    # Synchronous A1111 entries are not jobs: never refused, never counted.
    assert store.add("txt2img", 1, 5) is not None
    clock.now += 1
    store.finish(b, {})
    clock.now += 1
    store.fail(a, "x", 500)
    c = store.add("job", 1, 5)  # b finished first: evicted
    assert c is not None and store.snapshot(b) is None and store.snapshot(a)["state"] == "failed"
    # A run of an evicted job that is still going is told to stop.
    assert store.report([], [b, c]) == [b]
    assert store.add("job", 1, 5) is not None and store.snapshot(a) is None
    assert store.add("job", 1, 5) is None


def test_finished_jobs_expire_and_lost_ones_fail():
    store, clock = jobs(ttl_s=100.0, stale_after_s=500.0)
    done, lost, sync = store.add("job", 1, 5), store.add("job", 1, 5), store.add("img2img", 1, 5)
    store.finish(done, {})
    clock.now += 100.5
    store.sweep()
    assert store.snapshot(done) is None and store.snapshot(lost)["state"] == "queued"
    clock.now += 400
    store.sweep()
    job = store.snapshot(lost)
    assert job["state"] == "failed" and job["error"].startswith("lost") and sync not in store.entries


def test_cancel_stops_the_run_at_the_replicas_next_report():
    store, _ = jobs()
    job_id, other = store.add("job", 1, 50), store.add("job", 1, 50)
    store.report([(job_id, 0, 3), (other, 0, 3)], [job_id, other])
    job = store.cancel(job_id)
    assert job["state"] == "cancelled" and "DELETE" in job["error"]
    assert store.report([(job_id, 0, 4)], [job_id, other]) == [job_id]
    # The run's answer (it may have run on in a batch) leaves it cancelled.
    assert store.finish(job_id, {"images": []}) == "cancelled" and store.snapshot(job_id)["result"] is None
    assert store.fail(job_id, "stopped", 409) == "cancelled"
    # Deleting a finished job removes it; unknown ids and synchronous entries are not jobs.
    assert store.cancel(job_id)["state"] == "cancelled" and store.snapshot(job_id) is None
    sync = store.add("txt2img", 1, 5)
    assert store.cancel("0" * 32) is None and store.cancel(sync) is None


def test_interrupt_stops_every_running_entry():
    store, _ = jobs()
    running, queued, sync = store.add("job", 1, 9), store.add("job", 1, 9), store.add("txt2img", 2, 9)
    store.report([(running, 0, 2), (sync, 0, 1), (sync, 1, 1)], [])
    assert store.interrupt() == 2
    assert store.report([], [running, queued, sync]) == [running, sync]
    job = store.snapshot(running)
    assert job["state"] == "cancelled" and "interrupt" in job["error"]
    assert store.snapshot(queued)["state"] == "queued"
    assert store.end(sync) is True and sync not in store.entries
    assert store.interrupt() == 0


def test_a1111_progress_schema_idle_and_running():
    store, clock = jobs()
    idle = store.a1111_progress()
    assert idle == {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
        "current_image": None,
        "textinfo": None,
    }
    queued = store.add("job", 1, 20)
    sync = store.add("txt2img", 1, 10)
    store.report([(sync, 0, 0)], [])
    clock.now += 2
    store.report([(sync, 0, 4)], [])
    answer = store.a1111_progress()
    state = answer["state"]
    assert answer["progress"] == 0.4 and answer["eta_relative"] == pytest.approx(3.0)
    assert state["job_count"] == 2 and state["sampling_step"] == 4 and state["sampling_steps"] == 10
    assert state["job"] == f"txt2img({sync})" and len(state["job_timestamp"]) == 14
    assert sync in answer["textinfo"] and queued not in answer["textinfo"]


def test_store_watch_waits_for_a_change():
    async def run():
        store = JobStore(4, 100.0, 500.0)
        job_id = await store.add("job", 1, 10)
        first = await store.watch(job_id, -1, 5.0)
        assert first["state"] == "queued"
        # Nothing changes: the same version after the timeout.
        t0 = time.monotonic()
        same = await store.watch(job_id, first["version"], 0.2)
        assert same["version"] == first["version"] and time.monotonic() - t0 >= 0.2
        waiter = asyncio.ensure_future(store.watch(job_id, first["version"], 5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await store.report([(job_id, 0, 3)], [job_id])
        changed = await asyncio.wait_for(waiter, 1.0)
        assert changed["step"] == 3 and changed["version"] > first["version"]
        assert await store.watch("unknown", -1, 0.1) is None

    asyncio.run(run())


def test_progress_reporter_sends_steps_and_sets_gone_for_stopped_runs():
    store, _ = jobs()
    job_id = store.add("job", 2, 10)
    reporter = ProgressReporter()
    reporter._thread = threading.Thread()  # no background thread: flushed by hand below
    tag = {"id": job_id, "steps": 10, "store": "s"}
    batch = [{"job": {**tag, "part": i}, "gone": threading.Event()} for i in range(2)]
    batch.append({"gone": threading.Event()})  # an untracked request (e.g. /imagine)
    for r in batch:
        reporter.register(r)
    sent = []

    def send(name, updates, ids):
        sent.append((name, sorted(updates), ids))
        return store.report(updates, ids)

    reporter.step(batch, 0)
    reporter.step(batch, 1)
    reporter.step(batch, 2)  # only the last step of each part is sent
    reporter.flush(send)
    assert sent == [("s", [(job_id, 0, 2), (job_id, 1, 2)], [job_id])]
    assert store.snapshot(job_id)["step"] == 2 and not any(r["gone"].is_set() for r in batch)
    store.cancel(job_id)
    reporter.flush(send)
    assert [r["gone"].is_set() for r in batch] == [True, True, False]
    for r in batch:
        reporter.unregister(r)
    sent.clear()
    reporter.flush(send)
    assert sent == [] and reporter._active == {}
    # What a step pays: a few microseconds for a batch of 4 (a tiny model's step is milliseconds).
    t0 = time.perf_counter()
    for step in range(10_000):
        reporter.step(batch + batch[:1], step)
    assert (time.perf_counter() - t0) / 10_000 < 50e-6


def test_run_steps_of_an_edit():
    assert _serve_jobs.run_steps({"steps": 10}) == 10
    assert _serve_jobs.run_steps({"steps": 10, "strength": 0.75}) == 7


class LocalActor:
    """A `JobStore` called in-process as the ingress calls the actor (`store.method.remote(...)`
    answers an awaitable, run at once on the route's loop)."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        method = getattr(self.store, name)
        return SimpleNamespace(remote=lambda *args: asyncio.ensure_future(method(*args)))


def _jobs_app(model):
    """The job and A1111 routes over a fake model and an in-process store (no Ray)."""
    from fastapi import FastAPI, Request

    from sd_py import _serve_a1111

    ingress = serve.APIIngress.func_or_class.__mro__[1](model.handle)
    ingress._job_store = LocalActor(JobStore(2, 100.0, 500.0))
    app = FastAPI()

    @app.post("/v1/jobs")
    async def create(request: Request):
        return await _serve_jobs.create(request, ingress)

    @app.get("/v1/jobs/{job_id}")
    async def get(job_id: str):
        return await _serve_jobs.get(job_id, ingress)

    @app.delete("/v1/jobs/{job_id}")
    async def delete(job_id: str):
        return await _serve_jobs.delete(job_id, ingress)

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str):
        return await _serve_jobs.events(job_id, ingress)

    @app.get("/sdapi/v1/progress")
    async def progress():
        return await _serve_jobs.a1111_progress(ingress)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await _serve_a1111.txt2img(request, ingress)

    return app, ingress


def test_job_routes_without_ray():
    """The routes' glue over an in-process store: 202 + Location, the model requests tagged for
    the replica's reporter, the result, the final server-sent event, 404, 503 at the cap, and a
    run stopped by the replica (RequestGone) as a cancelled job or a 409 txt2img."""
    from fastapi.testclient import TestClient

    from serve_fakes import FakeModel

    model = FakeModel()
    app, ingress = _jobs_app(model)
    with TestClient(app) as client:
        body = {"prompt": "a cat", "seed": 5, "batch_size": 2, "width": 64, "height": 64, "steps": 3}
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        job_id = r.json()["id"]
        job = _wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json(), lambda j: j["state"] == "done", 10)
        assert [m["job"]["part"] for m in model.requests] == [0, 1] and {m["job"]["id"] for m in model.requests} == {job_id}
        assert json.loads(job["result"]["info"])["all_seeds"] == [5, 6] and len(job["result"]["images"]) == 2
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = _sse(SimpleNamespace(iter_lines=lambda decode_unicode: stream.iter_lines()))
        assert [name for name, _ in events] == ["done"] and events[0][1]["result"] == job["result"]
        assert client.get(f"/v1/jobs/{'0' * 32}").status_code == 404
        assert client.get(f"/v1/jobs/{'0' * 32}/events").status_code == 404

        # The replica stopped the runs (what its reporter does for a cancelled or interrupted id).
        model.fail = serve.RequestGone("every request of the batch is gone")
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 409 and "interrupt" in r.json()["detail"]
        model.delay_s = 0.5  # the DELETE comes first, then the stopped run answers
        cancelled = client.post("/v1/jobs", json=body).json()["id"]
        assert client.delete(f"/v1/jobs/{cancelled}").json()["state"] == "cancelled"
        job = _wait_for(lambda: client.get(f"/v1/jobs/{cancelled}").json(), lambda j: j["finished"] is not None, 10)
        assert job["state"] == "cancelled" and "DELETE" in job["error"]
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0

        # At the cap (2) with both queued, a third job is refused.
        model.fail, model.delay_s = None, 5.0
        client.delete(f"/v1/jobs/{job_id}")
        assert [client.post("/v1/jobs", json=body).status_code for _ in range(3)] == [202, 202, 503]


# -- through a real local Ray Serve --

MAX_JOBS = 3


@pytest.fixture(scope="module")
def jobs_serve(ray_cluster):
    """The packaged app, with its job store made first by the test with MAX_JOBS (the ingress
    finds it by name), so that the cap can be reached."""
    import ray
    from ray import serve
    from ray.serve._private.utils import import_attr

    from test_serve_ray import _wait_ready

    base_url, _ = ray_cluster
    name = "sd_py-jobs:sd-py-jobs"
    store = ray.remote(JobStore).options(name=name, namespace=_serve_jobs.NAMESPACE, lifetime="detached", num_cpus=0).remote(MAX_JOBS, 3600.0, 600.0)
    serve.run(import_attr("sd_py.serve:entrypoint"), name="sd-py-jobs", route_prefix="/")
    _wait_ready(base_url, "/healthz")
    yield base_url
    serve.delete("sd-py-jobs")
    ray.kill(store)


def _job(base_url, job_id):
    r = requests.get(f"{base_url}/v1/jobs/{job_id}", timeout=60)
    assert r.status_code == 200, r.text[:300]
    return r.json()


def _wait_for(what, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if predicate(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout}s: {value}")


LONG = {"prompt": "a long run", "width": 128, "height": 128, "steps": 500, "seed": 1}


@pytest.mark.ray
def test_job_lifecycle_gives_the_txt2img_image(jobs_serve):
    body = {"prompt": "a blue sphere", "seed": 8, "sampler_name": "Euler a", "steps": 4, "width": 64, "height": 64}
    r = requests.post(f"{jobs_serve}/v1/jobs", json=body, timeout=60)
    assert r.status_code == 202, r.text[:300]
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    job = _wait_for(lambda: _job(jobs_serve, job_id), lambda j: j["state"] in ("done", "failed", "cancelled"))
    assert job["state"] == "done", job
    assert (job["step"], job["steps"], job["progress"], job["error"]) == (4, 4, 1.0, None)
    assert job["created"] <= job["started"] <= job["finished"]
    info = json.loads(job["result"]["info"])
    assert info["all_seeds"] == [8] and info["sampler_name"] == "Euler a"
    # The image /sdapi/v1/txt2img answers for the same body.
    sync = requests.post(f"{jobs_serve}/sdapi/v1/txt2img", json=body, timeout=180).json()
    served = [Image.open(io.BytesIO(base64.b64decode(b))) for b in (job["result"]["images"][0], sync["images"][0])]
    assert np.array_equal(pixels(served[0]), pixels(served[1]))
    assert served[0].info["parameters"] == json.loads(sync["info"])["infotexts"][0]
    # A finished job is removed by DELETE.
    assert requests.delete(f"{jobs_serve}/v1/jobs/{job_id}", timeout=60).json()["state"] == "done"
    assert requests.get(f"{jobs_serve}/v1/jobs/{job_id}", timeout=60).status_code == 404


@pytest.mark.ray
def test_job_errors(jobs_serve):
    for path in ("", "/events"):
        r = requests.get(f"{jobs_serve}/v1/jobs/{'0' * 32}{path}", timeout=60)
        assert r.status_code == 404 and "no job" in r.json()["detail"]
    assert requests.delete(f"{jobs_serve}/v1/jobs/nope", timeout=60).status_code == 404
    r = requests.post(f"{jobs_serve}/v1/jobs", json={"prompt": "x", "width": 100}, timeout=60)
    assert r.status_code == 422 and "multiple of 8" in r.json()["detail"]
    r = requests.post(f"{jobs_serve}/v1/jobs", data="not json", timeout=60)
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    # A failure of the run (an unknown sampler, found by the replica) is the job's error.
    r = requests.post(f"{jobs_serve}/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 2, "sampler_name": "no such"}, timeout=60)
    job = _wait_for(lambda: _job(jobs_serve, r.json()["id"]), lambda j: j["state"] != "queued" and j["state"] != "running")
    assert job["state"] == "failed" and "scheduler" in job["error"]


def _sse(response):
    """The (event, data) pairs of a server-sent event stream, until it ends."""
    events, name, data = [], None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and name:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


@pytest.mark.ray
def test_job_events_stream_progress_then_done(jobs_serve):
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 60, "seed": 2}
    job_id = requests.post(f"{jobs_serve}/v1/jobs", json=body, timeout=60).json()["id"]
    with requests.get(f"{jobs_serve}/v1/jobs/{job_id}/events", stream=True, timeout=180) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"progress"}, names
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and len(steps) >= 2, steps
    assert events[-1][1]["state"] == "done" and len(events[-1][1]["result"]["images"]) == 1


@pytest.mark.ray
def test_delete_cancels_a_long_job_quickly(jobs_serve):
    before = requests.get(f"{jobs_serve}/healthz", timeout=60).json()
    job_id = requests.post(f"{jobs_serve}/v1/jobs", json=LONG, timeout=60).json()["id"]
    job = _wait_for(lambda: _job(jobs_serve, job_id), lambda j: j["step"] > 0)
    assert job["state"] == "running" and job["eta"] > 0 and job["steps"] == 500
    with requests.get(f"{jobs_serve}/v1/jobs/{job_id}/events", stream=True, timeout=180) as stream:
        t0 = time.monotonic()
        r = requests.delete(f"{jobs_serve}/v1/jobs/{job_id}", timeout=60)
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        events = _sse(stream)
    assert events[-1][0] == "cancelled" and events[-1][1]["step"] < 500
    # The replica stopped the run at its next step.
    _wait_for(lambda: requests.get(f"{jobs_serve}/healthz", timeout=60).json(), lambda h: h["stopped_calls"] > before["stopped_calls"], 10)
    assert time.monotonic() - t0 < 5
    assert _job(jobs_serve, job_id)["state"] == "cancelled"


@pytest.mark.ray
def test_job_count_cap_answers_503(jobs_serve):
    ids = []
    try:
        for i in range(MAX_JOBS):
            r = requests.post(f"{jobs_serve}/v1/jobs", json={**LONG, "seed": i}, timeout=60)
            assert r.status_code == 202, r.text[:300]
            ids.append(r.json()["id"])
        r = requests.post(f"{jobs_serve}/v1/jobs", json=LONG, timeout=60)
        assert r.status_code == 503 and "SD_MAX_JOBS" in r.json()["detail"] and r.headers["retry-after"]
    finally:
        for job_id in ids:
            requests.delete(f"{jobs_serve}/v1/jobs/{job_id}", timeout=60)
    # Cancelled jobs are finished: they make room.
    r = requests.post(f"{jobs_serve}/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 1}, timeout=60)
    assert r.status_code == 202
    _wait_for(lambda: _job(jobs_serve, r.json()["id"]), lambda j: j["state"] == "done")


@pytest.mark.ray
def test_a1111_progress_and_interrupt(jobs_serve):
    """/sdapi/v1/progress shows a running synchronous txt2img with its steps, and a job queued
    behind it; /sdapi/v1/interrupt stops the running one at its next step (answered 409), not the
    queued job, which then runs, is shown, and ends cancelled at the next interrupt."""
    progress_url = f"{jobs_serve}/sdapi/v1/progress"
    idle = requests.get(progress_url, timeout=60).json()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0 and idle["current_image"] is None

    with ThreadPoolExecutor(1) as ex:
        sync = ex.submit(requests.post, f"{jobs_serve}/sdapi/v1/txt2img", json=LONG, timeout=180)
        progress = _wait_for(lambda: requests.get(progress_url, timeout=60).json(), lambda p: p["state"]["sampling_step"] > 0)
        state = progress["state"]
        assert state["job"].startswith("txt2img(") and state["sampling_steps"] == 500 and state["job_count"] == 1
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0 and "step" in progress["textinfo"]
        # Another size: a run of its own, which takes turns with the running one.
        job_id = requests.post(f"{jobs_serve}/v1/jobs", json={**LONG, "width": 64, "height": 64}, timeout=60).json()["id"]
        assert requests.get(progress_url, timeout=60).json()["state"]["job_count"] == 2

        t0 = time.monotonic()
        r = requests.post(f"{jobs_serve}/sdapi/v1/interrupt", timeout=60)
        assert r.status_code == 200 and r.json() == {}
        answer = sync.result()
    assert time.monotonic() - t0 < 5
    assert answer.status_code == 409 and "interrupt" in answer.json()["detail"], answer.text[:300]

    _wait_for(lambda: _job(jobs_serve, job_id), lambda j: j["step"] > 0)
    progress = requests.get(progress_url, timeout=60).json()
    assert progress["state"]["job"] == f"job({job_id})" and progress["state"]["job_count"] == 1
    assert requests.post(f"{jobs_serve}/sdapi/v1/interrupt", timeout=60).status_code == 200
    job = _job(jobs_serve, job_id)
    assert job["state"] == "cancelled" and "interrupt" in job["error"] and job["step"] < 500
    _wait_for(lambda: requests.get(progress_url, timeout=60).json(), lambda p: p["state"]["job_count"] == 0, 10)
