//! Step 1 of a run, diffusers' `check_inputs`: every argument is checked before any model runs,
//! and the sizes the later steps need are worked out once.

use super::denoise::Guidance;
use super::finite::check_given_finite;
use super::params::{random_seed, GenerateParams, InitImage};
use super::preprocess::default_size;
use super::StableDiffusionPipeline;
use crate::{Error, Result};

/// The sizes and seeds of a run, from its checked arguments.
pub(super) struct RunPlan {
    /// Prompts (or rows of prompt embeddings); `batch` is this times the images per prompt.
    pub prompts: usize,
    pub batch: usize,
    /// The image size in pixels, `(height, width)`.
    pub size: (usize, usize),
    pub latents_shape: [usize; 4],
    pub seeds: Vec<u64>,
}

impl StableDiffusionPipeline {
    pub(super) fn check_inputs(&self, p: &GenerateParams) -> Result<RunPlan> {
        let scale = self.vae_scale_factor();
        // An edit run's size defaults to its (first) image's.
        let image_size = p
            .init_image
            .as_ref()
            .and_then(|init| init.images.first())
            .map(|image| default_size(image.width(), image.height(), scale));
        let height = p.height.or(image_size.map(|s| s.0)).unwrap_or_else(|| self.default_size());
        let width = p.width.or(image_size.map(|s| s.1)).unwrap_or_else(|| self.default_size());
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
        let batch = self.check_run_size(prompts, p.num_images_per_prompt, (height, width))?;
        let channels = match &p.init_image {
            Some(init) => self.check_init_image(init, prompts, p.num_inference_steps)?,
            None => self.check_unet_without_mask()?,
        };
        if p.init_image.is_some() && p.latents.is_some() {
            return Err(Error::invalid("latents cannot be given with an init image"));
        }
        let latents_shape = [batch, channels, height / scale, width / scale];
        if let Some(given) = &p.latents {
            if given.dims() != latents_shape {
                return Err(Error::invalid(format!(
                    "latents have shape {:?}, expected {latents_shape:?} ([images, channels, height/{scale}, width/{scale}])",
                    given.dims()
                )));
            }
            check_given_finite("latents", given)?;
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
        Ok(RunPlan { prompts, batch, size: (height, width), latents_shape, seeds })
    }

    /// Checks the image, mask and strength of an edit run against the prompts and the UNet, and
    /// returns the number of latent channels.
    fn check_init_image(&self, init: &InitImage, prompts: usize, steps: usize) -> Result<usize> {
        if init.mask.is_none() {
            self.check_unet_without_mask()?;
        }
        let n = init.images.len();
        if n != 1 && n != prompts {
            return Err(Error::invalid(format!(
                "{n} init images for {prompts} prompts; give one, or one per prompt"
            )));
        }
        if !(init.strength > 0.0 && init.strength <= 1.0) {
            return Err(Error::invalid(format!(
                "strength must be in (0, 1], got {}",
                init.strength
            )));
        }
        // diffusers' `get_timesteps` runs `int(steps * strength)` of the steps.
        if (steps as f64 * init.strength) < 1.0 {
            return Err(Error::invalid(format!(
                "strength {} of {steps} steps leaves no step to run; raise either",
                init.strength
            )));
        }
        let latent = self.vae.config().latent_channels;
        let Some(mask) = &init.mask else {
            return Ok(latent);
        };
        let image = &init.images[0];
        if mask.dimensions() != image.dimensions() {
            return Err(Error::invalid(format!(
                "the mask is {}x{} but the image is {}x{}; they must have the same size",
                mask.width(),
                mask.height(),
                image.width(),
                image.height()
            )));
        }
        // The legacy UNet takes the latents; the inpainting one also the mask and the masked
        // image's latents.
        match self.unet.config().in_channels {
            c if c == latent || c == 2 * latent + 1 => Ok(latent),
            c => Err(Error::invalid(format!(
                "inpainting needs a UNet with {latent} or {} input channels, this one has {c}",
                2 * latent + 1
            ))),
        }
    }

    /// A UNet that takes more than the latents (an inpainting UNet) needs an image and a mask.
    fn check_unet_without_mask(&self) -> Result<usize> {
        let unet = self.unet.config().in_channels;
        let latent = self.vae.config().latent_channels;
        if unet != latent {
            return Err(Error::invalid(format!(
                "this UNet takes {unet} input channels (an inpainting model): give an init image and a mask"
            )));
        }
        Ok(unet)
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
        let layers = self.text_encoder.config().num_hidden_layers;
        if p.clip_skip.is_some_and(|k| k >= layers) {
            return Err(Error::invalid(format!(
                "clip_skip {} must be less than the text encoder's {layers} layers",
                p.clip_skip.unwrap_or_default()
            )));
        }
        for (argument, given) in [
            ("prompt_embeds", &p.prompt_embeds),
            ("negative_prompt_embeds", &p.negative_prompt_embeds),
        ] {
            if let Some(given) = given {
                check_given_finite(argument, given)?;
            }
        }
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
