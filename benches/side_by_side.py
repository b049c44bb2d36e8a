#!/usr/bin/env python3
"""Side-by-side CPU benchmark: sd-cli against diffusers (in its own venv) and, optionally, OpenVINO (in
another venv) on the same model folder and the same work, alternating runs (A B C A B C ...), printing
per-stage medians, the precision each engine ran in, ratios sd-rs / each other engine and peak RSS.

    python3 benches/side_by_side.py --model ~/.cache/sd-rs/sd21-random --size 512 --steps 4 --runs 2
    python3 benches/side_by_side.py --engines diffusers,sd-rs,openvino --openvino-precision default
    python3 benches/side_by_side.py --engines sd-rs,openvino --mode bf16 \
        --weight-cache /tmp/sd-weight-cache --openvino-cache /tmp/ov-model-cache

The model folder is the full SD 2.1 architecture with random weights
(`cargo run --release -p sd-core --example make_random_model`); speed does not depend on weight
values. Only the Python standard library is needed here; diffusers runs in --venv, OpenVINO in
--openvino-venv after a one-time conversion to IR (setup in benches/openvino_run.py's docstring):

    nice -n 19 ~/.cache/sd-rs/openvino-venv/bin/python benches/openvino_run.py --convert
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ["load", "text_encoder", "unet_step", "vae_decode", "wall"]


def read_into_page_cache(folder):
    """Reads every file under `folder`, so that each engine's load starts from the page cache: the
    others' runs (and, on some VMs, the host's reclaim) evict it, and which engine then reads
    from disk would otherwise depend on the order of the runs."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def run_child(cmd, env=None):
    """Runs a command; returns (stdout, stderr, wall seconds, peak RSS in GiB) of that child alone."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{cmd[0]} failed ({code}):\n{err[-3000:]}")
    return out, err, wall, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def diffusers_run(args, mode):
    py = Path(args.venv) / "bin" / "python"
    cmd = [str(py), str(HERE / "diffusers_run.py"), "--model", args.model, "--size", str(args.size),
           "--steps", str(args.steps), "--seed", str(args.seed), "--mode", mode]
    out, _, wall, rss = run_child(cmd)
    r = json.loads(out.strip().splitlines()[-1])
    return {"load": r["load"], "text_encoder": r["text_encoder"], "unet_step": r["unet_step"],
            "vae_decode": r["vae_decode"], "wall": wall, "rss": rss, "precision": mode}


def openvino_run(args):
    py = Path(args.openvino_venv) / "bin" / "python"
    cmd = [str(py), str(HERE / "openvino_run.py"), "--model", args.model, "--size", str(args.size),
           "--steps", str(args.steps), "--seed", str(args.seed), "--precision", args.openvino_precision]
    if args.openvino_cache:
        cmd += ["--cache-dir", args.openvino_cache]
    out, _, wall, rss = run_child(cmd)
    r = json.loads(out.strip().splitlines()[-1])
    precision = f"{r['precision']}, model cache" if args.openvino_cache else r["precision"]
    return {"load": r["load"], "text_encoder": r["text_encoder"], "unet_step": r["unet_step"],
            "vae_decode": r["vae_decode"], "wall": wall, "rss": rss, "precision": precision}


# sd-cli's note where it runs another dtype than asked (bf16 on a CPU without AMX or AVX512_BF16).
RAN_INSTEAD = re.compile(r"note: running (\w+) instead of (\w+)")
SUMMARY = re.compile(r"load ([\d.]+)s \| text encoder ([\d.]+)s \| denoise ([\d.]+)s \(([\d.]+)s/step\) \| vae decode ([\d.]+)s")


def ours_run(args, dtype):
    cmd = [args.sd_cli, "generate", "--model", args.model, "--prompt", "a photograph of an astronaut riding a horse",
           "--height", str(args.size), "--width", str(args.size), "--steps", str(args.steps), "--seed", str(args.seed),
           "--scheduler", "euler", "--dtype", dtype, "--out", "/tmp/side_by_side.png"]
    # Without --weight-cache, none: sd-cli's default folder would make the first round write it.
    env = dict(os.environ, SD_WEIGHT_CACHE=args.weight_cache or "off")
    out, err, wall, rss = run_child(cmd, env)
    m = SUMMARY.search(out)
    if not m:
        sys.exit(f"could not parse sd-cli output: {out}")
    load, text, _, step, vae = map(float, m.groups())
    # The precision it ran in, as for OpenVINO: not always the one asked for.
    ran = RAN_INSTEAD.search(err)
    precision = f"{ran[1].lower()} ({dtype} asked)" if ran else dtype
    return {"load": load, "text_encoder": text, "unet_step": step, "vae_decode": vae, "wall": wall, "rss": rss,
            "precision": f"{precision}, weight cache" if args.weight_cache else precision}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache/sd-rs/sd21-random"))
    ap.add_argument("--sd-cli", default=str(HERE.parent / "target/release/sd-cli"))
    ap.add_argument("--venv", default=str(Path.home() / ".cache/sd-rs/fixtures-venv"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mode", choices=["f32", "bf16"], default="f32",
                    help="f32: both in f32; bf16: diffusers bf16 autocast against sd-cli --dtype bf16")
    ap.add_argument("--engines", default="diffusers,sd-rs",
                    help="comma-separated, run in this order each round: diffusers, sd-rs, openvino")
    ap.add_argument("--openvino-venv", default=str(Path.home() / ".cache/sd-rs/openvino-venv"))
    ap.add_argument("--openvino-precision", choices=["default", "f32"], default="default",
                    help="default: OpenVINO's own choice (bf16 on AVX512_BF16 or AMX); f32: forced f32")
    ap.add_argument("--weight-cache", metavar="DIR",
                    help="sd-rs bf16 reads its packed weights from this SD_WEIGHT_CACHE folder (filled by "
                         "one uncounted run first); without it, sd-cli runs with SD_WEIGHT_CACHE=off")
    ap.add_argument("--openvino-cache", metavar="DIR",
                    help="OpenVINO reads its compiled models from this CACHE_DIR (filled by one uncounted run first)")
    ap.add_argument("--cold", action="store_true",
                    help="do not read each engine's weight files into the page cache before its run")
    args = ap.parse_args()

    theirs_mode, ours_dtype = ("f32", "f32") if args.mode == "f32" else ("bf16-autocast", "bf16")
    runners = {"diffusers": lambda: diffusers_run(args, theirs_mode), "sd-rs": lambda: ours_run(args, ours_dtype),
               "openvino": lambda: openvino_run(args)}
    engines = args.engines.split(",")
    if not engines or any(e not in runners for e in engines):
        sys.exit(f"--engines takes a comma-separated list of {', '.join(runners)}")
    model = Path(args.model)
    weights = {"diffusers": model, "sd-rs": model, "openvino": Path.home() / ".cache/sd-rs" / f"openvino-{model.name}"}
    if args.weight_cache and "sd-rs" in engines:
        ours_run(args, ours_dtype)  # writes the cache where it is not there yet
        weights["sd-rs"] = [model, Path(args.weight_cache)]
    if args.openvino_cache and "openvino" in engines:
        openvino_run(args)  # writes the cache where it is not there yet
        weights["openvino"] = [weights["openvino"], Path(args.openvino_cache)]
    results = {e: [] for e in engines}
    for i in range(args.runs):
        for name in engines:
            if not args.cold:
                for folder in weights[name] if isinstance(weights[name], list) else [weights[name]]:
                    read_into_page_cache(folder)
            r = runners[name]()
            results[name].append(r)
            print(f"run {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in r.items()), flush=True)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in STAGES + ["rss"]} for n, rs in results.items()}
    others = [e for e in engines if e != "sd-rs"] if "sd-rs" in engines else []
    row = lambda label, cells: print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n{args.size}x{args.size}, {args.steps} Euler steps, CFG 7.5, medians of {args.runs} runs")
    row("stage", engines + [f"sd-rs / {e}" for e in others])
    row("---", ["---"] * (len(engines) + len(others)))
    row("precision", [",".join(sorted({r["precision"] for r in results[e]})) for e in engines] + [""] * len(others))
    for k, unit in [(k, "s") for k in STAGES] + [("rss", "GiB")]:
        row("peak RSS" if k == "rss" else k,
            [f"{med[e][k]:.2f} {unit}" for e in engines] + [f"{med['sd-rs'][k] / med[e][k]:.2f}" for e in others])
    for e in others:  # the runs of one round are adjacent in time: their ratios are the fair ones
        pairs = [f"{a['wall'] / b['wall']:.2f}" for a, b in zip(results["sd-rs"], results[e])]
        print(f"whole process sd-rs / {e}, per round: {', '.join(pairs)}")


if __name__ == "__main__":
    main()
