//! Shared helpers of the parity tests: fixture paths, loading reference tensors, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn pipelines() -> PathBuf {
    fixtures().join("pipelines")
}

pub fn load_refs(name: &str) -> HashMap<String, Tensor> {
    let path = pipelines().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn get<'a>(refs: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    refs.get(key).unwrap_or_else(|| panic!("fixture tensor `{key}` missing"))
}

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
    let path = pipelines().join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}
