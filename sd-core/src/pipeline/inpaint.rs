//! The inpainting run, step by step as diffusers' `StableDiffusionInpaintPipeline.__call__`
//! (without `padding_mask_crop`), for both kinds of UNet: the inpainting UNet, which also takes
//! the mask and the masked image's latents (9 input channels for SD), and a plain UNet, whose
//! latents are blended with the image's, re-noised, outside the mask after every step.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::denoise::{DenoiseLoop, Guidance};
use super::hooks::RunHooks;
use super::img2img::{repeat_to_batch, strength_timesteps};
use super::params::{GenerateOutput, GenerateParams, InitImage};
use super::preprocess::{preprocess_images, preprocess_mask, resize_nearest};
use super::StableDiffusionPipeline;
use crate::rng::Generators;
use crate::schedulers::Scheduler;
use crate::{Error, Result};

impl StableDiffusionPipeline {
    /// diffusers' `StableDiffusionInpaintPipeline.__call__`.
    pub(super) fn inpaint(
        &self,
        params: &GenerateParams,
        init: &InitImage,
        mut hooks: RunHooks<'_>,
    ) -> Result<GenerateOutput> {
        let mask = init.mask.as_ref().ok_or_else(|| Error::invalid("inpainting needs a mask"))?;

        // 1. Check inputs
        let plan = self.check_inputs(params)?;
        let guidance = Guidance::of(params);
        let [batch, channels, latent_h, latent_w] = plan.latents_shape;
        let blends_latents = self.unet.config().in_channels == channels;

        // 2. Prepare timesteps, the tail that `strength` leaves
        let mut scheduler = self.prepare_scheduler(params)?;
        let timesteps =
            strength_timesteps(scheduler.as_mut(), params.num_inference_steps, init.strength)?;
        let mut generators = Generators::from_seeds(&plan.seeds, batch)?;

        // 3. Encode the prompt
        let started = Instant::now();
        let context = self.encode_prompt(params, &plan, guidance)?;
        let text_encoder = started.elapsed();

        // 4. Preprocess the image and the mask
        let started = Instant::now();
        let pixels = preprocess_images(&init.images, plan.size, self.device())?;
        let mask_pixels = preprocess_mask(mask, plan.size, self.device())?;

        // 5. Prepare latents: noise at full strength, else the image's latents noised to the
        // first timestep. The image is encoded first (one draw) when the latents need it.
        let full_strength = init.strength == 1.0;
        let image_latents = if blends_latents || !full_strength {
            let latents = self.encode_images(&pixels, &mut generators)?;
            Some(repeat_to_batch(&latents, batch)?)
        } else {
            None
        };
        let noise = generators.randn(&plan.latents_shape, self.device())?;
        let latents = match &image_latents {
            Some(image_latents) if !full_strength => {
                scheduler.add_noise(image_latents, &noise, timesteps[0])?
            }
            _ => (&noise * scheduler.init_noise_sigma())?,
        };

        // 6. Prepare the mask at latent size and the masked image's latents (another draw)
        let latent_mask =
            repeat_to_batch(&resize_nearest(&mask_pixels, (latent_h, latent_w))?, batch)?;
        let keep = mask_pixels.lt(0.5)?.to_dtype(DType::F32)?;
        let masked_latents = self.encode_images(&pixels.broadcast_mul(&keep)?, &mut generators)?;
        let masked_latents = repeat_to_batch(&masked_latents, batch)?;

        // 7. Denoising loop: the inpainting UNet also takes the mask and the masked image's
        // latents; a plain UNet's latents are blended with the image's after every step.
        let extra_channels = if blends_latents {
            None
        } else {
            let extra = Tensor::cat(&[&latent_mask, &masked_latents], 1)?;
            Some(if guidance.is_enabled() { Tensor::cat(&[&extra, &extra], 0)? } else { extra })
        };
        let mut blend = |scheduler: &dyn Scheduler, i: usize, latents: Tensor| {
            let image_latents = image_latents.as_ref().expect("encoded for a plain UNet");
            blend_known_region(
                scheduler,
                &timesteps,
                i,
                latents,
                image_latents,
                &noise,
                &latent_mask,
            )
        };
        let run = DenoiseLoop {
            after_step: if blends_latents { Some(&mut blend) } else { None },
            extra_channels: extra_channels.as_ref(),
            ..DenoiseLoop::new(&context, guidance, &timesteps)
        };
        let latents =
            self.denoise(scheduler.as_mut(), &mut generators, latents, run, &mut hooks)?;
        let denoise = started.elapsed();

        // 8. Decode and postprocess
        self.finish_run(params.output, latents, plan.seeds, text_encoder, denoise)
    }
}

/// The plain UNet's blending after step `i`: outside the mask, the image's latents noised to the
/// next timestep (as they are after the last one); inside, the step's latents:
/// `(1 - mask) * image + mask * latents`.
fn blend_known_region(
    scheduler: &dyn Scheduler,
    timesteps: &[f64],
    i: usize,
    latents: Tensor,
    image_latents: &Tensor,
    noise: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let known = match timesteps.get(i + 1) {
        Some(&next) => scheduler.add_noise(image_latents, noise, next)?,
        None => image_latents.clone(),
    };
    let inverse = (1.0 - mask)?;
    Ok((known.broadcast_mul(&inverse)? + latents.broadcast_mul(mask)?)?)
}
