//! `pipeline`: the full SD 2.1 architecture with random weights, written as a diffusers folder,
//! loaded with `StableDiffusionPipeline::from_folder` and run end to end on the GPU.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sd_core::attention::cuda as fa;
use sd_core::models::clip_text::{ClipTextConfig, ClipTextModel};
use sd_core::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sd_core::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use sd_core::pipeline::{
    parse_dtype, GenerateParams, RunHooks, StableDiffusionPipeline, StepControl, StepProgress,
};

use crate::args::Args;
use crate::device::{gib, sync, time_it, used_memory, MemPeak};
use crate::sd21;
use crate::Summary;

/// A VarBuilder backend that makes up every tensor a model asks for: random on the device
/// (std 1/sqrt(fan_in) for matrices and convolutions, ones for norm weights, zeros for
/// biases), kept in `made` so that they can be saved.
struct RandomWeights {
    made: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        let t = if dims.len() == 1 {
            if name.ends_with("bias") {
                Tensor::zeros(dims, dtype, dev)?
            } else {
                Tensor::ones(dims, dtype, dev)?
            }
        } else {
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(0f32, 1.0 / (fan_in as f32).sqrt(), dims, dev)?.to_dtype(dtype)?
        };
        self.made.lock().unwrap().insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: no shape for `{name}`")
    }

    /// Optional layouts (a `text_model.` prefix, the VAE's legacy attention names) are
    /// never present, so the models take their default names; loading the saved file
    /// again takes the same branch.
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Builds one component with random f16 weights on `dev` and saves them as `dir/file`, with
/// its config. Returns the number of parameters.
fn write_component(
    dir: &Path,
    file: &str,
    config: &str,
    dev: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), config)?;
    let made = Arc::new(Mutex::new(HashMap::new()));
    build(VarBuilder::from_backend(
        Box::new(RandomWeights { made: made.clone() }),
        DType::F16,
        dev.clone(),
    ))?;
    let tensors = std::mem::take(&mut *made.lock().unwrap());
    let params = tensors.values().map(|t| t.elem_count()).sum();
    candle_core::safetensors::save(&tensors, dir.join(file))
        .with_context(|| format!("writing {}", dir.join(file).display()))?;
    Ok(params)
}

/// Writes SD 2.1 (its configs, random weights, the CLIP tokenizer from `tokenizer`) as a
/// diffusers folder.
fn write_random_sd21(model: &Path, tokenizer: &Path, dev: &Device) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(model.join("scheduler"))?;
    std::fs::create_dir_all(model.join("tokenizer"))?;
    std::fs::write(model.join("model_index.json"), sd21::MODEL_INDEX)?;
    std::fs::write(model.join("scheduler/scheduler_config.json"), sd21::SCHEDULER)?;
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(tokenizer.join(name), model.join("tokenizer").join(name)).with_context(
            || {
                format!(
                    "copying the tokenizer file {} (pass --tokenizer DIR)",
                    tokenizer.join(name).display()
                )
            },
        )?;
    }
    let clip: ClipTextConfig = serde_json::from_str(sd21::TEXT_ENCODER)?;
    let te = write_component(
        &model.join("text_encoder"),
        "model.safetensors",
        sd21::TEXT_ENCODER,
        dev,
        |vb| ClipTextModel::new(vb, &clip).map(drop),
    )?;
    let unet_cfg: UNet2DConditionConfig = serde_json::from_str(sd21::UNET)?;
    let unet = write_component(
        &model.join("unet"),
        "diffusion_pytorch_model.safetensors",
        sd21::UNET,
        dev,
        |vb| UNet2DConditionModel::new(vb, &unet_cfg).map(drop),
    )?;
    let vae_cfg: AutoencoderKLConfig = serde_json::from_str(sd21::VAE)?;
    let vae = write_component(
        &model.join("vae"),
        "diffusion_pytorch_model.safetensors",
        sd21::VAE,
        dev,
        |vb| AutoencoderKL::new(vb, &vae_cfg).map(drop),
    )?;
    println!(
        "random SD 2.1 written to {} in {:.1} s: text encoder {:.1} M, UNet {:.1} M, \
         VAE {:.1} M parameters (f16)",
        model.display(),
        started.elapsed().as_secs_f64(),
        te as f64 / 1e6,
        unet as f64 / 1e6,
        vae as f64 / 1e6
    );
    Ok(())
}

