//! `DDIMScheduler` of diffusers 0.42 (Song et al., "Denoising Diffusion Implicit Models"):
//! deterministic with `eta = 0` (the default), adding `eta`-scaled noise from the run's
//! generators otherwise.

use candle_core::Tensor;
use serde_json::Map;

use super::betas::TrainingSchedule;
use super::config::{
    BetaSchedule, ConfigReader, ConfigWriter, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::numeric::{np_arange, np_linspace, np_round};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "DDIMScheduler";

/// The `__init__` arguments of diffusers' `DDIMScheduler`, with its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DDIMConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First training beta.
    pub beta_start: f64,
    /// Last training beta.
    pub beta_end: f64,
    /// How the betas go from `beta_start` to `beta_end`.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding `beta_start`/`beta_end`/`beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// Clip the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// Use alpha = 1 after the last step (else the first training alpha).
    pub set_alpha_to_one: bool,
    /// Added to the timesteps with `leading` spacing (SD uses 1).
    pub steps_offset: i64,
    /// What the model predicts (noise, `v`, or the sample).
    pub prediction_type: PredictionType,
    /// Dynamic thresholding is not supported: `true` is a config error.
    pub thresholding: bool,
    /// Kept for config round trips (thresholding is not supported).
    pub dynamic_thresholding_ratio: f64,
    /// The bound of `clip_sample`.
    pub clip_sample_range: f64,
    /// Kept for config round trips (thresholding is not supported).
    pub sample_max_value: f64,
    /// How inference timesteps are picked from the training ones.
    pub timestep_spacing: TimestepSpacing,
    /// Rescale betas to a zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DDIMConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DDIMConfig {
    /// Reads the config with `DDIMScheduler.from_config(config)` semantics.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::read(&mut ConfigReader::new(config, CLASS))
    }

    fn read(r: &mut ConfigReader<'_>) -> Result<Self> {
        let d = Self::default();
        let c = Self {
            num_train_timesteps: r.usize("num_train_timesteps", d.num_train_timesteps)?,
            beta_start: r.f64("beta_start", d.beta_start)?,
            beta_end: r.f64("beta_end", d.beta_end)?,
            beta_schedule: r.choice_among(
                "beta_schedule",
                d.beta_schedule,
                &[BetaSchedule::Linear, BetaSchedule::ScaledLinear, BetaSchedule::SquaredcosCapV2],
            )?,
            trained_betas: r.opt_f64_vec("trained_betas")?,
            clip_sample: r.bool("clip_sample", d.clip_sample)?,
            set_alpha_to_one: r.bool("set_alpha_to_one", d.set_alpha_to_one)?,
            steps_offset: r.i64("steps_offset", d.steps_offset)?,
            prediction_type: r.choice("prediction_type", d.prediction_type)?,
            thresholding: r.bool("thresholding", d.thresholding)?,
            dynamic_thresholding_ratio: r
                .f64("dynamic_thresholding_ratio", d.dynamic_thresholding_ratio)?,
            clip_sample_range: r.f64("clip_sample_range", d.clip_sample_range)?,
            sample_max_value: r.f64("sample_max_value", d.sample_max_value)?,
            timestep_spacing: r.choice("timestep_spacing", d.timestep_spacing)?,
            rescale_betas_zero_snr: r.bool("rescale_betas_zero_snr", d.rescale_betas_zero_snr)?,
        };
        if c.thresholding {
            return Err(
                r.error("thresholding", "dynamic thresholding is not supported; set it to false")
            );
        }
        Ok(c)
    }

    fn write(&self) -> Map<String, serde_json::Value> {
        let mut w = ConfigWriter::default();
        w.set("num_train_timesteps", self.num_train_timesteps)
            .set("beta_start", self.beta_start)
            .set("beta_end", self.beta_end)
            .choice("beta_schedule", self.beta_schedule)
            .opt_f64_vec("trained_betas", self.trained_betas.as_deref())
            .set("clip_sample", self.clip_sample)
            .set("set_alpha_to_one", self.set_alpha_to_one)
            .set("steps_offset", self.steps_offset)
            .choice("prediction_type", self.prediction_type)
            .set("thresholding", self.thresholding)
            .set("dynamic_thresholding_ratio", self.dynamic_thresholding_ratio)
            .set("clip_sample_range", self.clip_sample_range)
            .set("sample_max_value", self.sample_max_value)
            .choice("timestep_spacing", self.timestep_spacing)
            .set("rescale_betas_zero_snr", self.rescale_betas_zero_snr);
        w.0
    }
}

/// The keyword arguments of `DDIMScheduler.step()`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DDIMStepOptions {
    /// Weight of the noise added at each step: 0 is DDIM (deterministic), 1 is DDPM-like.
    pub eta: f64,
    /// Recompute the noise prediction from the clipped `x_0` (only matters with `clip_sample`).
    pub use_clipped_model_output: bool,
}

