//! LoRA parity with diffusers (`scripts/fixtures/gen_lora.py`, `tests/fixtures/lora/`): PEFT and
//! kohya files, alone, at a run scale, together with adapter weights and fused; fusing and
//! un-fusing leaving the base model exact; the errors for unknown keys, bad shapes and pickles.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use sd_core::pipeline::{
    GenerateOutput, GenerateParams, RunHooks, StableDiffusionPipeline, StepControl,
};
use sd_core::Error;
use serde::Deserialize;
use support::{
    assert_close, assert_image_close, fixture_pipeline, fixtures, read_json_file, read_tensors,
};

#[derive(Deserialize)]
struct Cases {
    prompt: String,
    negative_prompt: String,
    num_inference_steps: usize,
    guidance_scale: f64,
    height: usize,
    width: usize,
    seed: u64,
    cases: Vec<LoraCase>,
}

#[derive(Deserialize)]
struct LoraCase {
    name: String,
    adapters: Vec<String>,
    weights: Option<Vec<f64>>,
    scale: Option<f64>,
    fuse: Option<f64>,
}

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

fn cases() -> Cases {
    read_json_file(&lora_dir().join("cases.json"))
}

fn lora_file(adapter: &str) -> PathBuf {
    lora_dir().join(format!("lora_{adapter}.safetensors"))
}

fn params(cases: &Cases, lora_scale: Option<f64>) -> GenerateParams {
    GenerateParams {
        negative_prompts: Some(vec![cases.negative_prompt.clone()]),
        num_inference_steps: cases.num_inference_steps,
        guidance_scale: cases.guidance_scale,
        height: Some(cases.height),
        width: Some(cases.width),
        seeds: vec![cases.seed],
        lora_scale,
        ..GenerateParams::new(cases.prompt.clone())
    }
}

/// A run, with the latents after its first step.
fn run(pipe: &StableDiffusionPipeline, params: &GenerateParams) -> (GenerateOutput, Tensor) {
    let mut first = None;
    let mut on_step_end = |progress: &sd_core::pipeline::StepProgress, latents: &mut Tensor| {
        if progress.step == 1 {
            first = Some(latents.clone());
        }
        StepControl::Continue
    };
    let hooks = RunHooks { on_step_end: Some(&mut on_step_end), cancel: None };
    let out = pipe.generate_with(params, hooks).unwrap();
    (out, first.unwrap())
}

/// The CFG batch of text embeddings `[negative; prompt]` at the run's LoRA scale.
fn embeddings(pipe: &StableDiffusionPipeline, cases: &Cases, scale: Option<f64>) -> Tensor {
    let _run = pipe.adapters.begin_run(scale);
    pipe.encode_prompts(&[cases.negative_prompt.clone(), cases.prompt.clone()]).unwrap()
}

fn load_case(pipe: &StableDiffusionPipeline, case: &LoraCase) {
    for adapter in &case.adapters {
        pipe.load_lora(&lora_file(adapter), adapter).unwrap();
    }
    if let Some(weights) = &case.weights {
        let active: Vec<_> = case.adapters.iter().cloned().zip(weights.iter().copied()).collect();
        pipe.set_adapters(&active).unwrap();
    }
    if let Some(scale) = case.fuse {
        pipe.fuse_lora(scale).unwrap();
    }
}

#[test]
fn lora_runs_match_diffusers() {
    let cases = cases();
    let base_embeds = embeddings(&fixture_pipeline("sd2-tiny"), &cases, None);
    for case in &cases.cases {
        let pipe = fixture_pipeline("sd2-tiny");
        load_case(&pipe, case);
        let refs = read_tensors(&lora_dir().join(format!("{}.safetensors", case.name)));
        let what = |t: &str| format!("{}: {t}", case.name);
        let embeds = embeddings(&pipe, &cases, case.scale);
        assert_close(&embeds, &refs["prompt_embeds"], 1e-4, &what("text embeddings"));
        // the text encoder's LoRA layers ran
        assert!(support::rel_err(&embeds, &base_embeds) > 1e-2, "{}", what("embeddings"));
        let (out, first) = run(&pipe, &params(&cases, case.scale));
        assert_close(&first, &refs["step0.latents"], 1e-4, &what("latents after step 1"));
        let expected = image::open(lora_dir().join(format!("{}.png", case.name))).unwrap();
        assert_image_close(out.images[0].as_raw(), expected.to_rgb8().as_raw(), &what("image"));
    }
}

