//! Writes the full Stable Diffusion 2.1 model (UNet 865.9 M, VAE 83.7 M, text encoder 340.4 M
//! parameters) with random weights as a diffusers folder, for benchmarks and memory checks of
//! the real architecture without downloading the checkpoint.
//!
//! ```sh
//! cargo run --release -p sd-core --example make_random_model -- \
//!     [--configs DIR] [--out DIR] [--seed N]
//! sd-cli generate --model ~/.cache/sd-rs/sd21-random --prompt test --steps 1 --out x.png
//! ```
//!
//! * `--configs`: the SD 2.1 configs (default `$SD21_CONFIGS`, else the repository's
//!   `tests/fixtures/sd21-configs`).
//! * `--out`: the model folder (default `$SD_RS_RANDOM_MODEL`, else
//!   `~/.cache/sd-rs/sd21-random`). Written in diffusers' layout, f32 safetensors (about 5 GB).
//! * `--seed`: the weights are a function of the seed (default 0) and the tensor names.
//!
//! The weights follow torch's default initialisation, from a generator seeded by `--seed` and
//! the tensor's name: matrices and convolution kernels (and embeddings) uniform in
//! `±1/sqrt(fan_in)`, biases zero and norm scales one, so activations keep a sane scale through
//! the whole network. (sd-core's layers ask the `VarBuilder` for their weights without an
//! initialisation hint, so `VarMap` builds them all as zeros: every tensor is filled here.) The
//! tokenizer (the CLIP BPE vocabulary, which the configs lack) is copied from the tiny SD 2.x test
//! fixture.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rayon::prelude::*;
use sd_core::loading::read_json;
use sd_core::models::clip_text::{ClipTextConfig, ClipTextModel};
use sd_core::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sd_core::models::vae::{AutoencoderKL, AutoencoderKLConfig};

fn main() -> anyhow::Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut configs = std::env::var_os("SD21_CONFIGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("tests/fixtures/sd21-configs"));
    let mut out = match std::env::var_os("SD_RS_RANDOM_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; pass --out")?)
            .join(".cache/sd-rs/sd21-random"),
    };
    let mut seed = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--configs" => configs = PathBuf::from(value()?),
            "--out" => out = PathBuf::from(value()?),
            "--seed" => seed = value()?.parse().context("--seed")?,
            _ => bail!(
                "unknown argument {arg}; usage: make_random_model [--configs DIR] [--out DIR] \
                 [--seed N]"
            ),
        }
    }
    if !configs.join("unet/config.json").exists() {
        bail!(
            "SD 2.1 configs not found at {} (pass --configs or set SD21_CONFIGS)",
            configs.display()
        );
    }
    let tokenizer = repo.join("tests/fixtures/pipelines/sd2-tiny/tokenizer");

    for sub in ["unet", "vae", "text_encoder", "scheduler", "tokenizer"] {
        std::fs::create_dir_all(out.join(sub))?;
    }
    copy(&configs.join("model_index.json"), &out.join("model_index.json"))?;
    copy(
        &configs.join("scheduler/scheduler_config.json"),
        &out.join("scheduler/scheduler_config.json"),
    )?;
    for entry in
        std::fs::read_dir(&tokenizer).with_context(|| format!("reading {}", tokenizer.display()))?
    {
        let entry = entry?;
        copy(&entry.path(), &out.join("tokenizer").join(entry.file_name()))?;
    }

    // One component at a time, so only one is in memory.
    component(
        &configs,
        &out,
        "text_encoder",
        "model.safetensors",
        seed,
        |vb, cfg: &ClipTextConfig| ClipTextModel::new(vb.pp("text_model"), cfg).map(drop),
    )?;
    component(
        &configs,
        &out,
        "unet",
        "diffusion_pytorch_model.safetensors",
        seed,
        |vb, cfg: &UNet2DConditionConfig| UNet2DConditionModel::new(vb, cfg).map(drop),
    )?;
    component(
        &configs,
        &out,
        "vae",
        "diffusion_pytorch_model.safetensors",
        seed,
        |vb, cfg: &AutoencoderKLConfig| AutoencoderKL::new(vb, cfg).map(drop),
    )?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Copies the contents only, not the permissions (a read-only source, such as a read-only
/// checkout, must not give read-only copies).
fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let _ = std::fs::remove_file(to);
    std::fs::write(to, data).with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

/// Builds one component from its config, randomises it and saves it as `out/sub/file`, with
/// the config next to it.
fn component<C: serde::de::DeserializeOwned>(
    configs: &Path,
    out: &Path,
    sub: &str,
    file: &str,
    seed: u64,
    build: impl FnOnce(VarBuilder, &C) -> candle_core::Result<()>,
) -> anyhow::Result<()> {
    let config_path = configs.join(sub).join("config.json");
    let cfg: C = read_json(&config_path)?;
    let map = VarMap::new();
    build(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu), &cfg)?;
    let mut vars: Vec<(String, Var)> =
        map.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    for (name, var) in &vars {
        randomize(name, var, seed ^ fnv1a(&format!("{sub}/{name}")))?;
    }
    copy(&config_path, &out.join(sub).join("config.json"))?;
    let path = out.join(sub).join(file);
    map.save(&path)?;
    println!(
        "{sub}: {} tensors, {:.1} M parameters -> {}",
        vars.len(),
        params as f64 / 1e6,
        path.display()
    );
    Ok(())
}

/// Fills a tensor as torch initialises it: uniform in `±1/sqrt(fan_in)` for tensors of two
/// or more dimensions (fan-in: the product of all but the first), ones for one-dimensional
/// `weight`s (norm scales), zeros for the rest (biases).
fn randomize(name: &str, var: &Var, seed: u64) -> anyhow::Result<()> {
    let t = var.as_tensor();
    let dims = t.dims();
    let fresh = if dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        let mut fresh = vec![0f32; t.elem_count()];
        fresh.par_chunks_mut(1 << 16).enumerate().for_each(|(i, chunk)| {
            let base = splitmix(seed ^ splitmix(i as u64));
            for (j, x) in chunk.iter_mut().enumerate() {
                let state = splitmix(base.wrapping_add(j as u64));
                let u = (state >> 40) as f32 / (1u32 << 24) as f32; // [0, 1)
                *x = bound * (2.0 * u - 1.0);
            }
        });
        Tensor::from_vec(fresh, dims, t.device())?
    } else if name.ends_with("weight") {
        Tensor::ones(dims, DType::F32, t.device())?
    } else {
        Tensor::zeros(dims, DType::F32, t.device())?
    };
    var.set(&fresh)?;
    Ok(())
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
