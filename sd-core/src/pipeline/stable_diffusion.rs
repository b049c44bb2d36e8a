//! [`StableDiffusionPipeline`]: the tokenizer, text encoder, UNet, VAE and scheduler config of a
//! diffusers model folder, loaded, with each stage callable on its own. A run
//! ([`generate_with`](StableDiffusionPipeline::generate_with)) is in `text2img.rs`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::postprocess::to_rgb_images;
use crate::adapters::lora::{read_lora_file, ModelLayers};
use crate::adapters::textual_inversion::MultiVectorToken;
use crate::adapters::Adapters;
use crate::hub::{resolve_model, variant_for, HubOptions};
use crate::loading::{build_component, component_weight_paths, read_json, WeightStore};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::nn::collect_layers;
use crate::prompt::chunks::{apply_multipliers, empty_chunk, tokenize_chunks, CHUNK_IDS};
use crate::prompt::parse::parse_prompt_attention;
use crate::prompt::PromptSyntax;
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

#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(default)]
    scheduler: Option<(Option<String>, Option<String>)>,
}

/// A loaded diffusers model. It holds no per-run state: every run builds its own scheduler and
/// generators, so one pipeline can serve concurrent calls from several threads. With unfused
/// LoRAs loaded, runs are serialized and each chooses its LoRA scale (see [`crate::adapters`]).
///
/// Loading changes no process-wide state. On the CPU, a program that wants sd-core's thread pool
/// and allocator settings calls [`crate::runtime::init_cpu`] first (sd-cli and sd_py do); without
/// it candle's and rayon's defaults apply, with the same images, only speed and memory differ.
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
    /// The most images per UNet or VAE call; `None`: [`Self::model_batch`]'s estimate.
    pub(super) max_model_batch: Option<usize>,
    /// The LoRAs loaded into the text encoder and UNet.
    pub adapters: Adapters,
    /// The UNet weight files, hashed (once) for the image metadata's model hash.
    pub(super) unet_weights: Vec<PathBuf>,
    pub(super) model_hash: OnceLock<String>,
    /// Loaded textual-inversion tokens of several vectors, expanded in prompts.
    pub(crate) multi_vector_tokens: Vec<MultiVectorToken>,
}

impl StableDiffusionPipeline {
    /// Loads a diffusers folder, or a hub model id (fetched into the Hugging Face cache).
    pub fn from_pretrained(id_or_path: &str, opts: &LoadOptions) -> Result<Self> {
        let variant = variant_for(opts.variant.as_deref(), opts.dtype);
        let hub = HubOptions { variant: variant.clone(), ..opts.hub.clone() };
        let folder = resolve_model(id_or_path, &hub)?;
        Self::from_folder(&folder, opts.dtype, &opts.device, variant.as_deref())
    }

