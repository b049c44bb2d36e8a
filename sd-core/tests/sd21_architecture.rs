//! The real SD 2.1 architecture, built from its configs (`tests/fixtures/sd21-configs`, no
//! weights) with random weights: parameter counts equal the published checkpoint's, and one UNet
//! call on a small latent runs with the real shapes.

mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sd_core::models::clip_text::{ClipTextConfig, ClipTextModel};
use sd_core::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sd_core::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use support::{read_json_file, sd21_configs};

fn param_count(map: &VarMap) -> usize {
    map.all_vars().iter().map(|v| v.elem_count()).sum()
}

/// Millions of parameters, rounded to 0.1 M as the configs' README gives them.
fn millions(n: usize) -> f64 {
    (n as f64 / 1e5).round() / 10.0
}

#[test]
fn sd21_unet_has_the_real_shapes_and_runs() {
    let cfg: UNet2DConditionConfig = read_json_file(&sd21_configs().join("unet/config.json"));
    let map = VarMap::new();
    let unet =
        UNet2DConditionModel::new(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu), &cfg)
            .unwrap();
    assert_eq!(millions(param_count(&map)), 865.9);

    // One CFG-sized call on a 128 px image's latents; 1024-wide OpenCLIP-H text features.
    let sample = Tensor::randn(0f32, 1., (2, 4, 16, 16), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1., (2, 77, 1024), &Device::Cpu).unwrap();
    let out = unet.forward(&sample, 981.0, &context).unwrap();
    assert_eq!(out.dims(), &[2, 4, 16, 16]);
    let finite = out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
    assert!(finite, "UNet output has non-finite values");
}

#[test]
fn sd21_vae_and_text_encoder_have_the_real_sizes() {
    let cfg: AutoencoderKLConfig = read_json_file(&sd21_configs().join("vae/config.json"));
    let map = VarMap::new();
    AutoencoderKL::new(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu), &cfg).unwrap();
    assert_eq!(millions(param_count(&map)), 83.7);

    let cfg: ClipTextConfig = read_json_file(&sd21_configs().join("text_encoder/config.json"));
    let map = VarMap::new();
    ClipTextModel::new(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu), &cfg).unwrap();
    assert_eq!(millions(param_count(&map)), 340.4);
}
