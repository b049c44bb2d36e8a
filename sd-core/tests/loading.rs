//! Model folders beyond the plain layout: sharded weights, text-encoder keys without the
//! `text_model.` prefix, variant preference, half-precision runs, and errors that name the file
//! and the tensor.

mod support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sd_core::models::clip_text::ClipTextModel;
use sd_core::pipeline::{GenerateParams, StableDiffusionPipeline};
use support::*;

fn unet_stage_output(pipe: &StableDiffusionPipeline) -> Tensor {
    let refs = load_refs("sd2_stages.safetensors");
    pipe.unet
        .forward(get(&refs, "unet.sample"), 981.0, get(&refs, "unet.encoder_hidden_states"))
        .unwrap()
}

#[test]
fn sharded_unet_loads_like_the_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd2-sharded");
    copy_dir(&pipelines().join("sd2-tiny"), &model);
    let unet = model.join("unet");
    let single = unet.join("diffusion_pytorch_model.safetensors");
    let tensors = read_tensors(&single);
    std::fs::remove_file(&single).unwrap();

    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&shard, unet.join(&file)).unwrap();
        for n in part.iter() {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(unet.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string())
        .unwrap();

    let pipe =
        StableDiffusionPipeline::from_folder(&model, DType::F32, &Device::Cpu, None).unwrap();
    let refs = load_refs("sd2_stages.safetensors");
    assert_close(&unet_stage_output(&pipe), get(&refs, "unet.out"), 1e-4, "sharded unet");
}

#[test]
fn text_encoder_keys_without_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let te = dir.path().join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    let src = pipelines().join("sd2-tiny/text_encoder");
    std::fs::copy(src.join("config.json"), te.join("config.json")).unwrap();
    let stripped: HashMap<String, Tensor> = read_tensors(&src.join("model.safetensors"))
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    assert!(stripped.contains_key("embeddings.token_embedding.weight"));
    candle_core::safetensors::save(&stripped, te.join("model.safetensors")).unwrap();

    let model = load_component(&te, "model", ClipTextModel::new);
    let refs = load_refs("sd2_stages.safetensors");
    let out = model.forward(get(&refs, "text.input_ids")).unwrap();
    assert_close(&out, get(&refs, "text.last_hidden_state"), 1e-4, "unprefixed text encoder");
}

/// A folder with both plain and fp16 files uses the plain ones for f32 and the fp16 variant when
/// asked (here the fp16 file holds different weights, so the choice shows in the output).
#[test]
fn variant_preference() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd2-both");
    copy_dir(&pipelines().join("sd2-tiny"), &model);
    let unet = model.join("unet");
    let halved: HashMap<String, Tensor> =
        read_tensors(&unet.join("diffusion_pytorch_model.safetensors"))
            .into_iter()
            .map(|(k, v)| (k, (v * 0.5).unwrap().to_dtype(DType::F16).unwrap()))
            .collect();
    candle_core::safetensors::save(&halved, unet.join("diffusion_pytorch_model.fp16.safetensors"))
        .unwrap();

    let refs = load_refs("sd2_stages.safetensors");
    let plain =
        StableDiffusionPipeline::from_folder(&model, DType::F32, &Device::Cpu, None).unwrap();
    assert_close(
        &unet_stage_output(&plain),
        get(&refs, "unet.out"),
        1e-4,
        "plain weights chosen for f32",
    );
    let fp16 = StableDiffusionPipeline::from_folder(&model, DType::F32, &Device::Cpu, Some("fp16"))
        .unwrap();
    assert!(
        rel_err(&unet_stage_output(&fp16), get(&refs, "unet.out")) > 1e-2,
        "fp16 variant should have been used"
    );
}

/// The tiny SD2 model and a 64 px, 2-step run of it.
fn small_run() -> (std::path::PathBuf, GenerateParams) {
    let mut params = GenerateParams::new("a photograph of an astronaut riding a horse");
    params.height = Some(64);
    params.width = Some(64);
    params.num_inference_steps = 2;
    params.seeds = vec![42];
    (pipelines().join("sd2-tiny"), params)
}

#[test]
fn half_precision_runs_stay_close_to_f32() {
    let (model, params) = small_run();
    let reference = StableDiffusionPipeline::from_folder(&model, DType::F32, &Device::Cpu, None)
        .unwrap()
        .generate(&params)
        .unwrap();
    let pipe =
        StableDiffusionPipeline::from_folder(&model, DType::F16, &Device::Cpu, None).unwrap();
    assert_eq!(pipe.dtype(), DType::F16);
    let out = pipe.generate(&params).unwrap();
    let (mean, max) = image_diff(out.images[0].as_raw(), reference.images[0].as_raw());
    eprintln!("f16 vs f32: mean |diff| {mean:.3}, max {max}");
    assert!(mean < 2.0, "f16: mean |diff| {mean} against f32");
}