    /// Loads a local diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    /// `tokenizer/`, `scheduler/`). On a CPU without bf16 hardware, bf16 runs as f32
    /// ([`crate::cpu::run_dtype`]); [`Self::dtype`] says which dtype runs.
    pub fn from_folder(
        folder: &Path,
        dtype: DType,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<Self> {
        if !folder.is_dir() {
            return Err(Error::NotFound { path: folder.to_path_buf() });
        }
        let dtype = if device.is_cpu() { crate::cpu::run_dtype(dtype)? } else { dtype };
        let index: ModelIndex = read_json(&folder.join("model_index.json"))?;
        let scheduler_config =
            SchedulerConfig::from_file(folder.join("scheduler").join("scheduler_config.json"))?;
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
        let (text_encoder, text_encoder_layers) = collect_layers(|| {
            build_component(&dir, store, dtype, device, |vb| ClipTextModel::new(vb, &cfg))
        });
        let unet_weights =
            component_weight_paths(&folder.join("unet"), "diffusion_pytorch_model", variant)?;
        let (dir, store) = load("unet", "diffusion_pytorch_model")?;
        let cfg: UNet2DConditionConfig = read_json(&dir.join("config.json"))?;
        let (unet, unet_layers) = collect_layers(|| {
            build_component(&dir, store, dtype, device, |vb| UNet2DConditionModel::new(vb, &cfg))
        });
        let (dir, store) = load("vae", "diffusion_pytorch_model")?;
        let cfg: AutoencoderKLConfig = read_json(&dir.join("config.json"))?;
        let vae = build_component(&dir, store, dtype, device, |vb| AutoencoderKL::new(vb, &cfg))?;

        Ok(Self {
            tokenizer,
            text_encoder: text_encoder?,
            unet: unet?,
            vae,
            scheduler_config,
            scheduler_class,
            folder: folder.to_path_buf(),
            device: device.clone(),
            dtype,
            max_model_batch: None,
            adapters: Adapters::new(
                ModelLayers::new(text_encoder_layers),
                ModelLayers::new(unet_layers),
            ),
            unet_weights,
            model_hash: OnceLock::new(),
            multi_vector_tokens: vec![],
        })
    }

    /// diffusers' `load_lora_weights`: reads a `.safetensors` LoRA (diffusers/PEFT or kohya
    /// layout, see [`crate::adapters::lora`]) as adapter `name`, which becomes the only active
    /// one. The base weights are neither copied nor changed.
    pub fn load_lora(&self, path: &Path, name: &str) -> Result<()> {
        let layers = |component| self.adapters.layers(component);
        let adapter = read_lora_file(path, name, layers, self.dtype, &self.device)?;
        self.adapters.load(adapter)
    }

    /// diffusers' `set_adapters(names, adapter_weights)`.
    pub fn set_adapters(&self, adapters: &[(String, f64)]) -> Result<()> {
        self.adapters.set_active(adapters)
    }

    /// diffusers' `fuse_lora(lora_scale)`: see [`Adapters::fuse`].
    pub fn fuse_lora(&self, scale: f64) -> Result<()> {
        self.adapters.fuse(scale)
    }

    /// diffusers' `unfuse_lora`: the base weights again, bit for bit.
    pub fn unfuse_lora(&self) {
        self.adapters.unfuse()
    }

    /// Removes the named adapters (all with `None`); see [`Adapters::unload`].
    pub fn unload_lora(&self, names: Option<&[String]>) -> Result<()> {
        self.adapters.unload(names)
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

    /// Tokenizes and encodes prompts as diffusers does: `[n, 77, hidden]` in the activation
    /// dtype.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor> {
        self.encode_prompts_with(prompts, PromptSyntax::Plain, None)
    }

    /// Tokenizes and encodes prompts read in `syntax`, with diffusers' `clip_skip` (see
    /// [`ClipTextModel::forward_skipping`]); loaded multi-vector textual-inversion tokens are
    /// expanded first. Plain: `[n, 77, hidden]`. A1111: `[n, 77 * chunks, hidden]`, as many
    /// chunks as the longest prompt needs, the others padded with empty chunks (A1111's batches).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a `clip_skip` not below the text encoder's layer count, or an
    /// A1111 weight that is not a number.
    pub fn encode_prompts_with(
        &self,
        prompts: &[String],
        syntax: PromptSyntax,
        clip_skip: Option<usize>,
    ) -> Result<Tensor> {
        let skip = clip_skip.unwrap_or(0);
        // As `generate` checks it: the text encoder's own check is a candle error (fuzzing).
        let layers = self.text_encoder.config().num_hidden_layers;
        if skip >= layers {
            return Err(Error::invalid(format!(
                "clip_skip {skip} must be less than the text encoder's {layers} layers"
            )));
        }
        let expanded = prompts
            .iter()
            .map(|p| self.expand_multi_vector_tokens(p))
            .collect::<Result<Vec<_>>>()?;
        if syntax == PromptSyntax::A1111 {
            return self.encode_a1111_prompts(&expanded, skip);
        }
        let length = self.tokenizer.max_length();
        let mut ids = Vec::with_capacity(prompts.len() * length);
        for p in &expanded {
            ids.extend(self.tokenizer.encode(p)?);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), length), &self.device)?;
        Ok(self.text_encoder.forward_skipping(&ids, skip)?)
    }

    /// [`PromptSyntax::A1111`]: every prompt's chunks (padded to the longest prompt's count)
    /// encoded as one batch, weighted, and concatenated per prompt.
    fn encode_a1111_prompts(&self, prompts: &[String], clip_skip: usize) -> Result<Tensor> {
        let mut per_prompt = prompts
            .iter()
            .map(|p| tokenize_chunks(&self.tokenizer, &parse_prompt_attention(p)?))
            .collect::<Result<Vec<_>>>()?;
        let chunks = per_prompt.iter().map(Vec::len).max().unwrap_or(1);
        let empty = empty_chunk(&self.tokenizer)?;
        let (mut ids, mut multipliers) = (vec![], vec![]);
        for prompt_chunks in &mut per_prompt {
            prompt_chunks.resize(chunks, empty.clone());
            for chunk in prompt_chunks.iter() {
                ids.extend_from_slice(&chunk.ids);
                multipliers.extend(chunk.multipliers.iter().map(|&m| m as f32));
            }
        }
        let shape = (prompts.len() * chunks, CHUNK_IDS);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let multipliers = Tensor::from_vec(multipliers, shape, &self.device)?;
        let z = self.text_encoder.forward_skipping(&ids, clip_skip)?;
        let z = apply_multipliers(&z, &multipliers)?;
        Ok(z.reshape((prompts.len(), chunks * CHUNK_IDS, ()))?)
    }

    /// Decodes latents (as the denoising loop leaves them) into the VAE's output, roughly in
    /// [-1, 1]; [`Error::NonFinite`] if the output holds NaN or inf.
    /// Decodes in sub-batches of at most [`Self::model_batch`] images.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled =
            (latents / self.vae.config().scaling_factor)?.to_dtype(self.activation_dtype())?;
        let (images, _, height, width) = scaled.dims4()?;
        let scale = self.vae_scale_factor();
        let chunk = self.model_batch((height * scale, width * scale));
        let parts = (0..images)
            .step_by(chunk)
            .map(|start| {
                let part = scaled.narrow(0, start, chunk.min(images - start))?;
                self.vae.decode(&part)?.to_dtype(DType::F32)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let decoded = Tensor::cat(&parts, 0)?;
        self.check_decoded_finite(&decoded)?;
        Ok(decoded)
    }

    /// Decodes latents into 8-bit RGB images, rounding like diffusers' `numpy_to_pil`.
    pub fn decode_to_images(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        let decoded = self.decode_latents(latents)?;
        to_rgb_images(&decoded)
    }
}
