//! The helpers of sd-cli's integration tests, in one module (`mod support;` in each test file):
//! running the binary, the fixture models and cases, comparing PNGs, scratch model copies.
// Each test file uses only some of the helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The tiny fixture models and diffusers' runs of them (`tests/fixtures/pipelines`).
pub fn pipelines() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pipelines")
}

/// diffusers' image-to-image and inpainting runs, their init image and mask, and the 9-channel
/// inpainting model (`tests/fixtures/edit`).
pub fn edit_fixtures() -> PathBuf {
    pipelines().join("../edit")
}

/// The parameters of one of diffusers' fixture runs (`pipelines/CASE.json`).
pub fn read_case(case: &str) -> Value {
    let path = pipelines().join(format!("{case}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `sd-cli generate` arguments for the run of a fixture case: its model, prompts, size, steps and
/// guidance, with `seed`, `scheduler` and the output file `out`.
pub fn generate_args(case: &Value, seed: &Value, scheduler: &str, out: &Path) -> Vec<String> {
    let model = pipelines().join(case["model"].as_str().unwrap());
    let s = |k: &str| case[k].to_string();
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--prompt".into(),
        case["prompt"].as_str().unwrap().into(),
        "--model".into(),
        model.display().to_string(),
        "--height".into(),
        s("height"),
        "--width".into(),
        s("width"),
        "--steps".into(),
        s("num_inference_steps"),
        "--guidance-scale".into(),
        s("guidance_scale"),
        "--seed".into(),
        seed.to_string(),
        "--scheduler".into(),
        scheduler.into(),
        "--out".into(),
        out.display().to_string(),
    ];
    if let Some(neg) = case["negative_prompt"].as_str() {
        args.extend(["--negative-prompt".into(), neg.into()]);
    }
    args
}

/// Runs the sd-cli binary offline (no hub access).
pub fn sd_cli(args: &[&str]) -> Output {
    sd_cli_env(args, &[])
}

/// [`sd_cli`] with extra environment variables. The packed-weight cache is off unless `env`
/// sets `SD_WEIGHT_CACHE`: tests write nothing to the user's cache folder.
pub fn sd_cli_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-cli"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("SD_WEIGHT_CACHE", "off")
        .envs(env.iter().copied())
        .output()
        .expect("sd-cli runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a generate that must fail; returns its one-line error.
pub fn expect_error(model: &Path, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png").display().to_string();
    let model = model.display().to_string();
    let mut args =
        vec!["generate", "--prompt", "a cat", "--model", &model, "--seed", "1", "--out", &out];
    if !extra.contains(&"--steps") {
        args.extend(["--steps", "1"]);
    }
    args.extend_from_slice(extra);
    let result = sd_cli(&args);
    let err = stderr(&result);
    assert!(!result.status.success(), "expected failure for {extra:?}");
    assert_eq!(result.status.code(), Some(1), "exit code for {extra:?}: {err}");
    assert!(!err.contains("panicked"), "panic for {extra:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err}");
    assert!(!Path::new(&out).exists(), "no output file on error");
    err
}

/// Mean and max absolute difference of two PNGs of the same size, in 8-bit levels.
pub fn png_diff(a: &Path, b: &Path) -> (f64, u8) {
    let a = image::open(a).unwrap().to_rgb8();
    let b = image::open(b).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut sum, mut max) = (0u64, 0u8);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.as_raw().len() as f64, max)
}

/// Copies the fixture model `name` into `to`, so that a test can damage the copy.
pub fn copy_model(name: &str, to: &Path) -> PathBuf {
    fn copy_dir(from: &Path, to: &Path) {
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
    let dest = to.join(name);
    copy_dir(&pipelines().join(name), &dest);
    dest
}

/// Overwrites the f32 tensor `name` of the safetensors file at `path` with NaN, in place.
pub fn fill_with_nan(path: &Path, name: &str) {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let entry = &header[name];
    assert_eq!(entry["dtype"], "F32", "{name}");
    let offset = |i: usize| 8 + header_len + entry["data_offsets"][i].as_u64().unwrap() as usize;
    for value in bytes[offset(0)..offset(1)].chunks_exact_mut(4) {
        value.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}
