"""One diffusers text-to-image run with per-stage timings, printed as one JSON line.

Run by side_by_side.py in the fixtures venv (torch + diffusers); not a test.
"""

import argparse
import json
import time

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mode", choices=["f32", "bf16-autocast"], default="f32")
    args = ap.parse_args()

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None, feature_extractor=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    load = time.perf_counter() - t0

    stages = {"text_encoder": 0.0, "unet": [], "vae_decode": 0.0}
    starts = {}

    def timed(name, module):
        def pre(*_):
            starts[name] = time.perf_counter()

        def post(*_):
            dt = time.perf_counter() - starts[name]
            if isinstance(stages[name], list):
                stages[name].append(dt)
            else:
                stages[name] += dt

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    timed("text_encoder", pipe.text_encoder)
    timed("unet", pipe.unet)
    timed("vae_decode", pipe.vae.decoder)

    gen = torch.Generator("cpu").manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mode == "bf16-autocast"):
        pipe("a photograph of an astronaut riding a horse", height=args.size, width=args.size,
             num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gen)
    run = time.perf_counter() - t0
    unet = stages["unet"]
    print(json.dumps({
        "load": load, "run": run, "text_encoder": stages["text_encoder"],
        "unet_step": sorted(unet)[len(unet) // 2], "denoise": sum(unet), "vae_decode": stages["vae_decode"],
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