fn tensors_equal(a: &Tensor, b: &Tensor) -> bool {
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    flat(a).iter().map(|v| v.to_bits()).eq(flat(b).iter().map(|v| v.to_bits()))
}

/// Fusing copies weights and un-fusing drops the copies: the base model runs bit for bit as
/// before, with the adapters inactive, after un-fusing, and after unloading them.
#[test]
fn unfuse_and_unload_restore_the_base_model_exactly() {
    let cases = cases();
    let pipe = fixture_pipeline("sd2-tiny");
    let plain = params(&cases, None);
    let (base, _) = run(&pipe, &plain);
    let base_embeds = embeddings(&pipe, &cases, None);
    let both = &cases.cases.iter().find(|c| c.name == "both_fused").unwrap();
    load_case(&pipe, both);
    let (fused, _) = run(&pipe, &plain);
    assert!(!tensors_equal(&fused.latents, &base.latents));
    pipe.unfuse_lora();
    // unfused, the adapters run again (at their weights): the `both` case
    let (unfused, _) = run(&pipe, &plain);
    assert!(!tensors_equal(&unfused.latents, &base.latents));
    pipe.set_adapters(&[]).unwrap();
    let (inactive, _) = run(&pipe, &plain);
    assert!(tensors_equal(&inactive.latents, &base.latents));
    assert!(tensors_equal(&embeddings(&pipe, &cases, None), &base_embeds));
    pipe.unload_lora(None).unwrap();
    assert!(pipe.adapters.names().is_empty());
    let (unloaded, _) = run(&pipe, &plain);
    assert!(tensors_equal(&unloaded.latents, &base.latents));
    assert_eq!(unloaded.images[0].as_raw(), base.images[0].as_raw());

    // unloading keeps what is fused (diffusers' fuse-then-unload); un-fusing still restores all
    load_case(&pipe, both);
    pipe.unload_lora(None).unwrap();
    let (fused_unloaded, _) = run(&pipe, &plain);
    assert!(tensors_equal(&fused_unloaded.latents, &fused.latents));
    pipe.unfuse_lora();
    let (restored, _) = run(&pipe, &plain);
    assert!(tensors_equal(&restored.latents, &base.latents));
}

/// Scale 0 runs the base model; several adapters and their weights are as set.
#[test]
fn adapters_and_scale_choose_what_runs() {
    let cases = cases();
    let pipe = fixture_pipeline("sd2-tiny");
    let (base, _) = run(&pipe, &params(&cases, None));
    pipe.load_lora(&lora_file("peft"), "peft").unwrap();
    pipe.load_lora(&lora_file("kohya"), "kohya").unwrap();
    // the last loaded adapter is the active one, as in diffusers
    assert_eq!(pipe.adapters.active(), vec![("kohya".to_string(), 1.0)]);
    assert_eq!(pipe.adapters.names(), ["peft", "kohya"]);
    let (off, _) = run(&pipe, &params(&cases, Some(0.0)));
    assert!(tensors_equal(&off.latents, &base.latents));
    let err = pipe.set_adapters(&[("nope".into(), 1.0)]).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let err = pipe.load_lora(&lora_file("peft"), "peft").unwrap_err();
    assert!(err.to_string().contains("`peft` is loaded"), "{err}");
}

