//! Step 1 of a run, diffusers' `check_inputs`: every argument is checked before any model runs,
//! and the sizes the later steps need are worked out once.

use super::denoise::Guidance;
use super::params::{random_seed, GenerateParams};
use super::StableDiffusionPipeline;
use crate::{Error, Result};

/// The sizes and seeds of a run, from its checked arguments.
pub(super) struct RunPlan {
    /// Prompts (or rows of prompt embeddings); `batch` is this times the images per prompt.
    pub prompts: usize,
    pub batch: usize,
    pub latents_shape: [usize; 4],
    pub seeds: Vec<u64>,
}

impl StableDiffusionPipeline {
    pub(super) fn check_inputs(&self, p: &GenerateParams) -> Result<RunPlan> {
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
        let prompts = self.check_prompts(p)?;
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
        Ok(RunPlan { prompts, batch, latents_shape, seeds })
    }

    /// Checks the prompts or prompt embeddings (and their negatives) and returns how many
    /// prompts there are.
    fn check_prompts(&self, p: &GenerateParams) -> Result<usize> {
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
            None if Guidance::of(p).is_enabled() && cond_dims[1] != tokens => Err(Error::invalid(format!(
                "prompt_embeds of {} tokens need negative_prompt_embeds of the same shape (negative prompts are encoded to {tokens} tokens)",
                cond_dims[1]
            ))),
            _ => Ok(prompts),
        }
    }
}
