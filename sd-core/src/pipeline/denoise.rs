//! The denoising loop and classifier-free guidance, shared by the pipelines: text-to-image walks
//! the whole schedule from noise; image-to-image and inpainting start later in it from latents of
//! their own, and inpainting blends the known region back in after every step.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::hooks::{RunHooks, StepControl, StepProgress};
use super::params::GenerateParams;
use super::StableDiffusionPipeline;
use crate::rng::Generators;
use crate::schedulers::Scheduler;
use crate::{Error, Result};

/// Classifier-free guidance of one run (diffusers' `guidance_scale` and `guidance_rescale`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Guidance {
    pub scale: f64,
    pub rescale: f64,
}

impl Guidance {
    pub fn of(params: &GenerateParams) -> Self {
        Self { scale: params.guidance_scale, rescale: params.guidance_rescale }
    }

    /// diffusers' `do_classifier_free_guidance`: the UNet then sees the latents twice, with the
    /// unconditional and the conditional text context, as one batch.
    pub fn is_enabled(&self) -> bool {
        self.scale > 1.0
    }

    /// Combines the UNet's `[uncond..., cond...]` prediction: `uncond + scale * (cond - uncond)`,
    /// then `rescale_noise_cfg` when `rescale` is above 0. Without guidance, `pred` as it is.
    pub(super) fn apply(&self, pred: Tensor) -> Result<Tensor> {
        if !self.is_enabled() {
            return Ok(pred);
        }
        let batch = pred.dim(0)? / 2;
        let (uncond, cond) = (pred.narrow(0, 0, batch)?, pred.narrow(0, batch, batch)?);
        let guided = (&uncond + ((&cond - &uncond)? * self.scale)?)?;
        if self.rescale > 0.0 {
            rescale_noise_cfg(&guided, &cond, self.rescale)
        } else {
            Ok(guided)
        }
    }
}

/// Called after each scheduler step, before the run's hooks, with the scheduler, the 0-based
/// step index and the step's latents; returns the latents the run goes on with. Inpainting blends
/// the known region back in here (diffusers' `init_mask` mixing, which needs `add_noise`).
pub(crate) type AfterStep<'a> = &'a mut dyn FnMut(&dyn Scheduler, usize, Tensor) -> Result<Tensor>;

/// What one denoising loop runs with, besides its scheduler and initial latents.
pub(crate) struct DenoiseLoop<'a> {
    /// The UNet's text context: `[uncond..., cond...]` with guidance, `[cond...]` without.
    pub context: &'a Tensor,
    pub guidance: Guidance,
    /// The timesteps to walk: all of the scheduler's, or a tail of them for a later start.
    pub timesteps: &'a [f64],
    /// Changes the latents after every step (inpainting's blending); text-to-image has none.
    pub after_step: Option<AfterStep<'a>>,
    /// Channels concatenated to the scaled model input before every UNet call, batched as it
    /// (`[uncond..., cond...]` with guidance): the 9-channel inpainting UNet's mask and
    /// masked-image latents. f32.
    pub extra_channels: Option<&'a Tensor>,
}

impl<'a> DenoiseLoop<'a> {
    /// A loop over `timesteps` with nothing but the UNet and the scheduler.
    pub fn new(context: &'a Tensor, guidance: Guidance, timesteps: &'a [f64]) -> Self {
        Self { context, guidance, timesteps, after_step: None, extra_channels: None }
    }
}

