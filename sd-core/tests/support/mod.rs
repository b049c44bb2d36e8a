//! The helpers of sd-core's integration tests, in one module (`mod support;` in each test file):
//! fixture paths and files, comparisons with the reference tensors and images, the fixture
//! pipelines, scratch copies of folders, and the fake Hugging Face hub (`hub_server`).
// Each test file uses only some of the helpers.
#![allow(dead_code)]

pub mod hub_server;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_core::loading::{build_component, read_json, WeightStore};
use sd_core::pipeline::{GenerateParams, StableDiffusionPipeline};
use serde::de::DeserializeOwned;

// ---- fixture paths and files ----

/// `tests/fixtures` of the repository (written by `scripts/fixtures/*`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The tiny fixture models and diffusers' runs of them.
pub fn pipelines() -> PathBuf {
    fixtures().join("pipelines")
}

/// diffusers' image-to-image and inpainting runs (`scripts/fixtures/gen_edit_pipelines.py`): the
/// init image and mask, the 9-channel inpainting model, and a `.json`, `.safetensors` and PNGs
/// per case.
pub fn edit_fixtures() -> PathBuf {
    fixtures().join("edit")
}

/// torch's random numbers and diffusers' scheduler schedules and steps.
pub fn scheduler_fixtures() -> PathBuf {
    fixtures().join("schedulers")
}

/// transformers' tokenizations and the tokenizer folders they were made with.
pub fn tokenizer_fixtures() -> PathBuf {
    fixtures().join("tokenizer")
}

/// The configs of the real SD 2.1 checkpoint (no weights).
pub fn sd21_configs() -> PathBuf {
    fixtures().join("sd21-configs")
}

/// A JSON file as `T`; panics with sd-core's error, which names the file.
pub fn read_json_file<T: DeserializeOwned>(path: &Path) -> T {
    read_json(path).unwrap_or_else(|e| panic!("{e}"))
}

/// Every tensor of a safetensors file, on the CPU; panics naming the file.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The reference tensors of a pipeline fixture (`pipelines/NAME`).
pub fn load_refs(name: &str) -> HashMap<String, Tensor> {
    read_tensors(&pipelines().join(name))
}

pub fn get<'a>(refs: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    refs.get(key).unwrap_or_else(|| panic!("fixture tensor `{key}` missing"))
}

/// The parameters of one of diffusers' fixture runs (`pipelines/NAME.json`).
#[derive(Debug, serde::Deserialize)]
pub struct Case {
    pub model: String,
    pub scheduler: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub height: usize,
    pub width: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    pub num_images_per_prompt: usize,
}

pub fn load_case(name: &str) -> Case {
    read_json_file(&pipelines().join(format!("{name}.json")))
}

impl Case {
    /// The run's `GenerateParams`, as diffusers was called.
    pub fn params(&self) -> GenerateParams {
        let mut p = GenerateParams::new(self.prompt.clone());
        p.negative_prompts = self.negative_prompt.clone().map(|n| vec![n]);
        p.height = Some(self.height);
        p.width = Some(self.width);
        p.num_inference_steps = self.num_inference_steps;
        p.guidance_scale = self.guidance_scale;
        p.num_images_per_prompt = self.num_images_per_prompt;
        p.seeds = vec![self.seed];
        p.scheduler = Some(self.scheduler.clone());
        p
    }
}

/// A fixture model (`pipelines/NAME`) loaded in f32 on the CPU, as the parity runs use it.
pub fn fixture_pipeline(name: &str) -> StableDiffusionPipeline {
    StableDiffusionPipeline::from_folder(&pipelines().join(name), DType::F32, &Device::Cpu, None)
        .unwrap()
}

/// One component folder of a model (`.../unet`) built in f32 on the CPU from its `config.json`
/// and its weights `WEIGHTS.safetensors`, as the pipeline loads it; `new` is the model's `new`.
pub fn load_component<C: DeserializeOwned, M>(
    dir: &Path,
    weights: &str,
    new: impl FnOnce(VarBuilder<'static>, &C) -> candle_core::Result<M>,
) -> M {
    let cfg: C = read_json(&dir.join("config.json")).unwrap();
    let store = WeightStore::open_component(dir, weights, None).unwrap();
    build_component(dir, store, DType::F32, &Device::Cpu, |vb| new(vb, &cfg)).unwrap()
}

// ---- comparisons ----

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let a = actual.to_dtype(DType::F32).unwrap();
    let e = expected.to_dtype(DType::F32).unwrap();
    let diff = (a - &e).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = e.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    diff / scale
}

#[track_caller]
pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: f32, what: &str) {
    let err = rel_err(actual, expected);
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

/// Mean and max absolute difference of two 8-bit images.
pub fn image_diff(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let mut sum = 0u64;
    let mut max = 0u8;
    for (&x, &y) in a.iter().zip(b) {
        let d = x.abs_diff(y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.len() as f64, max)
}

/// The fidelity bound of the project: mean |diff| <= 0.5 and max |diff| <= 4 in 8-bit levels.
#[track_caller]
pub fn assert_image_close(actual: &[u8], expected: &[u8], what: &str) {
    let (mean, max) = image_diff(actual, expected);
    assert!(mean <= 0.5 && max <= 4, "{what}: mean |diff| {mean:.3}, max |diff| {max}");
}

// ---- scratch folders ----

/// Copies the folder `from` to `to` (created), recursively, so that a test can alter the copy.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file under `root` as `/`-separated relative paths (symlinks followed).
pub fn files_under(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().into_string().unwrap();
            let path = entry.path();
            if path.is_dir() {
                walk(&path, &format!("{prefix}{name}/"), out);
            } else {
                out.insert(format!("{prefix}{name}"));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, "", &mut out);
    out
}
