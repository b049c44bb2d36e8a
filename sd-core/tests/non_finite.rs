//! NaN or inf never ends as a black image: caller-given tensors and scheduler betas are checked
//! up front, and a run stops with `Error::NonFinite` naming the stage where values went
//! non-finite (the latents after a UNet step, the VAE decode).

mod support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd_core::pipeline::{GenerateParams, OutputType, StableDiffusionPipeline};
use sd_core::Error;
use support::*;

fn params() -> GenerateParams {
    let mut p = GenerateParams::new("a red cube on a table");
    p.height = Some(64);
    p.width = Some(64);
    p.num_inference_steps = 2;
    p.seeds = vec![7];
    p
}

/// A copy of sd2-tiny in `dir` whose VAE decoder's last bias is NaN.
fn nan_vae_model(dir: &Path) -> StableDiffusionPipeline {
    let model = dir.join("sd2-tiny");
    copy_dir(&pipelines().join("sd2-tiny"), &model);
    let weights = model.join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let bias = tensors["decoder.conv_out.bias"].clone();
    let nan = Tensor::full(f32::NAN, bias.dims(), &Device::Cpu).unwrap();
    tensors.insert("decoder.conv_out.bias".into(), nan);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    StableDiffusionPipeline::from_folder(&model, DType::F32, &Device::Cpu, None).unwrap()
}

#[test]
fn nan_in_the_vae_stops_at_the_vae_decode() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = nan_vae_model(dir.path());
    let err = pipe.generate(&params()).unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { ref stage, .. } if stage == "in the VAE decode"),
        "{err}"
    );
    assert!(err.to_string().starts_with("non-finite values (NaN or inf) in the VAE decode"));
    // The latents themselves are fine: a latents-only run of the same model succeeds.
    let mut p = params();
    p.output = OutputType::Latent;
    pipe.generate(&p).unwrap();
}

#[test]
fn a_huge_guidance_scale_stops_at_the_first_step() {
    let mut p = params();
    p.guidance_scale = 1e308;
    let err = fixture_pipeline("sd2-tiny").generate(&p).unwrap_err();
    match &err {
        Error::NonFinite { stage, hint } => {
            assert_eq!(stage, "after step 1 of 2 of the UNet");
            assert!(hint.as_deref().is_some_and(|h| h.contains("guidance_scale 1e308")), "{err}");
        }
        _ => panic!("expected NonFinite, got {err}"),
    }
}

#[test]
fn betas_outside_0_1_are_a_config_error() {
    let pipe = fixture_pipeline("sd2-tiny");
    let config = pipe.scheduler_config.clone().with("beta_start", 1.5).with("beta_end", 2.0);
    let mut p = params();
    p.scheduler_config = Some(config);
    let err = pipe.generate(&p).unwrap_err();
    assert!(
        matches!(err, Error::Config { ref msg, .. }
            if msg.contains("beta_start 1.5 and beta_end 2 give beta 1.5")
                && msg.contains("at timestep 0; betas must be in (0, 1)")),
        "{err}"
    );

    let mut trained = vec![0.01; 1000];
    trained[3] = 0.0;
    p.scheduler_config = Some(pipe.scheduler_config.clone().with("trained_betas", trained));
    let err = pipe.generate(&p).unwrap_err();
    assert!(
        matches!(err, Error::Config { ref msg, .. } if msg.contains("trained_betas[3] is 0")),
        "{err}"
    );
}

#[test]
fn non_finite_latents_and_embeddings_are_invalid_arguments() {
    let pipe = fixture_pipeline("sd2-tiny");
    let hidden = pipe.unet.config().cross_attention_dim;
    let nan = |dims: &[usize]| Tensor::full(f32::NAN, dims, &Device::Cpu).unwrap();
    let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();

    let mut p = params();
    p.latents = Some(nan(&[1, 4, 8, 8]));
    let err = pipe.generate(&p).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m.starts_with("latents ")), "{err}");

    let mut p = params();
    p.prompts.clear();
    p.prompt_embeds = Some(nan(&[1, 77, hidden]));
    let err = pipe.generate(&p).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.starts_with("prompt_embeds ")),
        "{err}"
    );

    p.prompt_embeds = Some(zeros(&[1, 77, hidden]));
    p.negative_prompt_embeds = Some(nan(&[1, 77, hidden]));
    let err = pipe.generate(&p).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.starts_with("negative_prompt_embeds ")),
        "{err}"
    );
}

#[test]
fn huge_but_finite_latents_pass_the_up_front_check() {
    // Their sum overflows to inf; the check must look at the values before refusing them.
    let mut p = params();
    p.latents = Some(Tensor::full(3e38f32, (1, 4, 8, 8), &Device::Cpu).unwrap());
    let err = fixture_pipeline("sd2-tiny").generate(&p).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
}
