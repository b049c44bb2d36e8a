//! `StableDiffusionPipeline`: tokenizer, text encoder, UNet, scheduler and VAE tied together as
//! diffusers' text-to-image pipeline does it (classifier-free guidance as one batch of 2,
//! torch-compatible seeds, per-step progress and cancellation).
//!
//! The pipeline holds no per-run state: every call builds its own scheduler and generators, so
//! one pipeline can serve concurrent calls from several threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::hub::{resolve_model, HubOptions};
use crate::loading::{build_component, read_json, WeightStore};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::rng::Generators;
use crate::schedulers::{scheduler_from_name, Scheduler, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// How to load a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype the models run in; weights are converted while loading.
    pub dtype: DType,
    /// Weight variant to prefer (`"fp16"`). `None` picks `"fp16"` for f16/bf16 runs and the plain
    /// weights otherwise (falling back to fp16 files when they are the only ones).
    pub variant: Option<String>,
    /// Where and how model ids are fetched from the hub.
    pub hub: HubOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, variant: None, hub: HubOptions::from_env() }
    }
}

/// Parses the dtype names users type: f32/float32, f16/float16/fp16/half, bf16/bfloat16.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_ascii_lowercase().trim_start_matches("torch.") {
        "f32" | "float32" | "fp32" | "float" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => {
            Err(Error::invalid(format!("unknown dtype `{other}` (expected f32, f16 or bf16)")))
        }
    }
}

/// Parses `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| Error::invalid(format!("bad device `{name}`")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::invalid(format!("device `{name}` requested but this build has no CUDA support (build with `--features cuda`)")));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => {
            Err(Error::invalid(format!("unknown device `{other}` (expected cpu, cuda or cuda:N)")))
        }
    }
}

/// What to return from a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputType {
    /// Decode with the VAE and return RGB images (and the final latents).
    #[default]
    Image,
    /// Skip the VAE; return only the final latents.
    Latent,
}

