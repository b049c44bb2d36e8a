//! Model configs (text encoder, UNet, VAE `config.json`, `model_index.json`) with junk values,
//! wrong types and missing keys: parsed, built over the fixture model's weights and run on a tiny
//! input, as the pipeline loads them.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd_core::loading::{build_component, read_json, WeightStore};
use sd_core::models::clip_text::ClipTextModel;
use sd_core::models::unet::UNet2DConditionModel;
use sd_core::models::vae::AutoencoderKL;
use sd_core::pipeline::StableDiffusionPipeline;
use sd_core::Error;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::harness::{fuzz, mutate_bytes, mutate_json, mutate_number, Rng};
use crate::support::pipelines;

/// The mutated `config.json` of a component: a text edit, JSON edits, or a number changed (the
/// edit that most often parses and reaches the model code).
fn mutated_config(rng: &mut Rng, base: &Value) -> Vec<u8> {
    match rng.below(5) {
        0 => mutate_bytes(rng, base.to_string().as_bytes()),
        1 | 2 => mutate_json(rng, base).to_string().into_bytes(),
        _ => mutate_number(rng, base).to_string().into_bytes(),
    }
}

/// Reads `config.json` from `dir`, builds the model over the fixture component's weights and
/// runs `forward`. A bad config must be `Error::Config`, a config that does not fit the weights
/// `Error::Weights`; the forward pass may fail only with an error, never a panic.
fn check_component<C: DeserializeOwned, M>(
    dir: &Path,
    component: &str,
    stem: &str,
    new: impl FnOnce(candle_nn::VarBuilder<'static>, &C) -> candle_core::Result<M>,
    forward: impl FnOnce(&M) -> candle_core::Result<Tensor>,
) -> Result<(), String> {
    let cfg: C = match read_json(&dir.join("config.json")) {
        Ok(cfg) => cfg,
        Err(Error::Config { .. } | Error::Io { .. }) => return Ok(()),
        Err(other) => return Err(format!("read_json: {other:?}")),
    };
    let weights = pipelines().join("sd2-tiny").join(component);
    let store = WeightStore::open_component(&weights, stem, None).map_err(|e| e.to_string())?;
    let model = match build_component(&weights, store, DType::F32, &Device::Cpu, |vb| new(vb, &cfg))
    {
        Ok(model) => model,
        Err(Error::Weights { .. }) => return Ok(()),
        Err(other) => return Err(format!("build: {other:?}")),
    };
    forward(&model).ok();
    Ok(())
}

fn fuzz_component(
    target: &str,
    component: &'static str,
    cases: usize,
    check: impl Fn(&Path) -> Result<(), String>,
) {
    let base_path = pipelines().join("sd2-tiny").join(component).join("config.json");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(base_path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), base.to_string()).unwrap();
    check(dir.path()).expect("the fixture config loads");
    fuzz(
        target,
        cases,
        |rng| mutated_config(rng, &base),
        |bytes| bytes.clone(),
        |bytes| {
            std::fs::write(dir.path().join("config.json"), bytes).map_err(|e| e.to_string())?;
            check(dir.path())
        },
    );
}

fn cpu_tensor(shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::ones(shape, DType::F32, &Device::Cpu)? * 0.1
}

#[test]
fn text_encoder_configs() {
    fuzz_component("text encoder config", "text_encoder", 150, |dir| {
        check_component(dir, "text_encoder", "model", ClipTextModel::new, |m: &ClipTextModel| {
            m.forward(&Tensor::new(&[[49406u32, 320, 2368, 49407]], &Device::Cpu)?)
        })
    });
}

#[test]
fn unet_configs() {
    fuzz_component("unet config", "unet", 150, |dir| {
        let new = UNet2DConditionModel::new;
        check_component(dir, "unet", "diffusion_pytorch_model", new, |m: &UNet2DConditionModel| {
            m.forward(&cpu_tensor(&[1, 4, 8, 8])?, 981.0, &cpu_tensor(&[1, 77, 32])?)
        })
    });
}

#[test]
fn vae_configs() {
    fuzz_component("vae config", "vae", 150, |dir| {
        check_component(dir, "vae", "diffusion_pytorch_model", AutoencoderKL::new, |m| {
            m.decode(&cpu_tensor(&[1, 4, 4, 4])?)
        })
    });
}

/// `model_index.json` (its scheduler entry picks the scheduler class), through `from_folder`
/// over links to the fixture model's components.
#[test]
fn model_index_files() {
    let model = pipelines().join("sd2-tiny");
    let dir = tempfile::tempdir().unwrap();
    for sub in ["scheduler", "text_encoder", "tokenizer", "unet", "vae"] {
        std::os::unix::fs::symlink(model.join(sub), dir.path().join(sub)).unwrap();
    }
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model_index.json")).unwrap())
            .unwrap();
    fuzz(
        "model_index",
        40,
        |rng| mutated_config(rng, &base),
        |bytes| bytes.clone(),
        |bytes| {
            std::fs::write(dir.path().join("model_index.json"), bytes)
                .map_err(|e| e.to_string())?;
            match StableDiffusionPipeline::from_folder(dir.path(), DType::F32, &Device::Cpu, None) {
                Ok(_)
                | Err(Error::Config { .. } | Error::Io { .. } | Error::UnknownScheduler { .. }) => {
                    Ok(())
                }
                Err(other) => Err(format!("from_folder: {other:?}")),
            }
        },
    );
}