/// `pipeline`: SD 2.1 with random weights, written once, then loaded in each of `--dtype` and
/// run end to end at each of `--size`; a summary line per run.
pub fn run_pipeline(dev: &Device, args: &Args, summary: &mut Summary) -> anyhow::Result<()> {
    let work = args.work.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("sd-gpu-check-{}", std::process::id()))
    });
    let model = work.join("sd21-random");
    let result = (|| -> anyhow::Result<()> {
        write_random_sd21(&model, &args.tokenizer, dev)?;
        sync(dev)?;
        for name in &args.dtypes {
            let dtype = parse_dtype(name)?;
            summary.record(&format!("pipeline {dtype:?}"), |summary| {
                run_in_dtype(dev, &model, dtype, args, summary)
            });
        }
        Ok(())
    })();
    if !args.keep {
        let _ = std::fs::remove_dir_all(&model);
        if args.work.is_none() {
            let _ = std::fs::remove_dir_all(&work);
        }
    }
    result
}

/// Loads the model in `dtype` and generates at each of `--size`.
fn run_in_dtype(
    dev: &Device,
    model: &Path,
    dtype: DType,
    args: &Args,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    println!(
        "\n== SD 2.1 architecture, random weights, {dtype:?}, {} steps{}",
        args.steps,
        if dtype == DType::F32 { " (attention: the reference path, by design)" } else { "" }
    );
    let before = used_memory(dev)?;
    let started = Instant::now();
    let pipe = StableDiffusionPipeline::from_folder(model, dtype, dev, None)?;
    sync(dev)?;
    let loaded = used_memory(dev)?;
    println!(
        "loaded with StableDiffusionPipeline::from_folder in {:.1} s; GPU memory in use {:.2} GiB \
         ({:.2} GiB before)",
        started.elapsed().as_secs_f64(),
        gib(loaded),
        gib(before)
    );
    for &size in &args.sizes {
        summary.record(&format!("pipeline {dtype:?} {size} px"), |summary| {
            generate_at(dev, &pipe, dtype, size, loaded, args, summary)?;
            if dtype != DType::F32 {
                attention_share(dev, &pipe, dtype, size, summary)?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// One run at `size` px: time per step, stage times, peak memory, finite latents, the image, no
/// attention fallback.
fn generate_at(
    dev: &Device,
    pipe: &StableDiffusionPipeline,
    dtype: DType,
    size: usize,
    loaded: usize,
    args: &Args,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    println!("-- {dtype:?} at {size} px");
    let fallbacks = fa::fallback_count();
    let mut params = GenerateParams::new("a photograph of an astronaut riding a horse");
    params.height = Some(size);
    params.width = Some(size);
    params.seeds = vec![42];
    params.num_inference_steps = 1;
    let started = Instant::now();
    pipe.generate(&params)?;
    sync(dev)?;
    println!(
        "warm-up run (1 step; includes NVRTC and candle's kernel loading): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    params.num_inference_steps = args.steps;
    let peak = MemPeak::start(dev);
    let mut step_times = Vec::new();
    let mut last = Instant::now();
    let mut on_step_end = |_: &StepProgress, _: &mut Tensor| {
        let _ = dev.synchronize();
        let now = Instant::now();
        step_times.push(now - last);
        last = now;
        StepControl::Continue
    };
    let started = Instant::now();
    let out = pipe.generate_with(
        &params,
        RunHooks { on_step_end: Some(&mut on_step_end), ..Default::default() },
    )?;
    sync(dev)?;
    let total = started.elapsed();
    let peak = peak.finish();
    let mut sorted = step_times.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    println!(
        "run: {:.2} s total; text encoder {:.0} ms, denoising {:.0} ms, VAE decode {:.0} ms",
        total.as_secs_f64(),
        out.timings.text_encoder.as_secs_f64() * 1e3,
        out.timings.denoise.as_secs_f64() * 1e3,
        out.timings.vae_decode.as_secs_f64() * 1e3
    );
    println!(
        "time per step (batch 2 with guidance): median {:.1} ms; each: {} (the first includes \
         the text encoder)",
        median.as_secs_f64() * 1e3,
        step_times
            .iter()
            .map(|t| format!("{:.1}", t.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "peak GPU memory during the run: {:.2} GiB ({:.2} GiB above the loaded weights)",
        gib(peak),
        gib(peak.saturating_sub(loaded))
    );
    let finite = out.latents.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
    let image_ok =
        out.images.len() == 1 && out.images[0].dimensions() == (size as u32, size as u32);
    let fallbacks = fa::fallback_count() - fallbacks;
    if let Some(dir) = &args.work {
        let png = dir.join(format!("sd21-random-{dtype:?}-{size}.png").to_lowercase());
        out.images[0].save(&png)?;
        println!("image written to {}", png.display());
    }
    summary.add(
        finite && image_ok && fallbacks == 0,
        format!(
            "pipeline {dtype:?} {size} px, {} steps: {:.1} ms/step, peak {:.2} GiB, latents {}, \
             {} image, {fallbacks} attention fallbacks{}",
            args.steps,
            median.as_secs_f64() * 1e3,
            gib(peak),
            if finite { "finite" } else { "NOT FINITE" },
            if image_ok { format!("one {size}x{size}") } else { "WRONG".to_string() },
            if dtype == DType::F32 { " (f32: reference attention by design)" } else { "" }
        ),
    );
    Ok(())
}

/// The attention kernels' share: one UNet step and one VAE decode with the kernels and with the
/// reference path.
fn attention_share(
    dev: &Device,
    pipe: &StableDiffusionPipeline,
    dtype: DType,
    size: usize,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let latents = Tensor::randn(0f32, 1.0, (2, 4, size / 8, size / 8), dev)?.to_dtype(dtype)?;
    let context = pipe.encode_prompts(&["".to_string(), "a red cube".to_string()])?;
    // Time and peak memory of `f` with the kernels on or off.
    let timed = |flash: bool, iters: usize, f: &dyn Fn() -> anyhow::Result<()>| {
        fa::set_enabled(flash);
        let peak = MemPeak::start(dev);
        let t = time_it(dev, iters, f);
        let p = peak.finish();
        fa::set_enabled(true);
        anyhow::Ok((t?, p))
    };
    let unet_step = || -> anyhow::Result<()> {
        pipe.unet.forward(&latents, 500.0, &context)?;
        Ok(())
    };
    let (flash_t, flash_mem) = timed(true, 3, &unet_step)?;
    let (ref_t, ref_mem) = timed(false, 3, &unet_step)?;
    let saved = 100.0 * (ref_t.as_secs_f64() - flash_t.as_secs_f64()) / ref_t.as_secs_f64();
    println!(
        "UNet step (batch 2): {:.1} ms with the kernels, {:.1} ms with the reference path: \
         attention kernels save {:.1} ms ({saved:.0}% of the reference step); peak memory {:.2} \
         vs {:.2} GiB",
        flash_t.as_secs_f64() * 1e3,
        ref_t.as_secs_f64() * 1e3,
        (ref_t.as_secs_f64() - flash_t.as_secs_f64()) * 1e3,
        gib(flash_mem),
        gib(ref_mem)
    );
    let one = latents.narrow(0, 0, 1)?.to_dtype(DType::F32)?;
    let vae_decode = || -> anyhow::Result<()> {
        pipe.decode_latents(&one)?;
        Ok(())
    };
    let (vf, vfm) = timed(true, 2, &vae_decode)?;
    let (vr, vrm) = timed(false, 2, &vae_decode)?;
    println!(
        "VAE decode (1 image): {:.1} ms with the kernels, {:.1} ms with the reference path; peak \
         memory {:.2} vs {:.2} GiB",
        vf.as_secs_f64() * 1e3,
        vr.as_secs_f64() * 1e3,
        gib(vfm),
        gib(vrm)
    );
    summary.add(
        true,
        format!(
            "attention {dtype:?} {size} px: UNet step {:.1} ms with the kernels vs {:.1} ms \
             reference ({saved:.0}% saved), VAE decode {:.1} vs {:.1} ms",
            flash_t.as_secs_f64() * 1e3,
            ref_t.as_secs_f64() * 1e3,
            vf.as_secs_f64() * 1e3,
            vr.as_secs_f64() * 1e3
        ),
    );
    Ok(())
}
