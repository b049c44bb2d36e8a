#!/usr/bin/env python3
"""The Serve app's batching modes under a Poisson load: `SD_BATCHING=continuous` (the replica's
step scheduler), `request` (`@serve.batch`) and `none`, side by side on one local Ray Serve
(loopback only) and the same seeded arrival schedule.

Each request is short (`--short-steps`) or, with probability `--long-share`, long
(`--long-steps`), all of one size. Prints per mode: throughput (images/s from the first arrival
to the last answer), p50/p95 latency overall and per kind, and the latency of a "probe": a short
request sent while a long one runs, against the short request alone.

    # tiny model of the repository
    python benches/serve_batching.py --model tests/fixtures/pipelines/sd2-tiny --size 64 \\
        --short-steps 20 --long-steps 200 --rate 0.8 --requests 150
    # the full SD 2.1 architecture (random weights), 256 px
    python benches/serve_batching.py --model ~/.cache/sd-rs/sd21-random --size 256 \\
        --short-steps 3 --long-steps 12 --rate 0.035 --requests 12

Needs the environment of the Serve app (ray[serve], sd_py; a release build of sd_py for timings).
"""

import argparse
import json
import os
import random
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

import requests

MODES = ("continuous", "request", "none")


def percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def start_ray() -> str:
    """A local Ray cluster (2 CPUs) with Serve on a free loopback port; its base URL."""
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy(base_url: str, model: str, mode: str, max_batch: int) -> str:
    """The app with `SD_BATCHING=mode` under /<mode>, healthy; its URL."""
    from ray import serve

    from sd_py.serve import APIIngress, StableDiffusionV2

    env = {"MODEL_ID": os.path.abspath(model), "SD_BATCHING": mode, "SD_MAX_BATCH_SIZE": str(max_batch),
           "SD_REQUEST_TIMEOUT_S": "3600", "SD_MAX_QUEUED_REQUESTS": "1000", "RAY_USAGE_STATS_ENABLED": "0"}
    options = {"runtime_env": {"env_vars": env}, "num_gpus": 0}
    # Queues that hold the whole schedule: this measures latency, not back-pressure.
    ingress = APIIngress.options(ray_actor_options={"runtime_env": {"env_vars": env}}, max_ongoing_requests=1000, max_queued_requests=-1)
    app = ingress.bind(StableDiffusionV2.options(ray_actor_options=options, max_queued_requests=-1).bind())
    serve.run(app, name=f"bench-{mode}", route_prefix=f"/{mode}")
    url = f"{base_url}/{mode}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=60).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the {mode} app did not become healthy")
        time.sleep(1)


def imagine(url: str, size: int, steps: int, seed: int) -> float:
    """Seconds until the PNG of one request is answered."""
    start = time.monotonic()
    r = requests.get(f"{url}/imagine", params={"prompt": "a lighthouse at dusk", "img_size": size, "steps": steps, "seed": seed},
                     timeout=3600)
    if r.status_code != 200:
        raise SystemExit(f"HTTP {r.status_code}: {r.text[:300]}")
    return time.monotonic() - start


def poisson_load(url: str, args: argparse.Namespace) -> Dict[str, Any]:
    """The seeded schedule: exponential gaps of mean 1/rate, each request long with probability
    `long_share`. Returns throughput and latencies."""
    rng = random.Random(args.seed)
    schedule, t = [], 0.0
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        schedule.append((t, rng.random() < args.long_share, i))
    results: List[Dict[str, Any]] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def send(at: float, long: bool, seed: int) -> None:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        seconds = imagine(url, args.size, args.long_steps if long else args.short_steps, seed)
        with lock:
            results.append({"long": long, "seconds": seconds, "done": time.monotonic()})

    with ThreadPoolExecutor(args.requests) as ex:
        for f in [ex.submit(send, *item) for item in schedule]:
            f.result()
    span = max(r["done"] for r in results) - (t0 + schedule[0][0])
    latencies = {kind: [r["seconds"] for r in results if r["long"] == (kind == "long")] for kind in ("short", "long")}
    every = [r["seconds"] for r in results]
    return {
        "throughput_images_per_s": len(results) / span,
        "p50_s": percentile(every, 0.5),
        "p95_s": percentile(every, 0.95),
        **{f"{kind}_{name}_s": percentile(v, q) for kind, v in latencies.items() for name, q in (("p50", 0.5), ("p95", 0.95))},
        "short": len(latencies["short"]),
        "long": len(latencies["long"]),
    }


def probe(url: str, args: argparse.Namespace) -> Dict[str, float]:
    """A short request alone, then one sent `--probe-after-s` into a long request."""
    alone = statistics.median(imagine(url, args.size, args.short_steps, 1000 + i) for i in range(2))
    with ThreadPoolExecutor(1) as ex:
        long = ex.submit(imagine, url, args.size, args.long_steps, 2000)
        time.sleep(args.probe_after_s)
        behind = imagine(url, args.size, args.short_steps, 2001)
        long_s = long.result()
    return {"short_alone_s": alone, "short_during_long_s": behind, "long_s": long_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tests/fixtures/pipelines/sd2-tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--short-steps", type=int, default=20)
    ap.add_argument("--long-steps", type=int, default=200)
    ap.add_argument("--long-share", type=float, default=0.25)
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=4, help="SD_MAX_BATCH_SIZE")
    ap.add_argument("--probe-after-s", type=float, default=None, help="default: a fifth of the long request alone")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()

    from ray import serve

    base_url = start_ray()
    results: Dict[str, Any] = {"args": vars(args)}
    for mode in args.modes.split(","):
        url = deploy(base_url, args.model, mode, args.max_batch)
        imagine(url, args.size, 2, 0)  # warm-up
        if args.probe_after_s is None:
            args.probe_after_s = imagine(url, args.size, args.long_steps, 0) / 5
        results[mode] = {**poisson_load(url, args), **probe(url, args)}
        print(f"{mode}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results[mode].items()), flush=True)
        serve.delete(f"bench-{mode}")

    print(f"\n{args.requests} requests, Poisson {args.rate}/s, {args.size} px, short {args.short_steps} steps, "
          f"long {args.long_steps} steps ({args.long_share:.0%}), SD_MAX_BATCH_SIZE {args.max_batch}")
    print("| mode | images/s | p50 | p95 | short p50 | short p95 | long p50 | long p95 | short alone | short during a long |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        r = results[mode]
        cells = [r["throughput_images_per_s"]] + [r[k] for k in ("p50_s", "p95_s", "short_p50_s", "short_p95_s", "long_p50_s", "long_p95_s",
                                                                 "short_alone_s", "short_during_long_s")]
        print(f"| {mode} | " + " | ".join("-" if v is None else f"{v:.3f}" if i == 0 else f"{v:.2f} s" for i, v in enumerate(cells)) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
