//! `sd-cli generate --embedding --clip-skip --prompt-syntax` end to end: diffusers' textual
//! inversion and clip_skip runs and the A1111 long-prompt run (`tests/fixtures/text`) from the
//! command line, and one-line errors for refused embeddings.

mod support;

use std::path::PathBuf;

use serde_json::Value;
use support::*;

fn text_fixtures() -> PathBuf {
    pipelines().join("../text")
}

fn path_arg(path: PathBuf) -> String {
    path.display().to_string()
}

/// Runs a `text/` case with `extra` flags and compares the image with diffusers'.
fn text_case(case: &str, extra: &[String]) {
    let path = text_fixtures().join(format!("{case}.json"));
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let mut args = generate_args(&json, &json["seed"], "DDIMScheduler", &out);
    args.extend_from_slice(extra);
    let result = sd_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(result.status.success(), "{case}: {}", stderr(&result));
    let (mean, max) = png_diff(&out, &text_fixtures().join(format!("{case}.png")));
    assert!(mean <= 0.5 && max <= 4, "{case}: mean |diff| {mean:.3}, max {max}");
}

#[test]
fn embeddings_match_diffusers() {
    let emb_params = path_arg(text_fixtures().join("ti_emb_params.safetensors"));
    let a1111 = path_arg(text_fixtures().join("ti_a1111.safetensors"));
    let flags =
        ["--embedding".into(), format!("{emb_params}:<red-cube>"), "--embedding".into(), a1111];
    text_case("ti", &flags);
}

#[test]
fn clip_skip_matches_diffusers() {
    text_case("clip_skip", &["--clip-skip".into(), "1".into()]);
}

#[test]
fn a1111_long_prompt_matches_its_reference() {
    text_case("a1111_long", &["--prompt-syntax".into(), "a1111".into()]);
}

#[test]
fn refused_embeddings_and_clip_skip_give_one_line_errors() {
    let model = pipelines().join("sd2-tiny");
    let dir = tempfile::tempdir().unwrap();
    let pickle = dir.path().join("embedding.pt");
    std::fs::write(&pickle, b"not read").unwrap();
    let err = expect_error(&model, &["--embedding", &path_arg(pickle)]);
    assert!(err.contains("pickle files are not loaded"), "{err}");

    let a1111 = path_arg(text_fixtures().join("ti_a1111.safetensors"));
    let err = expect_error(&model, &["--embedding", &format!("{a1111}:cat</w>")]);
    assert!(err.contains("token cat</w> is already in the tokenizer's vocabulary"), "{err}");

    let err = expect_error(&model, &["--clip-skip", "2"]);
    assert!(err.contains("clip_skip 2 must be less than the text encoder's 2 layers"), "{err}");
}
