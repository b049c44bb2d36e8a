//! `LCMScheduler` of diffusers 0.42 (Luo et al., "Latent Consistency Models"): multistep
//! consistency sampling. Each step denoises with the consistency boundary condition, then (except
//! at the last step) re-noises to the next timestep with noise drawn from the run's generators.

use candle_core::Tensor;

use super::common::{
    alpha_at, alpha_pred_original, int_timestep, mul, reject_flag, scheduler_config, ClassConfig,
    STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::numeric::np_linspace;
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "LCMScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `LCMScheduler`, with its defaults.
    pub struct LCMConfig for "LCMScheduler" {
        num_train_timesteps = 1000, beta_start = 0.00085, beta_end = 0.012,
        beta_schedule = BetaSchedule::ScaledLinear;
        /// The number of steps of the distillation schedule the timesteps are picked from.
        original_inference_steps: usize = 50 => usize,
        /// Clip the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
        clip_sample: bool = false => bool,
        /// The bound of `clip_sample`.
        clip_sample_range: f64 = 1.0 => f64,
        /// Use alpha = 1 after the last step (else the first training alpha).
        set_alpha_to_one: bool = true => bool,
        /// Kept for config round trips (LCM's timesteps do not use it).
        steps_offset: i64 = 0 => i64,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        ..thresholding_keys,
        /// Kept for config round trips (LCM's timesteps do not use it).
        timestep_spacing: TimestepSpacing = TimestepSpacing::Leading => choice,
        /// Scales the timestep in the boundary-condition coefficients.
        timestep_scaling: f64 = 10.0 => f64,
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
    }
}

impl ClassConfig for LCMConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        let c = &self;
        r.check_among("beta_schedule", c.beta_schedule, STANDARD_BETAS)?;
        reject_flag(r, "thresholding", c.thresholding, "dynamic thresholding")?;
        if c.original_inference_steps == 0 || c.original_inference_steps > c.num_train_timesteps {
            return Err(r.error(
                "original_inference_steps",
                format!(
                    "must be between 1 and num_train_timesteps ({}), got {}",
                    c.num_train_timesteps, c.original_inference_steps
                ),
            ));
        }
        Ok(self)
    }
}

/// diffusers' `LCMScheduler`: integer timesteps picked from the `original_inference_steps`
/// distillation schedule, `init_noise_sigma` 1, no input scaling. Its
/// [`pred_original_sample`](super::Scheduler::pred_original_sample) is diffusers' `denoised`.
#[derive(Debug, Clone)]
pub struct LCMScheduler {
    state: SchedulerState<LCMConfig>,
    final_alpha_cumprod: f32,
}

scheduler_api!(LCMScheduler, LCMConfig, typed_config);

impl LCMScheduler {
    /// `LCMScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let state = Self::load_state(config)?;
        let final_alpha_cumprod = state.schedule.final_alpha_cumprod(state.config.set_alpha_to_one);
        Ok(Self { state, final_alpha_cumprod })
    }

    /// `get_scalings_for_boundary_condition_discrete(t)`: `(c_skip, c_out)` in float32.
    fn scalings(&self, t: i64) -> (f32, f32) {
        let sigma_data2 = 0.25f32; // 0.5 ** 2
        let scaled = t as f32 * self.state.config.timestep_scaling as f32;
        let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
        let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
        (c_skip, c_out)
    }
}

impl SchedulerClass for LCMScheduler {
    scheduler_state!(CLASS, Parametrization::AlphasCumprod, state: LCMConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.state.config;
        let n = num_inference_steps;
        let original_steps = c.original_inference_steps;
        if n > original_steps {
            return Err(Error::invalid(format!(
                "{CLASS}: num_inference_steps ({n}) cannot be larger than original_inference_steps ({original_steps})"
            )));
        }
        let k = (c.num_train_timesteps / original_steps) as i64;
        // lcm_origin_timesteps = [1..=original_steps] * k - 1, reversed.
        let origin: Vec<i64> = (1..=original_steps as i64).rev().map(|i| i * k - 1).collect();
        let indices = np_linspace(0.0, origin.len() as f64, n + 1);
        let timesteps = indices[..n].iter().map(|&x| origin[x.floor() as usize] as f64).collect();
        self.state.set_schedule(timesteps, vec![], n);
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        let n = self.state.num_inference_steps.expect("checked before the step");
        let t = int_timestep(timestep, CLASS)?;
        let i = self.state.step_index(timestep)?;
        let prev_t = self.state.timesteps.get(i + 1).map(|&p| p as i64).unwrap_or(t);
        let ac = &self.state.schedule.alphas_cumprod;
        let alpha_prod_t = alpha_at(ac, t, CLASS)?;
        let alpha_prod_t_prev =
            if prev_t >= 0 { alpha_at(ac, prev_t, CLASS)? } else { self.final_alpha_cumprod };
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let (c_skip, c_out) = self.scalings(t);
        let c = &self.state.config;
        let clip = c.clip_sample.then_some(c.clip_sample_range);
        let pred_original =
            alpha_pred_original(c.prediction_type, model_output, sample, alpha_prod_t, clip)?;
        let denoised = (mul(&pred_original, c_out)? + mul(sample, c_skip)?)?;
        let prev = if i + 1 != n {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            (mul(&denoised, alpha_prod_t_prev.sqrt())? + mul(&noise, beta_prod_t_prev.sqrt())?)?
        } else {
            denoised.clone()
        };
        self.state.finish_step(i, Some(denoised));
        Ok(prev)
    }
}
