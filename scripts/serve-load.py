#!/usr/bin/env python3
"""Load and fault harness of the Serve app `sd_py.serve`, on loopback addresses only.

Phases, each bounded in requests and time:

- steady: `--clients` clients send requests back to back for `--steady-s` seconds;
- burst: `--burst` requests at once; what the model's queue cannot hold must be answered at once
  with 503 and `Retry-After`, never 500;
- hangup: `--hangups` long requests whose clients hang up after `--hangup-after-s`; then one short
  request, which must not wait behind them (their runs stop at the next step);
- kill: a long request, under which the model replica is killed (SIGKILL; its pid from /healthz):
  it must be answered 503 with `Retry-After`; then the time until /healthz answers 200 again.

Prints per phase the status codes, the latencies (p50/p95) and the model replica's resident
memory (from /healthz); `--json FILE` writes the summary.

    # against a running app (e.g. `MODEL_ID=... serve run sd_py.serve:entrypoint`)
    python scripts/serve-load.py --url http://127.0.0.1:8000
    # starts a local Ray Serve with the app on the tiny model of the repository
    python scripts/serve-load.py --start --model tests/fixtures/pipelines/sd2-tiny --steady-s 480
"""

import argparse
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

import requests

HUNG_UP = "hung_up"  # the code recorded for a request whose client hung up on purpose
NO_ANSWER = "no_answer"  # connection refused or reset, or the client timeout passed


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    address = ipaddress.ip_address(socket.gethostbyname(host))
    if not address.is_loopback:
        sys.exit(f"serve-load: {url} is not a loopback address; this harness only loads 127.0.0.1")


class Client:
    """Sends `/imagine` requests and records (code, seconds, Retry-After) per request."""

    def __init__(self, url: str, short: Dict[str, int], long: Dict[str, int], timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.short = short
        self.long = long
        self.timeout_s = timeout_s

    def imagine(self, seed: int, long: bool = False, hang_up_after_s: Optional[float] = None) -> Dict[str, Any]:
        params = {"prompt": "a lighthouse at dusk", **(self.long if long else self.short), "seed": seed}
        start = time.monotonic()
        try:
            r = requests.get(f"{self.url}/imagine", params=params, timeout=hang_up_after_s or self.timeout_s)
            code: Any = r.status_code
            retry_after = r.headers.get("retry-after")
        except requests.ReadTimeout:  # urllib3 closes the connection: the server sees a hang-up
            code, retry_after = (HUNG_UP if hang_up_after_s else NO_ANSWER), None
        except requests.ConnectionError:
            code, retry_after = NO_ANSWER, None
        return {"code": code, "seconds": time.monotonic() - start, "retry_after": retry_after}

    def health(self) -> Dict[str, Any]:
        try:
            r = requests.get(f"{self.url}/healthz", timeout=30)
            return {"code": r.status_code, **r.json()}
        except (requests.RequestException, ValueError) as e:
            return {"code": NO_ANSWER, "detail": repr(e)}


def percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summarize(results: List[Dict[str, Any]], health: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    codes: Dict[str, int] = {}
    for r in results:
        codes[str(r["code"])] = codes.get(str(r["code"]), 0) + 1
    ok = [r["seconds"] for r in results if r["code"] == 200]
    refused = [r for r in results if r["code"] == 503]
    rss = health.get("rss_bytes")
    return {
        "codes": codes,
        "p50_s": percentile(ok, 0.5),
        "p95_s": percentile(ok, 0.95),
        "slowest_503_s": round(max((r["seconds"] for r in refused), default=0.0), 3),
        "every_503_has_retry_after": all(r["retry_after"] for r in refused),
        "replica_rss_mb": None if rss is None else round(rss / 2**20, 1),
        **extra,
    }


def steady(client: Client, clients: int, seconds: float) -> Dict[str, Any]:
    end = time.monotonic() + seconds
    results: List[Dict[str, Any]] = []
    rss_seen: List[float] = []

    def loop(worker: int) -> None:
        seed = worker * 1_000_000
        while time.monotonic() < end:
            results.append(client.imagine(seed))
            seed += 1

    def sample_rss() -> None:  # the replica's memory over the phase: flat, or a leak
        while time.monotonic() < end:
            rss = client.health().get("rss_bytes")
            if rss:
                rss_seen.append(round(rss / 2**20, 1))
            time.sleep(min(10.0, max(1.0, seconds / 10)))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=sample_rss))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(
        results,
        client.health(),
        images_per_s=round(sum(r["code"] == 200 for r in results) / seconds, 2),
        rss_mb_first_last_max=[rss_seen[0], rss_seen[-1], max(rss_seen)] if rss_seen else None,
    )


