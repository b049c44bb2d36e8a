//! `sd-cli generate --lora FILE[:SCALE]`: diffusers' two-adapter run (`tests/fixtures/lora`,
//! `set_adapters(["peft", "kohya"], [0.7, 0.4])`) from the command line, its metadata and
//! `--from` replay, and one-line errors.

mod support;

use std::path::PathBuf;

use sd_core::metadata::read_png_parameters;
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
    // The model and LoRA hashes cached in this test's folder, not the user's.
    let env = [("XDG_CACHE_HOME", dir.path().to_str().unwrap())];
    let result = sd_cli_env(&args, &env);
    assert!(result.status.success(), "{}", stderr(&result));
    let (mean, max) = png_diff(&out, &lora_fixtures().join("both.png"));
    assert!(mean <= 0.5 && max <= 4, "mean |diff| {mean:.3}, max |diff| {max}");

    // A1111's LoRA tags after the prompt and its "Lora hashes" (SHA-256 of the files, 10 digits).
    let text = read_png_parameters(&std::fs::read(&out).unwrap()).unwrap().unwrap();
    let first = text.lines().next().unwrap();
    assert_eq!(first, "a red cube on a wooden table <lora:lora_peft:0.7> <lora:lora_kohya:0.4>");
    let hashes = quoted_value(&text, "Lora hashes: ");
    let names: Vec<&str> = hashes.split(", ").map(|p| p.split_once(": ").unwrap().0).collect();
    assert_eq!(names, ["lora_peft", "lora_kohya"], "{text}");

    // --from with the LoRAs makes the same image; without them, a warning names them.
    let again = dir.path().join("again.png");
    let from = ["generate", "--from", &out_arg, "--model", model.to_str().unwrap()];
    let again_arg = again.display().to_string();
    let with_loras =
        [&from[..], &["--lora", &peft, "--lora", &kohya, "--out", &again_arg]].concat();
    let result = sd_cli_env(&with_loras, &env);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(png_diff(&out, &again), (0.0, 0));
    let result = sd_cli_env(&[&from[..], &["--out", &again_arg]].concat(), &env);
    assert!(result.status.success(), "{}", stderr(&result));
    let warning = "made with LoRAs lora_peft (0.7), lora_kohya (0.4); pass them with --lora";
    assert!(stderr(&result).contains(warning), "{}", stderr(&result));
}

/// The quoted value of `key` in an infotext.
fn quoted_value(text: &str, key: &str) -> String {
    let start = text.find(key).unwrap_or_else(|| panic!("no `{key}` in {text}")) + key.len();
    let rest = text[start..].strip_prefix('"').expect("a quoted value");
    rest[..rest.find('"').unwrap()].to_string()
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