/// The inputs of one text-to-image run; defaults match diffusers' `__call__`.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// The prompts; empty when `prompt_embeds` are given instead.
    pub prompts: Vec<String>,
    /// One negative prompt per prompt, or a single one for all; `None` means "".
    pub negative_prompts: Option<Vec<String>>,
    /// diffusers' `prompt_embeds`: text embeddings `[prompts, tokens, hidden]` used instead of
    /// encoding `prompts` (which must then be empty), e.g. from a prompt-weighting library.
    pub prompt_embeds: Option<Tensor>,
    /// diffusers' `negative_prompt_embeds`, shaped as the prompt embeddings: used with guidance
    /// instead of encoding the negative prompts (which must then be `None`).
    pub negative_prompt_embeds: Option<Tensor>,
    /// Defaults to the UNet's `sample_size` times the VAE scale factor.
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_inference_steps: usize,
    /// Classifier-free guidance is used when this is above 1.
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` ("Common Diffusion Noise Schedules and Sample Steps are
    /// Flawed", section 3.4): with guidance and a value above 0, the guided prediction is rescaled
    /// toward the text prediction's standard deviation (`rescale_noise_cfg`). Default 0 (off).
    pub guidance_rescale: f64,
    /// DDIM's `eta` (0 = deterministic DDIM, 1 = DDPM-like noise drawn from the run's generator).
    /// Non-zero values need a scheduler with an `eta` step option.
    pub eta: f64,
    pub num_images_per_prompt: usize,
    /// One seed for the whole batch (one torch generator) or one per image, as diffusers takes a
    /// generator or a list of generators. Empty: a random seed is drawn (see [`GenerateOutput::seeds`]).
    pub seeds: Vec<u64>,
    /// A scheduler name (class name, short or A1111 name); `None` uses the model's own class.
    pub scheduler: Option<String>,
    /// Overrides the model's `scheduler_config.json` (diffusers' `X.from_config(...)`).
    pub scheduler_config: Option<SchedulerConfig>,
    pub output: OutputType,
    /// diffusers' `latents`: the initial noise `[batch, C, h/8, w/8]`, used instead of drawing it
    /// from the seeds, and scaled by the scheduler's `init_noise_sigma` as diffusers does. The
    /// seeds still drive the noise of stochastic schedulers' steps.
    pub latents: Option<Tensor>,
}

impl GenerateParams {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompts: vec![prompt.into()],
            negative_prompts: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            height: None,
            width: None,
            num_inference_steps: 50,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            eta: 0.0,
            num_images_per_prompt: 1,
            seeds: vec![],
            scheduler: None,
            scheduler_config: None,
            output: OutputType::Image,
            latents: None,
        }
    }
}

/// Reported after every denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    pub elapsed: Duration,
}

/// Cancels a run from another thread; checked before every step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a run does after [`RunHooks::on_step_end`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepControl {
    /// Go on with the next step.
    Continue,
    /// Skip the remaining steps and decode the latents as they are now: diffusers' `interrupt`.
    Finish,
    /// Stop the run with [`Error::Cancelled`].
    Cancel,
}

/// Optional per-run hooks.
#[derive(Default)]
pub struct RunHooks<'a> {
    /// Called after each step; returning `false` cancels the run ([`Error::Cancelled`]).
    pub on_step: Option<&'a mut dyn FnMut(&StepProgress) -> bool>,
    /// diffusers' `callback_on_step_end`: called after each step (before `on_step`) with the
    /// latents `[batch, C, h/8, w/8]` (f32) as the scheduler left them. It may replace them with
    /// a tensor of the same shape, which the next step (or the decoder) then takes.
    pub on_step_end: Option<&'a mut dyn FnMut(&StepProgress, &mut Tensor) -> StepControl>,
    pub cancel: Option<CancelToken>,
}

/// Wall time of each stage of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimings {
    pub text_encoder: Duration,
    pub denoise: Duration,
    pub vae_decode: Duration,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// `batch = prompts x num_images_per_prompt` RGB images, prompt-major (empty for latents).
    pub images: Vec<image::RgbImage>,
    /// Final latents `[batch, C, h/8, w/8]` in f32, before the VAE scaling.
    pub latents: Tensor,
    /// The seeds used, so any run can be repeated.
    pub seeds: Vec<u64>,
    pub timings: StageTimings,
}

#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(default)]
    scheduler: Option<(Option<String>, Option<String>)>,
}

pub struct StableDiffusionPipeline {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// The model's `scheduler/scheduler_config.json`.
    pub scheduler_config: SchedulerConfig,
    /// The scheduler class `model_index.json` names (diffusers' default for this model).
    pub scheduler_class: String,
    pub folder: PathBuf,
    device: Device,
    dtype: DType,
}

impl StableDiffusionPipeline {
    /// Loads a diffusers folder, or a hub model id (fetched into the Hugging Face cache).
    pub fn from_pretrained(id_or_path: &str, opts: &LoadOptions) -> Result<Self> {
        let variant =
            opts.variant.clone().or_else(|| (opts.dtype != DType::F32).then(|| "fp16".to_string()));
        let hub = HubOptions { variant: variant.clone(), ..opts.hub.clone() };
        let folder = resolve_model(id_or_path, &hub)?;
        Self::from_folder(&folder, opts.dtype, &opts.device, variant.as_deref())
    }

    /// Loads a local diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    /// `tokenizer/`, `scheduler/`).
    pub fn from_folder(
        folder: &Path,
        dtype: DType,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<Self> {
        if !folder.is_dir() {
            return Err(Error::NotFound { path: folder.to_path_buf() });
        }
        if device.is_cpu() {
            crate::runtime::init_cpu(None)?;
            crate::cpu::check_dtype_supported(dtype)?;
        }
        let index: ModelIndex = read_json(&folder.join("model_index.json"))?;
        let scheduler_config =
            SchedulerConfig::from_file(&folder.join("scheduler").join("scheduler_config.json"))?;
        let scheduler_class = index
            .scheduler
            .and_then(|(_, class)| class)
            .or_else(|| scheduler_config.class_name().map(str::to_string))
            .unwrap_or_else(|| "DDIMScheduler".to_string());
        // Fail early on a scheduler class we do not have, not at the first generate call.
        scheduler_from_name(&scheduler_class, &scheduler_config)?;

        let tokenizer = ClipTokenizer::from_folder(&folder.join("tokenizer"))?;
        let load = |sub: &str, stem: &str| -> Result<(PathBuf, WeightStore)> {
            let dir = folder.join(sub);
            let store = WeightStore::open_component(&dir, stem, variant)?;
            Ok((dir, store))
        };
        let (dir, store) = load("text_encoder", "model")?;
        let cfg: ClipTextConfig = read_json(&dir.join("config.json"))?;
        let text_encoder =
            build_component(&dir, store, dtype, device, |vb| ClipTextModel::new(vb, &cfg))?;
        let (dir, store) = load("unet", "diffusion_pytorch_model")?;
        let cfg: UNet2DConditionConfig = read_json(&dir.join("config.json"))?;
        let unet =
            build_component(&dir, store, dtype, device, |vb| UNet2DConditionModel::new(vb, &cfg))?;
        let (dir, store) = load("vae", "diffusion_pytorch_model")?;
        let cfg: AutoencoderKLConfig = read_json(&dir.join("config.json"))?;
        let vae = build_component(&dir, store, dtype, device, |vb| AutoencoderKL::new(vb, &cfg))?;

        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            scheduler_class,
            folder: folder.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype activations flow in: the model dtype, except bf16 on the CPU, where only
    /// the GEMM operands are bf16 (see [`crate::nn`]).
    pub fn activation_dtype(&self) -> DType {
        crate::nn::activation_dtype(self.dtype, &self.device)
    }

    /// Pixels per latent side (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// The default image side: the UNet's `sample_size` times the VAE scale factor (768 for SD 2.1).
    pub fn default_size(&self) -> usize {
        self.unet.config().sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    /// A fresh scheduler for one run: `name` (or the model's class) built from `config` (or the
    /// model's scheduler config) with diffusers' `from_config` semantics.
    pub fn scheduler(
        &self,
        name: Option<&str>,
        config: Option<&SchedulerConfig>,
    ) -> Result<Box<dyn Scheduler>> {
        scheduler_from_name(
            name.unwrap_or(&self.scheduler_class),
            config.unwrap_or(&self.scheduler_config),
        )
    }

    /// Tokenizes and encodes prompts: `[n, 77, hidden]` in the activation dtype.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.max_length());
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?);
        }
        let ids =
            Tensor::from_vec(ids, (prompts.len(), self.tokenizer.max_length()), &self.device)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    pub fn generate(&self, params: &GenerateParams) -> Result<GenerateOutput> {
        self.generate_with(params, RunHooks::default())
    }

    pub fn generate_with(
        &self,
        params: &GenerateParams,
        mut hooks: RunHooks<'_>,
    ) -> Result<GenerateOutput> {
        let plan = self.validate(params)?;
        let mut scheduler =
            self.scheduler(params.scheduler.as_deref(), params.scheduler_config.as_ref())?;
        scheduler.set_timesteps(params.num_inference_steps)?;
        if params.eta != 0.0 {
            scheduler.set_step_option("eta", params.eta)?;
        }
        let mut generators = Generators::from_seeds(&plan.seeds, plan.batch)?;

        // Text: [uncond..., cond...] when guiding, each prompt repeated per image (prompt-major).
        let started = Instant::now();
        let repeat = |embeds: Tensor| -> Result<Tensor> {
            let (n, seq, d) = embeds.dims3()?;
            let k = params.num_images_per_prompt;
            Ok(embeds.unsqueeze(1)?.repeat((1, k, 1, 1))?.reshape((n * k, seq, d))?)
        };
        let given =
            |embeds: &Tensor| embeds.to_dtype(self.activation_dtype())?.to_device(&self.device);
        let cond = match &params.prompt_embeds {
            Some(embeds) => given(embeds)?,
            None => self.encode_prompts(&params.prompts)?,
        };
        let cond = repeat(cond)?;
        let context = if plan.guidance {
            let uncond = match &params.negative_prompt_embeds {
                Some(embeds) => given(embeds)?,
                None => {
                    let negatives = match &params.negative_prompts {
                        None => vec![String::new(); plan.prompts],
                        Some(n) if n.len() == 1 => vec![n[0].clone(); plan.prompts],
                        Some(n) => n.clone(),
                    };
                    self.encode_prompts(&negatives)?
                }
            };
            Tensor::cat(&[repeat(uncond)?, cond], 0)?
        } else {
            cond
        };
        let text_time = started.elapsed();

        let started = Instant::now();
        let shape = plan.latents_shape;
        let noise = match &params.latents {
            Some(given) => given.to_dtype(DType::F32)?.to_device(&self.device)?,
            None => generators.randn(&shape, &self.device)?,
        };
        let mut latents = (noise * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            if hooks.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Err(Error::Cancelled);
            }
            let input = if plan.guidance {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input =
                scheduler.scale_model_input(&input, t)?.to_dtype(self.activation_dtype())?;
            let pred = self.unet.forward(&input, t, &context)?.to_dtype(DType::F32)?;
            let pred = if plan.guidance {
                let (uncond, cond) =
                    (pred.narrow(0, 0, plan.batch)?, pred.narrow(0, plan.batch, plan.batch)?);
                let guided = (&uncond + ((&cond - &uncond)? * params.guidance_scale)?)?;
                if params.guidance_rescale > 0.0 {
                    rescale_noise_cfg(&guided, &cond, params.guidance_rescale)?
                } else {
                    guided
                }
            } else {
                pred
            };
            latents = scheduler.step(&pred, t, &latents, &mut generators)?;
            let progress = StepProgress {
                step: i + 1,
                total: timesteps.len(),
                timestep: t,
                elapsed: started.elapsed(),
            };
            let control = match hooks.on_step_end.as_mut() {
                Some(on_step_end) => {
                    let control = on_step_end(&progress, &mut latents);
                    latents = checked_latents(latents, &shape, &self.device)?;
                    control
                }
                None => StepControl::Continue,
            };
            if let Some(on_step) = hooks.on_step.as_mut() {
                if !on_step(&progress) {
                    return Err(Error::Cancelled);
                }
            }
            match control {
                StepControl::Continue => {}
                StepControl::Finish => break,
                StepControl::Cancel => return Err(Error::Cancelled),
            }
        }
        let denoise_time = started.elapsed();

        let started = Instant::now();
        let images = match params.output {
            OutputType::Latent => vec![],
            OutputType::Image => self.decode_to_images(&latents)?,
        };
        let timings = StageTimings {
            text_encoder: text_time,
            denoise: denoise_time,
            vae_decode: started.elapsed(),
        };
        Ok(GenerateOutput { images, latents, seeds: plan.seeds, timings })
    }

    /// Decodes latents (as the denoising loop leaves them) into the VAE's output, roughly in [-1, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled =
            (latents / self.vae.config().scaling_factor)?.to_dtype(self.activation_dtype())?;
        Ok(self.vae.decode(&scaled)?.to_dtype(DType::F32)?)
    }

    /// Decodes latents into 8-bit RGB images, rounding like diffusers' `numpy_to_pil`.
    pub fn decode_to_images(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        let decoded = self.decode_latents(latents)?;
        to_rgb_images(&decoded)
    }

    fn validate(&self, p: &GenerateParams) -> Result<RunPlan> {
        let scale = self.vae_scale_factor();
        let height = p.height.unwrap_or_else(|| self.default_size());
        let width = p.width.unwrap_or_else(|| self.default_size());
        for (name, v) in [("height", height), ("width", width)] {
            if v == 0 || v % scale != 0 {
                return Err(Error::invalid(format!(
                    "{name} must be a positive multiple of {scale}, got {v}"
                )));
            }
            if v > 4096 {
                return Err(Error::invalid(format!(
                    "{name} {v} is larger than the supported maximum of 4096"
                )));
            }
        }
        let prompts = self.validate_prompts(p)?;
        if p.num_inference_steps == 0 {
            return Err(Error::invalid("num_inference_steps must be at least 1"));
        }
        if p.num_images_per_prompt == 0 {
            return Err(Error::invalid("num_images_per_prompt must be at least 1"));
        }
        if !p.guidance_scale.is_finite() {
            return Err(Error::invalid(format!(
                "guidance_scale must be a finite number, got {}",
                p.guidance_scale
            )));
        }
        if !p.guidance_rescale.is_finite() || p.guidance_rescale < 0.0 {
            return Err(Error::invalid(format!(
                "guidance_rescale must be a finite number >= 0, got {}",
                p.guidance_rescale
            )));
        }
        if !(0.0..=1.0).contains(&p.eta) {
            return Err(Error::invalid(format!("eta must be between 0 and 1, got {}", p.eta)));
        }
        let batch = prompts * p.num_images_per_prompt;
        let latents_shape = [batch, self.unet.config().in_channels, height / scale, width / scale];
        if let Some(given) = &p.latents {
            if given.dims() != latents_shape {
                return Err(Error::invalid(format!(
                    "latents have shape {:?}, expected {latents_shape:?} ([images, channels, height/{scale}, width/{scale}])",
                    given.dims()
                )));
            }
        }
        let seeds = match p.seeds.len() {
            0 => vec![random_seed()],
            1 => p.seeds.clone(),
            n if n == batch => p.seeds.clone(),
            n => {
                return Err(Error::invalid(format!(
                    "{n} seeds for {batch} images; give one seed, or one per image"
                )))
            }
        };
        Ok(RunPlan { prompts, batch, latents_shape, guidance: p.guidance_scale > 1.0, seeds })
    }

    /// Checks the prompts or prompt embeddings (and their negatives) and returns how many
    /// prompts there are.
    fn validate_prompts(&self, p: &GenerateParams) -> Result<usize> {
        let hidden = self.unet.config().cross_attention_dim;
        let tokens = self.tokenizer.max_length();
        let cond_dims = match &p.prompt_embeds {
            Some(_) if !p.prompts.is_empty() => {
                return Err(Error::invalid("give prompts or prompt_embeds, not both"));
            }
            Some(embeds) => match embeds.dims() {
                &[n, seq, h] if n > 0 && seq > 0 && h == hidden => vec![n, seq, h],
                dims => {
                    return Err(Error::invalid(format!(
                        "prompt_embeds have shape {dims:?}, expected [prompts, tokens, {hidden}]"
                    )))
                }
            },
            None if p.prompts.is_empty() => {
                return Err(Error::invalid("at least one prompt is required"))
            }
            None => vec![p.prompts.len(), tokens, hidden],
        };
        let prompts = cond_dims[0];
        if let Some(n) = &p.negative_prompts {
            if p.negative_prompt_embeds.is_some() {
                return Err(Error::invalid(
                    "give negative prompts or negative_prompt_embeds, not both",
                ));
            }
            if n.len() != 1 && n.len() != prompts {
                return Err(Error::invalid(format!(
                    "{} negative prompts for {prompts} prompts; give one, or one per prompt",
                    n.len()
                )));
            }
        }
        match &p.negative_prompt_embeds {
            Some(embeds) if embeds.dims() != cond_dims => Err(Error::invalid(format!(
                "negative_prompt_embeds have shape {:?}, expected that of the prompt embeddings, {cond_dims:?}",
                embeds.dims()
            ))),
            // Encoded negative prompts have the tokenizer's length; they must match to be batched.
            None if p.guidance_scale > 1.0 && cond_dims[1] != tokens => Err(Error::invalid(format!(
                "prompt_embeds of {} tokens need negative_prompt_embeds of the same shape (negative prompts are encoded to {tokens} tokens)",
                cond_dims[1]
            ))),
            _ => Ok(prompts),
        }
    }
}

struct RunPlan {
    /// Prompts (or rows of prompt embeddings); `batch` is this times the images per prompt.
    prompts: usize,
    batch: usize,
    latents_shape: [usize; 4],
    guidance: bool,
    seeds: Vec<u64>,
}

/// The latents a step hook left: those of the run, or its replacement, which must have the same
/// shape; taken as f32 on the run's device.
fn checked_latents(latents: Tensor, shape: &[usize], device: &Device) -> Result<Tensor> {
    if latents.dims() != shape {
        return Err(Error::invalid(format!(
            "the step hook replaced the latents {shape:?} with a tensor of shape {:?}",
            latents.dims()
        )));
    }
    Ok(latents.to_dtype(DType::F32)?.to_device(device)?)
}

/// diffusers' `rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale)`: scales each
/// sample of the guided prediction to the standard deviation (over all dims but the batch, with
/// Bessel's correction, as `torch.std`) of the text prediction, then mixes it with the guided one:
/// `r * cfg * (std_text / std_cfg) + (1 - r) * cfg`, in f32.
pub fn rescale_noise_cfg(
    noise_cfg: &Tensor,
    noise_pred_text: &Tensor,
    guidance_rescale: f64,
) -> Result<Tensor> {
    let cfg = noise_cfg.to_dtype(DType::F32)?;
    let text = noise_pred_text.to_dtype(DType::F32)?;
    let batch = cfg.dim(0)?;
    let std = |t: &Tensor| -> Result<Vec<f32>> {
        let rows = t.flatten_from(1)?.to_vec2::<f32>()?;
        Ok(rows
            .iter()
            .map(|r| {
                let n = r.len() as f64;
                let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
                var.sqrt() as f32
            })
            .collect())
    };
    let (std_text, std_cfg) = (std(&text)?, std(&cfg)?);
    let ratio: Vec<f32> = std_text.iter().zip(&std_cfg).map(|(t, c)| t / c).collect();
    let mut shape = vec![1usize; cfg.rank()];
    shape[0] = batch;
    let ratio = Tensor::from_vec(ratio, shape, cfg.device())?;
    let rescaled = cfg.broadcast_mul(&ratio)?;
    Ok(((rescaled * guidance_rescale)? + (cfg * (1.0 - guidance_rescale))?)?)
}

/// A seed from the OS clock and address-space randomness; printed by callers so a run can be
/// repeated.
pub fn random_seed() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Keep seeds in torch's accepted range and easy to type.
    h.finish() >> 1
}

/// `[batch, 3, h, w]` in [-1, 1] to RGB images, computed in f32 exactly as diffusers'
/// postprocessing does: `clamp(x / 2 + 0.5, 0, 1) * 255`, rounded half to even (numpy's round).
pub fn to_rgb_images(decoded: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = decoded.dims4()?;
    if c != 3 {
        return Err(Error::invalid(format!("expected 3 image channels, got {c}")));
    }
    let hwc = decoded.to_dtype(DType::F32)?.permute((0, 2, 3, 1))?.contiguous()?;
    let data = hwc.flatten_all()?.to_vec1::<f32>()?;
    let to_u8 = |x: f32| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
    let per_image = h * w * 3;
    Ok(data
        .chunks_exact(per_image)
        .take(b)
        .map(|img| {
            let bytes = img.iter().map(|&x| to_u8(x)).collect();
            image::RgbImage::from_raw(w as u32, h as u32, bytes)
                .expect("buffer size matches dimensions")
        })
        .collect())
}