/// bf16 on the CPU: bf16 GEMM operands on the packed kernels (AMX tiles, AVX512_BF16) or MKL,
/// f32 everything else. Without any it is refused with an error that says what to install, and
/// on a CPU without bf16 hardware it runs f32. CI sets SD_REQUIRE_MKL so that the measured path
/// cannot silently turn into the refusal.
#[test]
fn bf16_on_cpu_stays_close_to_f32_or_names_mkl() {
    let (model, params) = small_run();
    let pipe = match StableDiffusionPipeline::from_folder(&model, DType::BF16, &Device::Cpu, None) {
        Ok(pipe) => pipe,
        Err(e) => {
            let err = e.to_string();
            assert!(
                std::env::var("SD_REQUIRE_MKL").is_err(),
                "SD_REQUIRE_MKL is set but bf16 failed: {err}"
            );
            assert!(sd_core::cpu::blas::mkl().is_err(), "MKL is loaded but bf16 failed: {err}");
            assert!(
                !sd_core::cpu::packed::available(),
                "a packed kernel is available but bf16 failed: {err}"
            );
            assert!(
                err.contains("bf16") && err.contains("MKL") && err.contains("pip install"),
                "{err}"
            );
            return;
        }
    };
    assert_eq!(pipe.activation_dtype(), DType::F32);
    let reference = StableDiffusionPipeline::from_folder(&model, DType::F32, &Device::Cpu, None)
        .unwrap()
        .generate(&params)
        .unwrap();
    let out = pipe.generate(&params).unwrap();
    if sd_core::cpu::packed::Kernel::supported().is_empty() {
        // No bf16 hardware: the pipeline runs f32 instead.
        assert_eq!(pipe.dtype(), DType::F32);
        assert_eq!(out.images[0].as_raw(), reference.images[0].as_raw());
        return;
    }
    assert_eq!(pipe.dtype(), DType::BF16);
    let (mean, max) = image_diff(out.images[0].as_raw(), reference.images[0].as_raw());
    eprintln!("bf16 vs f32: mean |diff| {mean:.3}, max {max}");
    assert!(mean < 2.0, "bf16: mean |diff| {mean} against f32");
    assert!(mean > 0.0, "bf16 products should round differently from f32");
}

#[test]
fn missing_tensor_names_tensor_and_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd2-missing");
    copy_dir(&pipelines().join("sd2-tiny"), &model);
    let file = model.join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors = read_tensors(&file);
    tensors.remove("decoder.conv_out.weight").unwrap();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = StableDiffusionPipeline::from_folder(&model, DType::F32, &Device::Cpu, None)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("decoder.conv_out.weight")
            && err.contains("vae")
            && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

#[test]
fn missing_weight_file_is_an_error_naming_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd2-noweights");
    copy_dir(&pipelines().join("sd2-tiny"), &model);
    std::fs::remove_file(model.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let err = StableDiffusionPipeline::from_folder(&model, DType::F32, &Device::Cpu, None)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("unet") && err.contains("diffusion_pytorch_model"), "{err}");
}

/// Model configs the fuzzing (tests/fuzz) found panicking or overflowing while building: each is
/// now an error naming the key.
#[test]
fn fuzz_found_model_configs_are_errors() {
    use sd_core::loading::{build_component, WeightStore};
    use sd_core::models::unet::UNet2DConditionConfig;
    use sd_core::models::vae::{AutoencoderKL, AutoencoderKLConfig};

    let model = pipelines().join("sd2-tiny");
    let json = |path: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(model.join(path)).unwrap()).unwrap()
    };
    // 0 attention heads divided by zero; a huge downsample padding overflowed the output size.
    for (key, value) in
        [("attention_head_dim", serde_json::json!(0)), ("downsample_padding", (1u64 << 40).into())]
    {
        let mut config = json("unet/config.json");
        config[key] = value;
        let config: UNet2DConditionConfig = serde_json::from_value(config).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    // A huge latent channel count overflowed `2 * latent_channels`.
    let mut config = json("vae/config.json");
    config["latent_channels"] = (1u64 << 62).into();
    let config: AutoencoderKLConfig = serde_json::from_value(config).unwrap();
    let dir = model.join("vae");
    let store = WeightStore::open_component(&dir, "diffusion_pytorch_model", None).unwrap();
    let built = build_component(&dir, store, DType::F32, &Device::Cpu, |vb| {
        AutoencoderKL::new(vb, &config)
    });
    let Err(err) = built else { panic!("a latent_channels of 2^62 was accepted") };
    let err = err.to_string();
    assert!(err.contains("latent_channels"), "{err}");
}
