//! `sd-cli generate --lora FILE[:SCALE]`: diffusers' two-adapter run (`tests/fixtures/lora`,
//! `set_adapters(["peft", "kohya"], [0.7, 0.4])`) from the command line, and one-line errors.

mod support;

use std::path::PathBuf;

use support::*;

fn lora_fixtures() -> PathBuf {
    pipelines().join("../lora")
}

fn lora_arg(adapter: &str, scale: &str) -> String {
    format!("{}:{scale}", lora_fixtures().join(format!("lora_{adapter}.safetensors")).display())
}

#[test]
fn two_loras_with_weights_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let (model, out_arg) = (pipelines().join("sd2-tiny"), out.display().to_string());
    let (peft, kohya) = (lora_arg("peft", "0.7"), lora_arg("kohya", "0.4"));
    let args = [
        "generate",
        "--prompt",
        "a red cube on a wooden table",
        "--negative-prompt",
        "blurry",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "3",
        "--guidance-scale",
        "7.5",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "7",
        "--lora",
        &peft,
        "--lora",
        &kohya,
        "--out",
        &out_arg,
    ];
    let result = sd_cli(&args);
    assert!(result.status.success(), "{}", stderr(&result));
    let (mean, max) = png_diff(&out, &lora_fixtures().join("both.png"));
    assert!(mean <= 0.5 && max <= 4, "mean |diff| {mean:.3}, max |diff| {max}");
}

#[test]
fn bad_lora_files_are_one_line_errors() {
    let model = pipelines().join("sd2-tiny");
    let err = expect_error(&model, &["--lora", "lora.pt"]);
    assert!(err.contains("pickle"), "{err}");
    let missing = lora_fixtures().join("nope.safetensors");
    let err = expect_error(&model, &["--lora", missing.to_str().unwrap()]);
    assert!(err.contains("nope.safetensors") && err.contains("not found"), "{err}");
}
