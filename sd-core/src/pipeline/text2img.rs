//! The text-to-image run, step by step as diffusers' `StableDiffusionPipeline.__call__`, and
//! the steps the edit pipelines share with it.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::denoise::{DenoiseLoop, Guidance};
use super::hooks::RunHooks;
use super::params::{GenerateOutput, GenerateParams, OutputType, StageTimings};
use super::step_batch::ActiveRun;
use super::validate::RunPlan;
use super::StableDiffusionPipeline;
use crate::prompt::PromptSyntax;
use crate::rng::Generators;
use crate::schedulers::Scheduler;
use crate::{Error, Result};

impl StableDiffusionPipeline {
    pub fn generate(&self, params: &GenerateParams) -> Result<GenerateOutput> {
        self.generate_with(params, RunHooks::default())
    }

    /// A run with per-run hooks (progress, replacing the latents, cancelling): text-to-image, or
    /// with [`GenerateParams::init_image`] image-to-image (`img2img.rs`) or inpainting when it
    /// has a mask (`inpaint.rs`).
    pub fn generate_with(
        &self,
        params: &GenerateParams,
        hooks: RunHooks<'_>,
    ) -> Result<GenerateOutput> {
        let _adapters = self.adapters.begin_run(params.lora_scale);
        match &params.init_image {
            None => self.text_to_image(params, hooks),
            Some(init) if init.mask.is_some() => self.inpaint(params, init, hooks),
            Some(init) => self.image_to_image(params, init, hooks),
        }
    }

    /// diffusers' `StableDiffusionPipeline.__call__`.
    fn text_to_image(
        &self,
        params: &GenerateParams,
        hooks: RunHooks<'_>,
    ) -> Result<GenerateOutput> {
        // 1.-4. Check inputs, prepare timesteps, encode the prompt, prepare latents
        let run = self.prepare_text_to_image(params)?;
        // 5. Denoising loop; 6. decode and postprocess
        self.run_to_end(run, hooks)
    }

