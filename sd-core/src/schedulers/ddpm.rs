//! `DDPMScheduler` of diffusers 0.42 (Ho et al., "Denoising Diffusion Probabilistic Models"):
//! ancestral sampling with the posterior variance, noise drawn from the run's generators at every
//! step with `t > 0`.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    alpha_add_noise, alpha_at, check_choice, discrete_timesteps, int_timestep, reject_flag,
    scheduler_config, training_schedule,
};
use super::config::{
    BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing, VarianceType,
};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "DDPMScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `DDPMScheduler`, with its defaults.
    pub struct DDPMConfig {
        /// Number of diffusion steps the model was trained with.
        num_train_timesteps: usize = 1000 => usize,
        /// First training beta.
        beta_start: f64 = 0.0001 => f64,
        /// Last training beta.
        beta_end: f64 = 0.02 => f64,
        /// How the betas go from `beta_start` to `beta_end` (`sigmoid` is accepted here).
        beta_schedule: BetaSchedule = BetaSchedule::Linear => choice,
        /// Explicit betas, overriding `beta_start`/`beta_end`/`beta_schedule`.
        trained_betas: Option<Vec<f64>> = None => opt_f64_vec,
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

impl DDPMConfig {
    /// Reads the config with `DDPMScheduler.from_config(config)` semantics.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::read(&mut ConfigReader::new(config, CLASS))
    }

    fn read(r: &mut ConfigReader<'_>) -> Result<Self> {
        let c = Self::read_fields(r)?;
        reject_flag(r, "thresholding", c.thresholding, "dynamic thresholding")?;
        check_choice(
            r,
            CLASS,
            "variance_type",
            c.variance_type,
            &[VarianceType::FixedSmall, VarianceType::FixedSmallLog, VarianceType::FixedLarge],
        )?;
        Ok(c)
    }
}

/// diffusers' `DDPMScheduler`: integer timesteps, `init_noise_sigma` 1, no input scaling; the
/// previous timestep of a step is the next one in the schedule.
#[derive(Debug, Clone)]
pub struct DDPMScheduler {
    config: DDPMConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    pred_original_sample: Option<Tensor>,
}

impl DDPMScheduler {
    /// `DDPMScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = DDPMConfig::read(&mut r)?;
        let resolved = r.resolved(c.write());
        let schedule = training_schedule(
            CLASS,
            &resolved,
            c.beta_schedule,
            c.beta_start,
            c.beta_end,
            c.num_train_timesteps,
            c.trained_betas.as_deref(),
            c.rescale_betas_zero_snr,
        )?;
        let timesteps = (0..c.num_train_timesteps).rev().map(|t| t as f64).collect();
        Ok(Self {
            config: c,
            resolved,
            schedule,
            timesteps,
            num_inference_steps: None,
            pred_original_sample: None,
        })
    }

    /// `DDPMScheduler(**config)`.
    pub fn new(config: DDPMConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &DDPMConfig {
        &self.config
    }

    /// The training `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    /// `previous_timestep(t)`: the next timestep of the schedule, -1 after the last.
    fn previous_timestep(&self, t: i64) -> Result<i64> {
        if self.num_inference_steps.is_none() {
            return Ok(t - 1);
        }
        let i = self.timesteps.iter().position(|&s| s as i64 == t).ok_or_else(|| {
            Error::invalid(format!("timestep {t} is not in the {CLASS} schedule"))
        })?;
        Ok(self.timesteps.get(i + 1).map(|&s| s as i64).unwrap_or(-1))
    }
}

impl Scheduler for DDPMScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn config(&self) -> &SchedulerConfig {
        &self.resolved
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        check_steps(num_inference_steps, c.num_train_timesteps)?;
        let ts = discrete_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            num_inference_steps,
            c.steps_offset,
        );
        self.timesteps = ts.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = Some(num_inference_steps);
        self.pred_original_sample = None;
        Ok(())
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        to_f32(sample)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        same_shape(model_output, sample, "DDPMScheduler::step")?;
        let t = int_timestep(timestep, CLASS)?;
        let prev_t = self.previous_timestep(t)?;
        let ac = &self.schedule.alphas_cumprod;
        let alpha_prod_t = alpha_at(ac, t, CLASS)?;
        let alpha_prod_t_prev = if prev_t >= 0 { alpha_at(ac, prev_t, CLASS)? } else { 1.0 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let (sample, model_output) = (to_f32(sample)?, to_f32(model_output)?);
        let mut pred_original = match self.config.prediction_type {
            PredictionType::Epsilon => {
                div(&(&sample - mul(&model_output, beta_prod_t.sqrt())?)?, alpha_prod_t.sqrt())?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (mul(&sample, alpha_prod_t.sqrt())? - mul(&model_output, beta_prod_t.sqrt())?)?
            }
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            pred_original = pred_original.clamp(-r, r)?;
        }
        let pred_original_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let current_sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev =
            (mul(&pred_original, pred_original_coeff)? + mul(&sample, current_sample_coeff)?)?;
        if t > 0 {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            // _get_variance
            let variance =
                ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
            let scale = match self.config.variance_type {
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => current_beta_t.sqrt(),
                _ => variance.sqrt(),
            };
            prev = (prev + mul(&noise, scale)?)?;
        }
        self.pred_original_sample = Some(pred_original);
        Ok(prev)
    }

    fn pred_original_sample(&self) -> Option<&Tensor> {
        self.pred_original_sample.as_ref()
    }

    fn add_noise(
        &self,
        original_samples: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        same_shape(original_samples, noise, "DDPMScheduler::add_noise")?;
        let a = alpha_at(&self.schedule.alphas_cumprod, int_timestep(timestep, CLASS)?, CLASS)?;
        alpha_add_noise(original_samples, noise, a)
    }
}
