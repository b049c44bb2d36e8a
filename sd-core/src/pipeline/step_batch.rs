//! Step-level batching: runs that the caller steps one denoising step at a time, several of them
//! in one UNet call, each with its own scheduler, timestep, guidance and generators.
//!
//! A server keeps a set of [`ActiveRun`]s: a request joins with
//! [`StableDiffusionPipeline::start_run`] (steps 1-4 of its run: check inputs, timesteps, prompt,
//! latents), every tick stacks the runs of one [`BatchKey`] into
//! [`StableDiffusionPipeline::step_runs`], and a run whose steps are done leaves through
//! [`StableDiffusionPipeline::complete_run`] (decode). Runs may join and leave between ticks and
//! be at different steps of different schedules. A run gives the same latents stepped alone, in
//! any batch, or by [`StableDiffusionPipeline::generate`] (up to the float rounding of batched
//! matrix products): it is the same sequence of per-run operations.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::denoise::Guidance;
use super::params::{GenerateOutput, GenerateParams};
use super::StableDiffusionPipeline;
use crate::rng::Generators;
use crate::schedulers::Scheduler;
use crate::{Error, Result};

/// One run in progress: its scheduler state, generators and latents, with the text context and
/// guidance of its UNet calls. Made by [`StableDiffusionPipeline::start_run`] (or internally by
/// `generate`, which walks it to the end itself).
pub struct ActiveRun {
    pub(super) params: GenerateParams,
    pub(super) seeds: Vec<u64>,
    pub(super) scheduler: Box<dyn Scheduler>,
    pub(super) generators: Generators,
    /// f32, `[batch, C, h/8, w/8]`.
    pub(super) latents: Tensor,
    /// The UNet's text context: `[uncond..., cond...]` with guidance, `[cond...]` without.
    pub(super) context: Tensor,
    pub(super) guidance: Guidance,
    /// The timesteps this run walks: all of the scheduler's, or the tail `strength` leaves.
    pub(super) timesteps: Vec<f64>,
    /// Steps done: the next one is `timesteps[steps_done]`.
    pub(super) steps_done: usize,
    pub(super) text_encoder: Duration,
    /// Preparing the latents and the steps so far.
    pub(super) denoise: Duration,
    /// Why the run stopped, if a step of its own failed (a non-finite result, a scheduler
    /// error); [`StableDiffusionPipeline::complete_run`] returns it.
    pub(super) failure: Option<Error>,
}

/// What runs must share to be stepped in one UNet call: the latent size, the text context's
/// length (77 tokens, or more for A1111 prompts longer than one chunk) and the LoRA scale the
/// adapters run at. Prompts, seeds, schedulers, steps and guidance may all differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// `(height, width)` of the latents.
    pub latent_size: (usize, usize),
    pub context_tokens: usize,
    /// `f64::to_bits` of the run's LoRA scale (`None`: the default, 1).
    pub lora_scale_bits: Option<u64>,
}

impl std::fmt::Debug for ActiveRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveRun")
            .field("scheduler", &self.scheduler.class_name())
            .field("latents", &self.latents.dims())
            .field("steps_done", &self.steps_done)
            .field("total_steps", &self.timesteps.len())
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl ActiveRun {
    /// The arguments the run was started with (for its metadata).
    pub fn params(&self) -> &GenerateParams {
        &self.params
    }

    /// Which runs this one may share a UNet call with.
    pub fn batch_key(&self) -> Result<BatchKey> {
        let (_, _, height, width) = self.latents.dims4()?;
        Ok(BatchKey {
            latent_size: (height, width),
            context_tokens: self.context.dim(1)?,
            lora_scale_bits: self.params.lora_scale.map(f64::to_bits),
        })
    }

    /// Images of this run (rows of its latents).
    pub fn images(&self) -> usize {
        self.latents.dims()[0]
    }

    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    pub fn total_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The timestep of the next step, if any is left.
    pub fn next_timestep(&self) -> Option<f64> {
        self.timesteps.get(self.steps_done).copied()
    }

    /// No step is left to run: all are done, or one failed.
    pub fn is_finished(&self) -> bool {
        self.failure.is_some() || self.steps_done >= self.timesteps.len()
    }

    /// The latents after the steps so far (f32).
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// Steps the run with the UNet's (unguided) prediction for its latents at its next timestep:
    /// guidance, the scheduler's step, the finiteness check. A failure of this run alone is kept
    /// in the run (it finishes); `Err` only for a run that had no step left.
    fn advance(&mut self, pipe: &StableDiffusionPipeline, pred: Tensor) -> Result<()> {
        let Some(t) = self.next_timestep() else {
            return Err(Error::invalid("the run has no step left"));
        };
        let stepped = self.guidance.apply(pred).and_then(|noise_pred| {
            let latents =
                self.scheduler.step(&noise_pred, t, &self.latents, &mut self.generators)?;
            let step = self.steps_done + 1;
            pipe.check_step_finite(&latents, step, self.total_steps(), self.guidance.scale)?;
            Ok(latents)
        });
        match stepped {
            Ok(latents) => self.latents = latents,
            Err(e) => self.failure = Some(e),
        }
        self.steps_done += 1;
        Ok(())
    }
}