/// The image metadata names the applied LoRAs as A1111 (`<lora:NAME:WEIGHT>` after the prompt,
/// `Lora hashes`) and reads them back off the prompt.
#[test]
fn metadata_names_the_applied_loras() {
    use sd_core::metadata::{GenerationInfo, Infotext};
    use sha2::{Digest, Sha256};

    let cases = cases();
    let pipe = fixture_pipeline("sd2-tiny");
    pipe.load_lora(&lora_file("peft"), "peft").unwrap();
    pipe.load_lora(&lora_file("kohya"), "kohya").unwrap();
    pipe.set_adapters(&[("peft".into(), 0.0), ("kohya".into(), 0.4)]).unwrap();
    let params = params(&cases, Some(0.5));
    let (out, _) = run(&pipe, &params);
    let info = pipe.generation_info(&params, &out, 0).unwrap();
    // weight 0: not applied, not named
    assert_eq!(info.loras, [("lora_kohya".to_string(), 0.2)]);
    let digest = Sha256::digest(std::fs::read(lora_file("kohya")).unwrap());
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(info.lora_hashes, [("lora_kohya".to_string(), hash[..10].to_string())]);
    let text = info.to_infotext().to_text();
    assert!(text.starts_with(&format!("{} <lora:lora_kohya:0.2>\n", cases.prompt)), "{text}");
    assert!(text.contains(&format!("Lora hashes: \"lora_kohya: {}\"", &hash[..10])), "{text}");
    let back = GenerationInfo::from_infotext(&Infotext::parse(&text)).unwrap();
    assert_eq!(back.prompt, cases.prompt);
    assert_eq!(back, info);
    // fused: the fusing scale, not the run's
    pipe.fuse_lora(2.0).unwrap();
    let info = pipe.generation_info(&params, &out, 0).unwrap();
    assert_eq!(info.loras, [("lora_kohya".to_string(), 0.8)]);
}

/// A copy of a LoRA file with its tensors renamed or replaced by `edit`.
fn edited(from: &Path, to: &Path, edit: impl Fn(&mut HashMap<String, Tensor>)) {
    let mut tensors = read_tensors(from);
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, to).unwrap();
}

/// PEFT text-encoder keys without `text_model.` (older files) load the same layers.
#[test]
fn text_encoder_keys_without_text_model_load_the_same() {
    let cases = cases();
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("renamed.safetensors");
    edited(&lora_file("peft"), &renamed, |t| {
        *t = t
            .drain()
            .map(|(k, v)| (k.replace("text_encoder.text_model.", "text_encoder."), v))
            .collect();
    });
    let pipe = fixture_pipeline("sd2-tiny");
    pipe.load_lora(&lora_file("peft"), "a").unwrap();
    let original = embeddings(&pipe, &cases, None);
    pipe.unload_lora(None).unwrap();
    pipe.load_lora(&renamed, "b").unwrap();
    assert!(tensors_equal(&embeddings(&pipe, &cases, None), &original));
}

#[test]
fn unknown_keys_bad_shapes_and_pickles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = fixture_pipeline("sd2-tiny");

    let unknown = dir.path().join("unknown.safetensors");
    edited(&lora_file("kohya"), &unknown, |t| {
        let down = t["lora_unet_mid_block_resnets_0_conv1.lora_down.weight"].clone();
        t.insert("lora_unet_mid_block_resnets_7_conv1.lora_down.weight".into(), down);
        t.insert(
            "vae.decoder.lora_A.weight".into(),
            Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    });
    match pipe.load_lora(&unknown, "x").unwrap_err() {
        Error::UnknownLoraKeys { path, count, keys } => {
            assert_eq!((path, count), (unknown.clone(), 2));
            assert_eq!(
                keys,
                [
                    "lora_unet_mid_block_resnets_7_conv1.lora_down.weight",
                    "vae.decoder.lora_A.weight"
                ]
            );
        }
        other => panic!("{other}"),
    }

    let misshaped = dir.path().join("misshaped.safetensors");
    let key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";
    edited(&lora_file("peft"), &misshaped, |t| {
        t.insert(
            key.into(),
            Tensor::zeros((4, 7), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    });
    let err = pipe.load_lora(&misshaped, "x").unwrap_err().to_string();
    assert!(err.contains(key) && err.contains("[4, 7], expected [4, 64]"), "{err}");

    let pickle = dir.path().join("lora.pt");
    std::fs::write(&pickle, b"not read").unwrap();
    let err = pipe.load_lora(&pickle, "x").unwrap_err().to_string();
    assert!(err.contains("pickle"), "{err}");
    // nothing was loaded by the failures
    assert!(pipe.adapters.names().is_empty());
}
