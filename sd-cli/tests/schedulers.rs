//! `sd-cli schedulers` and `sd-cli generate --scheduler NAME` with A1111 names (spaces and all),
//! short names and class names, against diffusers' images of the same runs
//! (`tests/fixtures/pipelines/sched_*`, from `scripts/fixtures/gen_scheduler_pipelines.py`).

mod support;

use support::*;

/// Runs `sd-cli generate` with the parameters of fixture `case` and `--scheduler scheduler` (a
/// spelling that must mean the case's scheduler), and compares the image with diffusers'.
fn generate_with(case: &str, scheduler: &str) {
    let json = read_case(case);
    assert_eq!(json["num_images_per_prompt"], 1, "{case}: one image");
    assert_eq!(json["seeds"].as_array().unwrap().len(), 1, "{case}: one seed");
    assert!(
        json["scheduler_config"].as_object().unwrap().is_empty(),
        "{case}: the model's scheduler config"
    );
    assert_eq!(json["guidance_rescale"].as_f64(), Some(0.0), "{case}: no guidance rescale");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let args = generate_args(&json, &json["seeds"][0], scheduler, &out);
    let result = sd_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(result.status.success(), "{case} --scheduler {scheduler:?}: {}", stderr(&result));
    let (mean, max) = png_diff(&out, &pipelines().join(format!("{case}.png")));
    assert!(
        mean <= 0.5 && max <= 4,
        "{case} --scheduler {scheduler:?}: mean |diff| {mean:.3}, max |diff| {max}"
    );
}

#[test]
fn generate_dpmpp_2m_karras_by_a1111_name() {
    generate_with("sched_dpmpp_2m_karras", "DPM++ 2M Karras");
}

#[test]
fn generate_euler_a_by_a1111_name() {
    generate_with("sched_euler_a", "Euler a");
}

#[test]
fn generate_dpmpp_2m_sde_karras_by_short_name() {
    generate_with("sched_dpmpp_2m_sde_karras", "dpmpp_2m_sde_karras");
}

#[test]
fn generate_dpm2_a_by_other_spelling() {
    generate_with("sched_dpm2_a", "dpm2-a");
}

#[test]
fn generate_unipc_by_class_name() {
    generate_with("sched_unipc", "UniPCMultistepScheduler");
}

#[test]
fn schedulers_lists_every_name() {
    let out = sd_cli(&["schedulers"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text.lines().next().unwrap();
    for col in ["A1111 NAME", "SHORT NAMES", "DIFFUSERS CLASS", "CONFIG OVERRIDES"] {
        assert!(header.contains(col), "header: {header}");
    }
    for name in [
        "Euler",
        "Euler a",
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DPM++ 2M SDE",
        "DPM++ 2M SDE Karras",
        "DDIM",
        "PNDM",
        "UniPC",
        "LMS",
        "LMS Karras",
        "Heun",
        "DPM2",
        "DPM2 a",
        "DPM2 Karras",
        "DPM2 a Karras",
        "DEIS",
        "LCM",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name}  "))),
            "no row for `{name}`:\n{text}"
        );
    }
    for name in sd_core::schedulers::scheduler_names() {
        assert!(text.contains(name), "`{name}` is not listed:\n{text}");
    }
    let karras = text.lines().find(|l| l.starts_with("DPM++ 2M SDE Karras ")).unwrap();
    assert!(karras.contains("DPMSolverMultistepScheduler"), "{karras}");
    assert!(
        karras.contains("algorithm_type=sde-dpmsolver++")
            && karras.contains("use_karras_sigmas=true"),
        "{karras}"
    );
}

#[test]
fn unknown_scheduler_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let model = pipelines().join("sd2-tiny");
    let result = sd_cli(&[
        "generate",
        "--prompt",
        "x",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "2",
        "--scheduler",
        "DPM++ 3M Turbo",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(result.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("DPM++ 3M Turbo") && stderr.contains("DPM++ 2M Karras"), "{stderr}");
    assert!(!out.exists());
}