    /// The steps of a text-to-image run before its denoising loop.
    pub(super) fn prepare_text_to_image(&self, params: &GenerateParams) -> Result<ActiveRun> {
        // 1. Check inputs
        let plan = self.check_inputs(params)?;
        let guidance = Guidance::of(params);

        // 2. Prepare timesteps (before the slow steps, so that a scheduler error comes first)
        let scheduler = self.prepare_scheduler(params)?;
        let timesteps = scheduler.timesteps().to_vec();
        let mut generators = Generators::from_seeds(&plan.seeds, plan.batch)?;

        // 3. Encode the prompt
        let started = Instant::now();
        let context = self.encode_prompt(params, &plan, guidance)?;
        let text_encoder = started.elapsed();

        // 4. Prepare latents
        let started = Instant::now();
        let latents = self.prepare_latents(
            params.latents.as_ref(),
            &plan.latents_shape,
            scheduler.as_ref(),
            &mut generators,
        )?;
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

    /// A prepared text-to-image or image-to-image run walked to its end: the denoising loop with
    /// `hooks`, then decoding and postprocessing.
    pub(super) fn run_to_end(
        &self,
        run: ActiveRun,
        mut hooks: RunHooks<'_>,
    ) -> Result<GenerateOutput> {
        let ActiveRun {
            params,
            seeds,
            mut scheduler,
            mut generators,
            latents,
            context,
            guidance,
            timesteps,
            text_encoder,
            denoise,
            ..
        } = run;
        let started = Instant::now();
        let loop_ = DenoiseLoop::new(&context, guidance, &timesteps);
        let latents =
            self.denoise(scheduler.as_mut(), &mut generators, latents, loop_, &mut hooks)?;
        let denoise = denoise + started.elapsed();
        self.finish_run(params.output, latents, seeds, text_encoder, denoise)
    }

    /// The last step of every run: decodes and postprocesses the latents unless only they are
    /// asked for.
    pub(super) fn finish_run(
        &self,
        output: OutputType,
        latents: Tensor,
        seeds: Vec<u64>,
        text_encoder: Duration,
        denoise: Duration,
    ) -> Result<GenerateOutput> {
        let started = Instant::now();
        let images = match output {
            OutputType::Latent => vec![],
            OutputType::Image => self.decode_to_images(&latents)?,
        };
        let timings = StageTimings { text_encoder, denoise, vae_decode: started.elapsed() };
        Ok(GenerateOutput { images, latents, seeds, timings })
    }

    /// The run's scheduler with its timesteps set (diffusers' `retrieve_timesteps`) and its step
    /// options (diffusers' `prepare_extra_step_kwargs`: `eta`).
    pub(super) fn prepare_scheduler(&self, params: &GenerateParams) -> Result<Box<dyn Scheduler>> {
        let mut scheduler =
            self.scheduler(params.scheduler.as_deref(), params.scheduler_config.as_ref())?;
        scheduler.set_timesteps(params.num_inference_steps)?;
        if params.eta != 0.0 {
            scheduler.set_step_option("eta", params.eta)?;
        }
        Ok(scheduler)
    }

    /// diffusers' `encode_prompt` and the guidance batch after it: the UNet's text context,
    /// `[uncond..., cond...]` with guidance, each prompt repeated per image (prompt-major).
    /// Given embeddings are used as they are; prompts are encoded by
    /// [`Self::encode_prompts_with`] (A1111 syntax: prompts and negative prompts together, so
    /// that both get the same number of chunks).
    pub(super) fn encode_prompt(
        &self,
        params: &GenerateParams,
        plan: &RunPlan,
        guidance: Guidance,
    ) -> Result<Tensor> {
        let repeat = |embeds: Tensor| -> Result<Tensor> {
            let (n, seq, d) = embeds.dims3()?;
            let k = params.num_images_per_prompt;
            Ok(embeds.unsqueeze(1)?.repeat((1, k, 1, 1))?.reshape((n * k, seq, d))?)
        };
        let given =
            |embeds: &Tensor| embeds.to_dtype(self.activation_dtype())?.to_device(self.device());
        let encode = |texts: &[String], what: &str| {
            let embeds = self.encode_prompts_with(texts, params.prompt_syntax, params.clip_skip)?;
            self.checked_text_embeddings(embeds, what)
        };
        let negatives = || match &params.negative_prompts {
            None => vec![String::new(); plan.prompts],
            Some(n) if n.len() == 1 => vec![n[0].clone(); plan.prompts],
            Some(n) => n.clone(),
        };
        let (uncond, cond) = match (&params.negative_prompt_embeds, &params.prompt_embeds) {
            (None, None)
                if guidance.is_enabled() && params.prompt_syntax == PromptSyntax::A1111 =>
            {
                let both = encode(&[negatives(), params.prompts.clone()].concat(), "prompts")?;
                let n = plan.prompts;
                (Some(both.narrow(0, 0, n)?), both.narrow(0, n, n)?)
            }
            (negative_embeds, prompt_embeds) => {
                let cond = match prompt_embeds {
                    Some(embeds) => given(embeds)?,
                    None => encode(&params.prompts, "prompts")?,
                };
                let uncond = match negative_embeds {
                    _ if !guidance.is_enabled() => None,
                    Some(embeds) => Some(given(embeds)?),
                    None => Some(encode(&negatives(), "negative prompts")?),
                };
                (uncond, cond)
            }
        };
        let Some(uncond) = uncond else {
            return repeat(cond);
        };
        if uncond.dims() != cond.dims() {
            return Err(Error::invalid(format!(
                "the prompts encode to {:?} and the negative prompts to {:?}; they must match",
                cond.dims(),
                uncond.dims()
            )));
        }
        Ok(Tensor::cat(&[repeat(uncond)?, repeat(cond)?], 0)?)
    }

    /// diffusers' `prepare_latents`: the given latents, or noise drawn from the run's generators,
    /// scaled by the scheduler's `init_noise_sigma`; f32.
    fn prepare_latents(
        &self,
        given: Option<&Tensor>,
        shape: &[usize],
        scheduler: &dyn Scheduler,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        let noise = match given {
            Some(given) => given.to_dtype(DType::F32)?.to_device(self.device())?,
            None => generators.randn(shape, self.device())?,
        };
        Ok((noise * scheduler.init_noise_sigma())?)
    }
}