impl StableDiffusionPipeline {
    /// Starts a text-to-image or image-to-image run for [`Self::step_runs`]: checks the inputs,
    /// sets the timesteps, encodes the prompt and prepares the latents, as `generate` does before
    /// its first step. Inpainting runs only through `generate`.
    pub fn start_run(&self, params: &GenerateParams) -> Result<ActiveRun> {
        let _adapters = self.adapters.begin_run(params.lora_scale);
        match &params.init_image {
            None => self.prepare_text_to_image(params),
            Some(init) if init.mask.is_none() => self.prepare_image_to_image(params, init),
            Some(_) => Err(Error::invalid(
                "step-level batching runs text-to-image and image-to-image; run inpainting with \
                 generate",
            )),
        }
    }

    /// One denoising step of every run in `runs`, in as few UNet calls as the memory budget
    /// allows ([`Self::model_batch`] images each). The runs must share one [`BatchKey`] and have
    /// a step left. A step that fails for one run (non-finite latents, its scheduler) finishes
    /// that run with the error and leaves the others be; `Err` is what failed them all (the
    /// UNet) or a bad call.
    pub fn step_runs(&self, runs: &mut [&mut ActiveRun]) -> Result<()> {
        let Some(first) = runs.first() else {
            return Ok(());
        };
        let key = first.batch_key()?;
        for run in runs.iter() {
            if run.is_finished() {
                return Err(Error::invalid("step_runs got a run that has no step left"));
            }
            let other = run.batch_key()?;
            if other != key {
                return Err(Error::invalid(format!(
                    "runs stepped together must share a batch key: {key:?} and {other:?}"
                )));
            }
        }
        let _adapters = self.adapters.begin_run(first.params.lora_scale);
        let (h, w) = key.latent_size;
        let limit = self.model_batch((h * self.vae_scale_factor(), w * self.vae_scale_factor()));
        let mut start = 0;
        while start < runs.len() {
            // The longest stretch of runs that fits one call (at least one run).
            let mut end = start + 1;
            let mut images = runs[start].images();
            while end < runs.len() && images + runs[end].images() <= limit {
                images += runs[end].images();
                end += 1;
            }
            let started = Instant::now();
            let chunk = &mut runs[start..end];
            let preds = self.predict_noise_of_runs(chunk)?;
            for (run, pred) in chunk.iter_mut().zip(preds) {
                run.advance(self, pred)?;
            }
            let took = started.elapsed();
            for run in chunk.iter_mut() {
                run.denoise += took;
            }
            start = end;
        }
        Ok(())
    }

    /// Decodes a run's latents (unless it asked for latents only): its output, as `generate`
    /// returns it. A run may complete before its last step (diffusers' `interrupt`); one whose
    /// step failed returns that error.
    pub fn complete_run(&self, run: ActiveRun) -> Result<GenerateOutput> {
        if let Some(failure) = run.failure {
            return Err(failure);
        }
        self.finish_run(run.params.output, run.latents, run.seeds, run.text_encoder, run.denoise)
    }

    /// The unguided UNet predictions of `runs` at their next timesteps, one tensor per run (f32,
    /// `[uncond..., cond...]` rows with guidance): one call over all their rows, each row with its
    /// run's timestep and text context. A single run goes through `generate`'s own path.
    fn predict_noise_of_runs(&self, runs: &mut [&mut ActiveRun]) -> Result<Vec<Tensor>> {
        let mut inputs = Vec::with_capacity(runs.len());
        let mut timesteps = Vec::new();
        for run in runs.iter_mut() {
            let t = run.next_timestep().expect("checked by step_runs");
            let input =
                self.model_input(run.scheduler.as_mut(), &run.latents, t, run.guidance, None)?;
            timesteps.extend(std::iter::repeat_n(t, input.dim(0)?));
            inputs.push(input);
        }
        if let [run] = runs {
            let t = timesteps[0];
            let pred = self.unet_in_sub_batches(&inputs[0], t, &run.context, run.guidance)?;
            return Ok(vec![pred.to_dtype(DType::F32)?]);
        }
        let contexts: Vec<&Tensor> = runs.iter().map(|run| &run.context).collect();
        let pred = self.unet.forward_with_timesteps(
            &Tensor::cat(&inputs, 0)?,
            &timesteps,
            &Tensor::cat(&contexts, 0)?,
        )?;
        let pred = pred.to_dtype(DType::F32)?;
        let mut preds = Vec::with_capacity(runs.len());
        let mut row = 0;
        for input in &inputs {
            let rows = input.dim(0)?;
            preds.push(pred.narrow(0, row, rows)?);
            row += rows;
        }
        Ok(preds)
    }
}
