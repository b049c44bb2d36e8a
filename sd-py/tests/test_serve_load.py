"""`sd_py.serve` under load and faults, through a real local Ray Serve on loopback with the tiny
model: the short run of scripts/serve-load.py (steady load, burst, hang-ups, replica kill), the
deadline, the metrics on Ray's Prometheus endpoint, and a graceful stop."""

import json
import re
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import RAY_METRICS_PORT, REPO

pytestmark = pytest.mark.ray

APP = "sd-load"
# Short enough for a test, long enough for a short request on 2 busy cores.
REQUEST_TIMEOUT_S = 15
# A request that runs for much longer than REQUEST_TIMEOUT_S (over 0.1 s a step at 256 px).
LONG = {"img_size": 256, "steps": 500}


def _health(url):
    return requests.get(f"{url}/healthz", timeout=60).json()


@pytest.fixture(scope="module")
def load_app(ray_cluster):
    """The packaged app with a small model queue (2) and a short deadline, under /load."""
    from ray import serve

    from sd_py.serve import APIIngress, StableDiffusionV2

    base_url, _ = ray_cluster
    env = {"runtime_env": {"env_vars": {"SD_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)}}}
    model = StableDiffusionV2.options(max_queued_requests=2)
    serve.run(APIIngress.options(ray_actor_options=env).bind(model.bind()), name=APP, route_prefix="/load")
    url = f"{base_url}/load"
    deadline = time.monotonic() + 120
    while requests.get(f"{url}/healthz", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "the load app did not become healthy"
        time.sleep(0.5)
    yield url
    if APP in serve.status().applications:
        serve.delete(APP)


def _harness(url, tmp_path, *args):
    out = tmp_path / "summary.json"
    cmd = [sys.executable, str(REPO / "scripts" / "serve-load.py"), "--url", url, "--json", str(out), *args]
    subprocess.run(cmd, check=True, timeout=240)
    return json.loads(out.read_text())


def test_short_load_run(load_app, tmp_path):
    """Steady load is all 200; a burst over the queue is 200 or an immediate 503 + Retry-After,
    never 500; clients that hang up do not hold back the next request: their run stops."""
    summary = _harness(load_app, tmp_path, "--phases", "steady,burst,hangup", "--clients", "2", "--steady-s", "8", "--burst", "16", "--hangups", "2")
    steady, burst, hangup = summary["steady"], summary["burst"], summary["hangup"]
    assert set(steady["codes"]) == {"200"}, steady
    assert set(burst["codes"]) <= {"200", "503"} and burst["codes"].get("503", 0) >= 4, burst
    assert burst["every_503_has_retry_after"] and burst["slowest_503_s"] < 5, burst
    assert hangup["codes"] == {"hung_up": 2}, hangup
    # The hung-up pair would have run for minutes; the next request waits at most for their
    # current step.
    assert hangup["follow_up_code"] == 200 and hangup["follow_up_s"] < REQUEST_TIMEOUT_S, hangup
    assert hangup["stopped_calls"] >= 1, hangup


def test_deadline_is_504_and_stops_the_run(load_app):
    before = _health(load_app)["stopped_calls"]
    start = time.monotonic()
    r = requests.get(f"{load_app}/imagine", params={"prompt": "slow", **LONG}, timeout=120)
    assert r.status_code == 504, r.text[:300]
    assert "SD_REQUEST_TIMEOUT_S" in r.json()["detail"]
    assert REQUEST_TIMEOUT_S <= time.monotonic() - start < REQUEST_TIMEOUT_S + 10
    deadline = time.monotonic() + 30
    while _health(load_app)["stopped_calls"] == before:
        assert time.monotonic() < deadline, "the run past its deadline was not stopped"
        time.sleep(0.5)


def _scrape_samples():
    """(name, labels) of every sample on Ray's Prometheus endpoint."""
    text = requests.get(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics", timeout=30).text
    samples = set()
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? ", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            samples.add((m.group(1), labels))
    return samples


def test_metrics_on_the_prometheus_endpoint(load_app):
    """The custom metrics of the runs above reach Ray's Prometheus endpoint, tagged with the
    app's deployment (Ray exports every few seconds)."""
    model = {("application", APP), ("deployment", "stable-diffusion-v2")}
    ingress = {("application", APP), ("deployment", "APIIngress")}
    wanted = [
        ("ray_sd_images_total", model),
        ("ray_sd_step_seconds_bucket", model),
        ("ray_sd_queued_requests", model),
        ("ray_sd_active_batch_size", model),
        *(("ray_sd_failures_total", ingress | {("kind", k)}) for k in ("overloaded", "client_gone", "deadline")),
    ]

    def missing():
        samples = _scrape_samples()
        return [(n, sorted(t)) for n, t in wanted if not any(n == name and t <= labels for name, labels in samples)]

    deadline = time.monotonic() + 60
    while missing():
        if time.monotonic() > deadline:
            found = sorted((n, sorted(l)) for n, l in _scrape_samples() if "sd_" in n)
            raise AssertionError(f"missing {missing()}; found {found}")
        time.sleep(2)


def test_killed_replica_is_503_and_comes_back(load_app, tmp_path):
    kill = _harness(load_app, tmp_path, "--phases", "kill")["kill"]
    assert kill["codes"] == {"503": 1} and kill["every_503_has_retry_after"], kill
    assert kill["recovered_s"] is not None, kill


def test_in_flight_request_finishes_when_the_app_stops(load_app):
    """Deleting the app stops its replicas gracefully: the request they run is answered."""
    from ray import serve

    answer = {}

    def call():
        params = {"prompt": "last one", "img_size": 256, "steps": 25}  # several seconds
        answer["r"] = requests.get(f"{load_app}/imagine", params=params, timeout=120)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(3)  # the request is in the model replica (1 s of batch wait, then its run)
    serve.delete(APP)
    thread.join()
    assert answer["r"].status_code == 200, answer["r"].text[:300]