impl StableDiffusionPipeline {
    /// diffusers' denoising loop: for each timestep, predict the noise (with guidance), step the
    /// scheduler, report progress to `hooks` and let them replace the latents, finish early or
    /// cancel. Returns the final latents, f32 as the scheduler leaves them.
    pub(crate) fn denoise(
        &self,
        scheduler: &mut dyn Scheduler,
        generators: &mut Generators,
        mut latents: Tensor,
        run: DenoiseLoop<'_>,
        hooks: &mut RunHooks<'_>,
    ) -> Result<Tensor> {
        let DenoiseLoop { context, guidance, timesteps, mut after_step, extra_channels } = run;
        let shape = latents.dims().to_vec();
        let started = Instant::now();
        for (i, &t) in timesteps.iter().enumerate() {
            if hooks.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let noise_pred =
                self.predict_noise(scheduler, &latents, t, context, guidance, extra_channels)?;
            latents = scheduler.step(&noise_pred, t, &latents, generators)?;
            if let Some(after_step) = after_step.as_mut() {
                latents = after_step(scheduler, i, latents)?;
            }
            self.check_step_finite(&latents, i + 1, timesteps.len(), guidance.scale)?;
            let progress = StepProgress {
                step: i + 1,
                total: timesteps.len(),
                timestep: t,
                elapsed: started.elapsed(),
            };
            let control = match hooks.on_step_end.as_mut() {
                Some(on_step_end) => {
                    let control = on_step_end(&progress, &mut latents);
                    latents = checked_latents(latents, &shape, self.device())?;
                    control
                }
                None => StepControl::Continue,
            };
            match control {
                StepControl::Continue => {}
                StepControl::Finish => break,
                StepControl::Cancel => return Err(Error::Cancelled),
            }
        }
        Ok(latents)
    }

    /// The UNet's noise prediction for `latents` at `t` (the scaled input followed by
    /// `extra_channels`, if any), guided: f32, shaped as `latents`.
    fn predict_noise(
        &self,
        scheduler: &mut dyn Scheduler,
        latents: &Tensor,
        t: f64,
        context: &Tensor,
        guidance: Guidance,
        extra_channels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let input = self.model_input(scheduler, latents, t, guidance, extra_channels)?;
        let pred = self.unet_in_sub_batches(&input, t, context, guidance)?.to_dtype(DType::F32)?;
        guidance.apply(pred)
    }

    /// The UNet's input for `latents` at `t`: twice (`[uncond, cond]`) with guidance, scaled by
    /// the scheduler, followed by `extra_channels` if any, in the activation dtype.
    pub(super) fn model_input(
        &self,
        scheduler: &mut dyn Scheduler,
        latents: &Tensor,
        t: f64,
        guidance: Guidance,
        extra_channels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let input = if guidance.is_enabled() {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let mut input = scheduler.scale_model_input(&input, t)?;
        if let Some(extra) = extra_channels {
            input = Tensor::cat(&[&input, extra], 1)?;
        }
        Ok(input.to_dtype(self.activation_dtype())?)
    }

    /// The UNet on `input` in sub-batches of at most [`Self::model_batch`] images; with guidance
    /// each call takes `[uncond_chunk, cond_chunk]` and the matching context rows, and the
    /// predictions are put back in the order `[uncond..., cond...]`.
    pub(super) fn unet_in_sub_batches(
        &self,
        input: &Tensor,
        t: f64,
        context: &Tensor,
        guidance: Guidance,
    ) -> Result<Tensor> {
        let halves = if guidance.is_enabled() { 2 } else { 1 };
        let (rows, _, height, width) = input.dims4()?;
        let images = rows / halves;
        let scale = self.vae_scale_factor();
        let chunk = self.model_batch((height * scale, width * scale));
        if chunk >= images {
            return Ok(self.unet.forward(input, t, context)?);
        }
        let mut preds = vec![Vec::new(); halves];
        for start in (0..images).step_by(chunk) {
            let n = chunk.min(images - start);
            let rows_of = |x: &Tensor| -> Result<Tensor> {
                let parts = (0..halves)
                    .map(|half| x.narrow(0, half * images + start, n))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            };
            let pred = self.unet.forward(&rows_of(input)?, t, &rows_of(context)?)?;
            for (half, part) in preds.iter_mut().enumerate() {
                part.push(pred.narrow(0, half * n, n)?);
            }
        }
        Ok(Tensor::cat(&preds.concat(), 0)?)
    }
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
