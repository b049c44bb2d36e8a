//! Each model stage against diffusers/transformers on the tiny fixture models
//! (`scripts/fixtures/gen_pipelines.py`): text encoder, UNet (square, non-square, odd sizes),
//! VAE decode and encode. Tolerance: 1e-4 relative.

mod support;

use candle_core::DType;
use sd_core::models::clip_text::ClipTextModel;
use sd_core::models::unet::UNet2DConditionModel;
use sd_core::models::vae::AutoencoderKL;
use support::*;

const TOL: f32 = 1e-4;

fn text_encoder(model: &str) -> ClipTextModel {
    let dir = pipelines().join(format!("{model}-tiny/text_encoder"));
    load_component(&dir, "model", ClipTextModel::new)
}

fn unet(model: &str) -> UNet2DConditionModel {
    let dir = pipelines().join(format!("{model}-tiny/unet"));
    load_component(&dir, "diffusion_pytorch_model", UNet2DConditionModel::new)
}

fn vae(model: &str) -> AutoencoderKL {
    let dir = pipelines().join(format!("{model}-tiny/vae"));
    load_component(&dir, "diffusion_pytorch_model", AutoencoderKL::new)
}

fn check_text_encoder(model: &str) {
    let refs = load_refs(&format!("{model}_stages.safetensors"));
    let out = text_encoder(model).forward(get(&refs, "text.input_ids")).unwrap();
    assert_close(&out, get(&refs, "text.last_hidden_state"), TOL, &format!("{model} text encoder"));
}

fn check_unet(model: &str) {
    let refs = load_refs(&format!("{model}_stages.safetensors"));
    let unet = unet(model);
    for case in ["unet", "unet_ns", "unet_odd"] {
        let t = get(&refs, &format!("{case}.timestep"))
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let out = unet
            .forward(
                get(&refs, &format!("{case}.sample")),
                t,
                get(&refs, &format!("{case}.encoder_hidden_states")),
            )
            .unwrap();
        assert_close(&out, get(&refs, &format!("{case}.out")), TOL, &format!("{model} {case}"));
    }
}

fn check_vae(model: &str) {
    let refs = load_refs(&format!("{model}_stages.safetensors"));
    let vae = vae(model);
    let decoded = vae.decode(get(&refs, "vae.latents")).unwrap();
    assert_close(&decoded, get(&refs, "vae.decoded"), TOL, &format!("{model} vae decode"));
    let dist = vae.encode(get(&refs, "vae.image")).unwrap();
    assert_close(
        &dist.mean,
        get(&refs, "vae.latent_mean"),
        TOL,
        &format!("{model} vae encode mean"),
    );
    assert_close(&dist.std, get(&refs, "vae.latent_std"), TOL, &format!("{model} vae encode std"));
}

#[test]
fn sd2_text_encoder_matches_transformers() {
    check_text_encoder("sd2");
}

#[test]
fn sd1_text_encoder_quick_gelu_matches_transformers() {
    check_text_encoder("sd1");
}

#[test]
fn sd2_unet_matches_diffusers() {
    check_unet("sd2");
}

#[test]
fn sd1_unet_matches_diffusers() {
    check_unet("sd1");
}

#[test]
fn sd2_vae_matches_diffusers() {
    check_vae("sd2");
}

#[test]
fn sd1_vae_matches_diffusers() {
    check_vae("sd1");
}
