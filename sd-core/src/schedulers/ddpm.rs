//! `DDPMScheduler` of diffusers 0.42 (Ho et al., "Denoising Diffusion Probabilistic Models"):
//! ancestral sampling with the posterior variance, noise drawn from the run's generators at every
//! step with `t > 0`.

use candle_core::Tensor;

use super::common::{
    alpha_at, alpha_pred_original, int_timestep, mul, reject_flag, scheduler_config, ClassConfig,
};
use super::config::{
    BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing, VarianceType,
};
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "DDPMScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `DDPMScheduler`, with its defaults (unlike the
    /// other classes, it accepts `beta_schedule: "sigmoid"`).
    pub struct DDPMConfig for "DDPMScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
        /// The variance of the added noise: `fixed_small` (the default), `fixed_small_log` or
        /// `fixed_large` (the learned variants need a model that predicts them).
        variance_type: VarianceType = VarianceType::FixedSmall => choice,
        /// Clip the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
        clip_sample: bool = true => bool,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// Dynamic thresholding is not supported: `true` is a config error.
        thresholding: bool = false => bool,
        /// Kept for config round trips (thresholding is not supported).
        dynamic_thresholding_ratio: f64 = 0.995 => f64,
        /// The bound of `clip_sample`.
        clip_sample_range: f64 = 1.0 => f64,
        /// Kept for config round trips (thresholding is not supported).
        sample_max_value: f64 = 1.0 => f64,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Leading => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
    }
}

impl ClassConfig for DDPMConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        reject_flag(r, "thresholding", self.thresholding, "dynamic thresholding")?;
        let variances =
            [VarianceType::FixedSmall, VarianceType::FixedSmallLog, VarianceType::FixedLarge];
        r.check_among("variance_type", self.variance_type, &variances)?;
        Ok(self)
    }
}

/// diffusers' `DDPMScheduler`: integer timesteps, `init_noise_sigma` 1, no input scaling; the
/// previous timestep of a step is the next one in the schedule.
#[derive(Debug, Clone)]
pub struct DDPMScheduler {
    state: SchedulerState<DDPMConfig>,
}

scheduler_api!(DDPMScheduler, DDPMConfig, typed_config);

impl DDPMScheduler {
    /// `DDPMScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let state = Self::load_state(config)?;
        Ok(Self { state })
    }

    /// `previous_timestep(t)`: the next timestep of the schedule, -1 after the last.
    fn previous_timestep(&self, t: i64) -> Result<i64> {
        if self.state.num_inference_steps.is_none() {
            return Ok(t - 1);
        }
        let timesteps = &self.state.timesteps;
        let i = timesteps.iter().position(|&s| s as i64 == t).ok_or_else(|| {
            Error::invalid(format!("timestep {t} is not in the {CLASS} schedule"))
        })?;
        Ok(timesteps.get(i + 1).map(|&s| s as i64).unwrap_or(-1))
    }
}

impl SchedulerClass for DDPMScheduler {
    scheduler_state!(CLASS, Parametrization::AlphasCumprod, state: DDPMConfig);

    const NEEDS_SET_TIMESTEPS: bool = false;

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.state.set_discrete_schedule(num_inference_steps);
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        let t = int_timestep(timestep, CLASS)?;
        let prev_t = self.previous_timestep(t)?;
        let ac = &self.state.schedule.alphas_cumprod;
        let alpha_prod_t = alpha_at(ac, t, CLASS)?;
        let alpha_prod_t_prev = if prev_t >= 0 { alpha_at(ac, prev_t, CLASS)? } else { 1.0 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let c = &self.state.config;
        let clip = c.clip_sample.then_some(c.clip_sample_range);
        let pred_original =
            alpha_pred_original(c.prediction_type, model_output, sample, alpha_prod_t, clip)?;
        let pred_original_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let current_sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev =
            (mul(&pred_original, pred_original_coeff)? + mul(sample, current_sample_coeff)?)?;
        if t > 0 {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            // _get_variance
            let variance =
                ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
            let scale = match c.variance_type {
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => current_beta_t.sqrt(),
                _ => variance.sqrt(),
            };
            prev = (prev + mul(&noise, scale)?)?;
        }
        self.state.pred_original_sample = Some(pred_original);
        Ok(prev)
    }
}
