//! `sd-cli generate --image [--mask] [--strength]` end to end: diffusers' image-to-image and
//! inpainting runs (`tests/fixtures/edit`) reproduced from the command line, with the size taken
//! from the image, and one-line errors for bad edit input.

mod support;

use std::path::PathBuf;

use serde_json::Value;
use support::*;

fn read_edit_case(case: &str) -> Value {
    let path = edit_fixtures().join(format!("{case}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn model_folder(name: &str) -> PathBuf {
    match name {
        "sd2-tiny" => pipelines().join(name),
        other => edit_fixtures().join(other),
    }
}

fn path_arg(path: PathBuf) -> String {
    path.display().to_string()
}

/// Runs the CLI with a case's parameters (no --height/--width: the image's size rounded down to
/// a multiple of 8, as in diffusers) and compares each image with diffusers'.
fn edit_case(case: &str) {
    let json = read_edit_case(case);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let s = |k: &str| json[k].to_string();
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--prompt".into(),
        json["prompt"].as_str().unwrap().into(),
        "--model".into(),
        path_arg(model_folder(json["model"].as_str().unwrap())),
        "--image".into(),
        path_arg(edit_fixtures().join("init.png")),
        "--strength".into(),
        s("strength"),
        "--steps".into(),
        s("num_inference_steps"),
        "--guidance-scale".into(),
        s("guidance_scale"),
        "--seed".into(),
        s("seed"),
        "--scheduler".into(),
        json["scheduler"].as_str().unwrap().into(),
        "--num-images".into(),
        s("num_images_per_prompt"),
        "--out".into(),
        path_arg(out.clone()),
    ];
    if let Some(neg) = json["negative_prompt"].as_str() {
        args.extend(["--negative-prompt".into(), neg.into()]);
    }
    if json["pipeline"] == "inpaint" {
        args.extend(["--mask".into(), path_arg(edit_fixtures().join("mask.png"))]);
    }
    let result = sd_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(result.status.success(), "{case}: {}", stderr(&result));
    let n = json["num_images_per_prompt"].as_u64().unwrap();
    for i in 0..n {
        let (ours, theirs) = if n == 1 {
            (out.clone(), edit_fixtures().join(format!("{case}.png")))
        } else {
            (
                dir.path().join(format!("out-{i}.png")),
                edit_fixtures().join(format!("{case}-{i}.png")),
            )
        };
        let (mean, max) = png_diff(&ours, &theirs);
        assert!(mean <= 0.5 && max <= 4, "{case} image {i}: mean |diff| {mean:.3}, max {max}");
    }
}

#[test]
fn img2img_heun_matches_diffusers() {
    edit_case("img2img_heun");
}

#[test]
fn img2img_two_images_match_diffusers() {
    edit_case("img2img_euler_two");
}

#[test]
fn inpainting_with_a_plain_unet_matches_diffusers() {
    edit_case("inpaint4_euler_a_s07");
}

#[test]
fn inpainting_with_an_inpainting_unet_matches_diffusers() {
    edit_case("inpaint9_ddim");
}

#[test]
fn bad_edit_input_gives_one_line_errors() {
    let model = pipelines().join("sd2-tiny");
    let init = path_arg(edit_fixtures().join("init.png"));
    let mask = path_arg(edit_fixtures().join("mask.png"));
    let dir = tempfile::tempdir().unwrap();

    let err = expect_error(&model, &["--image", "no-such-image.png"]);
    assert!(err.contains("cannot read image no-such-image.png"), "{err}");
    let not_an_image = dir.path().join("not-an-image.png");
    std::fs::write(&not_an_image, b"not a png").unwrap();
    let err = expect_error(&model, &["--image", &path_arg(not_an_image)]);
    assert!(err.contains("cannot read image") && err.contains("not-an-image.png"), "{err}");

    let small_mask = dir.path().join("small-mask.png");
    image::GrayImage::new(16, 16).save(&small_mask).unwrap();
    let err = expect_error(&model, &["--image", &init, "--mask", &path_arg(small_mask)]);
    assert!(err.contains("the mask is 16x16 but the image is 75x61"), "{err}");

    for strength in ["0", "1.5"] {
        let err = expect_error(&model, &["--image", &init, "--strength", strength]);
        assert!(err.contains("strength must be in (0, 1]"), "{err}");
    }
    let err = expect_error(&model, &["--mask", &mask]);
    assert!(err.contains("--mask needs --image"), "{err}");
    let err = expect_error(&model, &["--strength", "0.5"]);
    assert!(err.contains("--strength needs --image"), "{err}");

    let inpainting_model = edit_fixtures().join("sd2-inpaint-tiny");
    let err = expect_error(&inpainting_model, &["--image", &init]);
    assert!(err.contains("9 input channels") && err.contains("mask"), "{err}");
}
