"""One OpenVINO text-to-image run with per-stage timings, printed as one JSON line (like diffusers_run.py).

Runs in the OpenVINO venv, which also sees the fixtures venv (torch, diffusers, transformers) through a
`.pth` file; side_by_side.py runs it with --engines ...,openvino. One-time setup and conversion:

    python3 -m venv ~/.cache/sd-rs/openvino-venv
    ~/.cache/sd-rs/openvino-venv/bin/pip install openvino==2026.4.1
    echo ~/.cache/sd-rs/fixtures-venv/lib/python3.11/site-packages \\
        > ~/.cache/sd-rs/openvino-venv/lib/python3.11/site-packages/fixtures-venv.pth
    nice -n 19 ~/.cache/sd-rs/openvino-venv/bin/python benches/openvino_run.py --convert

(the fixtures venv: `python3 -m venv ~/.cache/sd-rs/fixtures-venv` and
`pip install -r scripts/fixtures/requirements.txt` in it). --convert traces the model folder's text
encoder, UNet and VAE decoder (incl. post_quant_conv) with `openvino.convert_model` and saves f32 IR
(about 5 GB) into --ir (default ~/.cache/sd-rs/openvino-<model folder name>), skipping parts already
there (about 5 min on 2 cores). The IR keeps dynamic dims; a run reshapes it to static shapes for
--size (a multiple of 64) before compiling, so one conversion serves every size. A run does --steps
Euler steps (the scheduler config's prediction type) with CFG (UNet batch 2) and one VAE decode:

    ~/.cache/sd-rs/openvino-venv/bin/python benches/openvino_run.py --size 512 --steps 4
"""

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch

PARTS = ["text_encoder", "unet", "vae_decoder"]
PROMPT = "a photograph of an astronaut riding a horse"


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, return_dict=False)[0]


class UNet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def convert(args):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    lat = args.size // 8
    os.makedirs(args.ir, exist_ok=True)
    for part in PARTS:
        xml = Path(args.ir) / f"{part}.xml"
        if xml.exists():
            print(f"{xml} exists, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        if part == "text_encoder":
            module = TextEncoder(CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder"))
            example = {"input_ids": torch.zeros(1, 77, dtype=torch.int64)}
        elif part == "unet":
            module = UNet(UNet2DConditionModel.from_pretrained(args.model, subfolder="unet"))
            example = {"sample": torch.randn(2, 4, lat, lat), "timestep": torch.tensor([999.0]),
                       "encoder_hidden_states": torch.randn(2, 77, module.model.config.cross_attention_dim)}
        else:
            module = VaeDecoder(AutoencoderKL.from_pretrained(args.model, subfolder="vae"))
            example = {"latents": torch.randn(1, 4, lat, lat)}
        with torch.no_grad():
            model = ov.convert_model(module.eval(), example_input=example)
        ov.save_model(model, xml, compress_to_fp16=False)  # keep the f32 weights: the runtime picks the precision
        del module, model
        gc.collect()
        print(f"{part}: converted in {time.perf_counter() - t0:.1f} s -> {xml}", flush=True)


def run(args):
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    lat = args.size // 8
    read = lambda part: json.loads((Path(args.model) / part / "config.json").read_text())
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    if args.precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    if args.cache_dir:
        config["CACHE_DIR"] = args.cache_dir
    shapes = {"text_encoder": {"input_ids": [1, 77]},
              "unet": {"sample": [2, 4, lat, lat], "timestep": [1],
                       "encoder_hidden_states": [2, 77, read("unet")["cross_attention_dim"]]},
              "vae_decoder": {"latents": [1, 4, lat, lat]}}

    t0 = time.perf_counter()
    core = ov.Core()
    compiled = {}
    for part in PARTS:
        model = core.read_model(Path(args.ir) / f"{part}.xml")
        model.reshape({name: ov.PartialShape(s) for name, s in shapes[part].items()})
        compiled[part] = core.compile_model(model, "CPU", config)
    req = {part: c.create_infer_request() for part, c in compiled.items()}
    load = time.perf_counter() - t0

    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    scheduler = EulerDiscreteScheduler.from_pretrained(args.model, subfolder="scheduler")
    scaling = read("vae").get("scaling_factor", 0.18215)

    t_run = time.perf_counter()
    t0 = time.perf_counter()
    embeds = []
    for text in ["", PROMPT]:  # unconditional first, as diffusers concatenates them
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="np").input_ids.astype(np.int64)
        embeds.append(req["text_encoder"].infer({"input_ids": ids})[0].copy())
    embeds = np.concatenate(embeds)
    text_encoder = time.perf_counter() - t0

    scheduler.set_timesteps(args.steps)
    gen = torch.Generator("cpu").manual_seed(args.seed)
    latents = torch.randn(1, 4, lat, lat, generator=gen) * scheduler.init_noise_sigma
    unet = []
    for t in scheduler.timesteps:
        sample = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        t0 = time.perf_counter()
        noise = req["unet"].infer({"sample": sample.numpy(), "timestep": np.array([float(t)], np.float32),
                                   "encoder_hidden_states": embeds})[0]
        unet.append(time.perf_counter() - t0)
        uncond, cond = torch.from_numpy(noise.copy()).chunk(2)
        latents = scheduler.step(uncond + args.guidance * (cond - uncond), t, latents).prev_sample

    t0 = time.perf_counter()
    image = req["vae_decoder"].infer({"latents": (latents / scaling).numpy()})[0]
    vae_decode = time.perf_counter() - t0
    image = (np.clip(image / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)  # what a pipeline would save
    run = time.perf_counter() - t_run

    precision = {p: c.get_property("INFERENCE_PRECISION_HINT").get_type_name() for p, c in compiled.items()}
    print(json.dumps({
        "load": load, "run": run, "text_encoder": text_encoder, "unet_step": sorted(unet)[len(unet) // 2],
        "denoise": sum(unet), "vae_decode": vae_decode, "threads": args.threads,
        "precision": precision["unet"], "precisions": precision,
        "openvino": ov.__version__.split("-")[0],
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache/sd-rs/sd21-random"))
    ap.add_argument("--ir", help="IR folder (default ~/.cache/sd-rs/openvino-<model folder name>)")
    ap.add_argument("--convert", action="store_true", help="convert the model to IR (once) instead of running")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", choices=["default", "f32"], default="default",
                    help="default: OpenVINO's own choice (bf16 where the CPU has it); f32: forced")
    ap.add_argument("--cache-dir", help="OpenVINO's model cache (CACHE_DIR): the first load writes the compiled "
                                         "models there, later loads read them")
    args = ap.parse_args()
    args.ir = args.ir or str(Path.home() / f".cache/sd-rs/openvino-{Path(args.model).resolve().name}")
    convert(args) if args.convert else run(args)


if __name__ == "__main__":
    main()