def burst(client: Client, n: int) -> Dict[str, Any]:
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(client.imagine, range(n)))
    return summarize(results, client.health())


def hangup(client: Client, n: int, after_s: float) -> Dict[str, Any]:
    before = client.health().get("stopped_calls", 0)
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: client.imagine(i, True, after_s), range(n)))
    follow_up = client.imagine(n)
    # The stopped runs may end a step after the follow-up's answer.
    deadline = time.monotonic() + 30
    health = client.health()
    while health.get("stopped_calls", 0) - before < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        health = client.health()
    return summarize(
        results,
        health,
        follow_up_code=follow_up["code"],
        follow_up_s=round(follow_up["seconds"], 3),
        stopped_calls=health.get("stopped_calls", 0) - before,
    )


def kill(client: Client, after_s: float, recover_timeout_s: float) -> Dict[str, Any]:
    health = client.health()
    pid = health.get("pid")
    if not pid:
        return {"skipped": f"no replica pid in /healthz: {health}"}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.imagine, 7, True)
        time.sleep(after_s)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        result = pending.result()
    recovered_s = None
    while time.monotonic() - killed_at < recover_timeout_s:
        health = client.health()
        if health["code"] == 200 and health.get("pid") not in (None, pid):
            recovered_s = round(time.monotonic() - killed_at, 1)
            break
        time.sleep(0.5)
    return summarize([result], health, killed_pid=pid, recovered_s=recovered_s)


def start_local_serve(model: str) -> str:
    """A local Ray cluster (2 CPUs) with Serve on 127.0.0.1 running `sd_py.serve:entrypoint`."""
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k.startswith("SD_")}
    env.update(MODEL_ID=os.path.abspath(model), RAY_USAGE_STATS_ENABLED="0")
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from ray.serve._private.utils import import_attr

    serve.run(import_attr("sd_py.serve:entrypoint"), name="sd-py", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="the app's base URL (loopback only)")
    ap.add_argument("--start", action="store_true", help="start a local Ray Serve with the app")
    ap.add_argument("--model", default="tests/fixtures/pipelines/sd2-tiny", help="MODEL_ID for --start")
    ap.add_argument("--size", type=int, default=64, help="image side of the short requests")
    ap.add_argument("--steps", type=int, default=4, help="steps of the short requests")
    ap.add_argument("--long-size", type=int, default=256, help="image side of the long requests (hangup, kill)")
    ap.add_argument("--long-steps", type=int, default=500, help="steps of the long requests")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steady-s", type=float, default=20.0)
    ap.add_argument("--burst", type=int, default=48)
    ap.add_argument("--hangups", type=int, default=4)
    ap.add_argument("--hangup-after-s", type=float, default=2.0)
    ap.add_argument("--kill-after-s", type=float, default=2.0)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="client timeout of every request")
    ap.add_argument("--phases", default="steady,burst,hangup,kill")
    ap.add_argument("--json", help="write the summary to this file")
    args = ap.parse_args()
    if bool(args.url) == args.start:
        ap.error("give --url or --start")
    url = args.url or start_local_serve(args.model)
    check_loopback(url)
    short = {"img_size": args.size, "steps": args.steps}
    client = Client(url, short, {"img_size": args.long_size, "steps": args.long_steps}, args.timeout_s)
    deadline = time.monotonic() + 120
    while client.health()["code"] != 200:
        if time.monotonic() > deadline:
            sys.exit(f"serve-load: {url}/healthz not healthy: {client.health()}")
        time.sleep(1)
    phases = {
        "steady": lambda: steady(client, args.clients, args.steady_s),
        "burst": lambda: burst(client, args.burst),
        "hangup": lambda: hangup(client, args.hangups, args.hangup_after_s),
        "kill": lambda: kill(client, args.kill_after_s, recover_timeout_s=120),
    }
    summary = {}
    for name in args.phases.split(","):
        started = time.monotonic()
        summary[name] = {**phases[name](), "phase_s": round(time.monotonic() - started, 1)}
        print(f"{name}: {json.dumps(summary[name])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
