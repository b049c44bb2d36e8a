//! The image-to-image run, step by step as diffusers' `StableDiffusionImg2ImgPipeline.__call__`,
//! and the steps inpainting shares with it (`strength`'s timesteps, encoding images).

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::denoise::Guidance;
use super::hooks::RunHooks;
use super::params::{GenerateOutput, GenerateParams, InitImage};
use super::preprocess::preprocess_images;
use super::step_batch::ActiveRun;
use super::StableDiffusionPipeline;
use crate::rng::Generators;
use crate::schedulers::Scheduler;
use crate::{Error, Result};

impl StableDiffusionPipeline {
    /// diffusers' `StableDiffusionImg2ImgPipeline.__call__`.
    pub(super) fn image_to_image(
        &self,
        params: &GenerateParams,
        init: &InitImage,
        hooks: RunHooks<'_>,
    ) -> Result<GenerateOutput> {
        // 1.-5. Check inputs, prepare timesteps, encode the prompt and the image
        let run = self.prepare_image_to_image(params, init)?;
        // 6. Denoising loop; 7. decode and postprocess
        self.run_to_end(run, hooks)
    }

    /// The steps of an image-to-image run before its denoising loop.
    pub(super) fn prepare_image_to_image(
        &self,
        params: &GenerateParams,
        init: &InitImage,
    ) -> Result<ActiveRun> {
        // 1. Check inputs
        let plan = self.check_inputs(params)?;
        let guidance = Guidance::of(params);

        // 2. Prepare timesteps, the tail that `strength` leaves
        let mut scheduler = self.prepare_scheduler(params)?;
        let timesteps =
            strength_timesteps(scheduler.as_mut(), params.num_inference_steps, init.strength)?;
        let mut generators = Generators::from_seeds(&plan.seeds, plan.batch)?;

        // 3. Encode the prompt
        let started = Instant::now();
        let context = self.encode_prompt(params, &plan, guidance)?;
        let text_encoder = started.elapsed();

        // 4. Preprocess the image
        let started = Instant::now();
        let mut pixels = preprocess_images(&init.images, plan.size, self.device())?;

        // 5. Prepare latents: the image's latents noised to the first timestep. With one
        // generator per image diffusers repeats the images to the batch before encoding (one
        // draw each); with one generator it encodes them once and repeats the latents.
        if generators.len() > 1 {
            pixels = repeat_to_batch(&pixels, plan.batch)?;
        }
        let init_latents =
            repeat_to_batch(&self.encode_images(&pixels, &mut generators)?, plan.batch)?;
        let noise = generators.randn(init_latents.dims(), self.device())?;
        let latents = scheduler.add_noise(&init_latents, &noise, timesteps[0])?;
        Ok(ActiveRun {
            params: params.clone(),
            seeds: plan.seeds,
            scheduler,
            generators,
            latents,
            context,
            guidance,
            timesteps,
            steps_done: 0,
            text_encoder,
            denoise: started.elapsed(),
            failure: None,
        })
    }

    /// diffusers' `retrieve_latents(vae.encode(images), generator)` times the VAE's scaling
    /// factor: a sample of the latent distribution of `pixels` `[n, 3, h, w]` drawn from the
    /// run's generators (one draw of `[n, ...]`, or one per image with one generator each).
    /// f32.
    pub fn encode_images(&self, pixels: &Tensor, generators: &mut Generators) -> Result<Tensor> {
        let dist = self.vae.encode(&pixels.to_dtype(self.activation_dtype())?)?;
        let noise = generators.randn(dist.mean.dims(), self.device())?;
        let sample = dist.sample_with(&noise.to_dtype(dist.mean.dtype())?)?;
        Ok((sample.to_dtype(DType::F32)? * self.vae.config().scaling_factor)?)
    }
}

/// diffusers' `get_timesteps(num_inference_steps, strength)`: runs the last
/// `int(steps * strength)` steps, i.e. the scheduler's timesteps from `t_start * order`, and sets
/// the scheduler's begin index there.
pub(super) fn strength_timesteps(
    scheduler: &mut dyn Scheduler,
    steps: usize,
    strength: f64,
) -> Result<Vec<f64>> {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    let begin = steps.saturating_sub(init_timestep) * scheduler.order();
    scheduler.set_begin_index(begin);
    match scheduler.timesteps().get(begin..) {
        Some(tail) if !tail.is_empty() => Ok(tail.to_vec()),
        _ => Err(Error::invalid(format!(
            "strength {strength} of {steps} steps leaves no timestep of {} to run",
            scheduler.class_name()
        ))),
    }
}

/// `x` `[n, ...]` repeated whole to `batch` rows (`x.repeat(batch // n, 1, 1, 1)`), as diffusers
/// repeats init images and masks: with several images the rows cycle through them.
pub(super) fn repeat_to_batch(x: &Tensor, batch: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n == batch {
        return Ok(x.clone());
    }
    Ok(x.repeat((batch / n, 1, 1, 1))?)
}