/// diffusers' `DDIMScheduler`. Timesteps are integers; `init_noise_sigma` is 1.
#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    config: DDIMConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    pred_original_sample: Option<Tensor>,
    /// The options passed to every [`step`](Scheduler::step) (`eta = 0` by default).
    pub options: DDIMStepOptions,
}

impl DDIMScheduler {
    /// `DDIMScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = DDIMConfig::read(&mut r)?;
        let resolved = r.resolved(c.write());
        let schedule = TrainingSchedule::new(
            c.beta_schedule,
            c.beta_start,
            c.beta_end,
            c.num_train_timesteps,
            c.trained_betas.as_deref(),
            c.rescale_betas_zero_snr,
        )
        .map_err(|e| {
            Error::config(
                resolved.source().unwrap_or(std::path::Path::new("<scheduler config>")),
                format!("{CLASS}: {e}"),
            )
        })?;
        let final_alpha_cumprod = if c.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod[0] };
        let timesteps = (0..c.num_train_timesteps).rev().map(|t| t as f64).collect();
        Ok(Self {
            config: c,
            resolved,
            schedule,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
            pred_original_sample: None,
            options: DDIMStepOptions::default(),
        })
    }

    /// `DDIMScheduler(**config)`.
    pub fn new(config: DDIMConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn ddim_config(&self) -> &DDIMConfig {
        &self.config
    }

    /// The training `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.schedule.alphas_cumprod.get(i).copied())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{CLASS}: timestep {t} is outside 0..{}",
                    self.config.num_train_timesteps
                ))
            })
    }

    fn int_timestep(timestep: f64) -> Result<i64> {
        if timestep.fract() != 0.0 || !timestep.is_finite() {
            return Err(Error::invalid(format!("{CLASS} takes integer timesteps, got {timestep}")));
        }
        Ok(timestep as i64)
    }
}

impl Scheduler for DDIMScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn config(&self) -> &SchedulerConfig {
        &self.resolved
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let n_train = c.num_train_timesteps;
        check_steps(num_inference_steps, n_train)?;
        let n = num_inference_steps;
        let timesteps: Vec<i64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| np_round(t) as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n_train / n;
                (0..n).rev().map(|i| (i * ratio) as i64 + c.steps_offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / n as f64;
                np_arange(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| np_round(t) as i64 - 1)
                    .collect()
            }
        };
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = Some(n);
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
        same_shape(model_output, sample, "DDIMScheduler::step")?;
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid(format!("{CLASS}: call set_timesteps before step")))?;
        let t = Self::int_timestep(timestep)?;
        let prev_t = t - (self.config.num_train_timesteps / n) as i64;
        let alpha_prod_t = self.alpha_at(t)?;
        let alpha_prod_t_prev =
            if prev_t >= 0 { self.alpha_at(prev_t)? } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let sample = to_f32(sample)?;
        let model_output = to_f32(model_output)?;

        let (mut pred_original, mut pred_epsilon) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div(
                    &(&sample - mul(&model_output, beta_prod_t.sqrt())?)?,
                    alpha_prod_t.sqrt(),
                )?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = div(
                    &(&sample - mul(&model_output, alpha_prod_t.sqrt())?)?,
                    beta_prod_t.sqrt(),
                )?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 =
                    (mul(&sample, alpha_prod_t.sqrt())? - mul(&model_output, beta_prod_t.sqrt())?)?;
                let eps =
                    (mul(&model_output, alpha_prod_t.sqrt())? + mul(&sample, beta_prod_t.sqrt())?)?;
                (x0, eps)
            }
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            pred_original = pred_original.clamp(-r, r)?;
        }
        // _get_variance
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let eta = self.options.eta;
        let std_dev_t = eta as f32 * variance.sqrt();
        if self.options.use_clipped_model_output {
            pred_epsilon =
                div(&(&sample - mul(&pred_original, alpha_prod_t.sqrt())?)?, beta_prod_t.sqrt())?;
        }
        let direction =
            mul(&pred_epsilon, (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt())?;
        let mut prev = (mul(&pred_original, alpha_prod_t_prev.sqrt())? + direction)?;
        if eta > 0.0 {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            prev = (prev + mul(&noise, std_dev_t)?)?;
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
        same_shape(original_samples, noise, "DDIMScheduler::add_noise")?;
        let a = self.alpha_at(Self::int_timestep(timestep)?)?;
        Ok((mul(&to_f32(original_samples)?, a.sqrt())? + mul(&to_f32(noise)?, (1.0 - a).sqrt())?)?)
    }

    fn set_step_option(&mut self, name: &str, value: f64) -> Result<()> {
        match name {
            "eta" => {
                if value.is_nan() || value < 0.0 {
                    return Err(Error::invalid(format!("{CLASS}: eta must be >= 0, got {value}")));
                }
                self.options.eta = value
            }
            "use_clipped_model_output" => self.options.use_clipped_model_output = value != 0.0,
            _ => {
                return Err(Error::invalid(format!(
                    "{CLASS} has no step option `{name}`; valid: eta, use_clipped_model_output"
                )))
            }
        }
        Ok(())
    }
}
