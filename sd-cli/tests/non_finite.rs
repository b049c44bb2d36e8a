//! sd-cli never writes a black PNG for NaN or inf: the run fails with exit code 1 and one line
//! naming the stage (a UNet step, the VAE decode) or the invalid scheduler betas.

mod support;

use support::*;

#[test]
fn nan_in_the_vae_fails_at_the_vae_decode() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("sd2-tiny", dir.path());
    fill_with_nan(&model.join("vae/diffusion_pytorch_model.safetensors"), "decoder.conv_out.bias");
    let err = expect_error(&model, &["--height", "64", "--width", "64"]);
    assert!(err.contains("non-finite values (NaN or inf) in the VAE decode"), "{err}");
}

#[test]
fn a_huge_guidance_scale_fails_at_the_first_step() {
    let model = pipelines().join("sd2-tiny");
    let err =
        expect_error(&model, &["--height", "64", "--width", "64", "--guidance-scale", "1e308"]);
    assert!(err.contains("after step 1 of 1 of the UNet: guidance_scale 1e308"), "{err}");
}

#[test]
fn betas_outside_0_1_fail_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("sd2-tiny", dir.path());
    let config = model.join("scheduler/scheduler_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["beta_start"] = 1.5.into();
    json["beta_end"] = 2.0.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let err = expect_error(&model, &["--height", "64", "--width", "64"]);
    assert!(err.contains("betas must be in (0, 1)"), "{err}");
}
