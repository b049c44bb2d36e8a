//! `DDIMScheduler` of diffusers 0.42 (Song et al., "Denoising Diffusion Implicit Models"):
//! deterministic with `eta = 0` (the default), adding `eta`-scaled noise from the run's
//! generators otherwise.

use candle_core::Tensor;

use super::common::{
    alpha_at, alpha_pred_original, div, int_timestep, mul, reject_flag, scheduler_config,
    ClassConfig, STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "DDIMScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `DDIMScheduler`, with its defaults.
    pub struct DDIMConfig for "DDIMScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
        /// Clip the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
        clip_sample: bool = true => bool,
        /// Use alpha = 1 after the last step (else the first training alpha).
        set_alpha_to_one: bool = true => bool,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
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
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
    }
}

impl ClassConfig for DDIMConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        r.check_among("beta_schedule", self.beta_schedule, STANDARD_BETAS)?;
        reject_flag(r, "thresholding", self.thresholding, "dynamic thresholding")?;
        Ok(self)
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
    state: SchedulerState<DDIMConfig>,
    final_alpha_cumprod: f32,
    /// The options passed to every [`step`](super::Scheduler::step) (`eta = 0` by default).
    pub options: DDIMStepOptions,
}

scheduler_api!(DDIMScheduler, DDIMConfig, ddim_config);

impl DDIMScheduler {
    /// `DDIMScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let state = Self::load_state(config)?;
        let final_alpha_cumprod = state.schedule.final_alpha_cumprod(state.config.set_alpha_to_one);
        Ok(Self { state, final_alpha_cumprod, options: DDIMStepOptions::default() })
    }
}

impl SchedulerClass for DDIMScheduler {
    scheduler_state!(CLASS, Parametrization::AlphasCumprod, state: DDIMConfig);

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
        let n = self.state.num_inference_steps.expect("checked before the step");
        let c = &self.state.config;
        let t = int_timestep(timestep, CLASS)?;
        let prev_t = t - (c.num_train_timesteps / n) as i64;
        let alphas_cumprod = &self.state.schedule.alphas_cumprod;
        let alpha_prod_t = alpha_at(alphas_cumprod, t, CLASS)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            alpha_at(alphas_cumprod, prev_t, CLASS)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let clip = c.clip_sample.then_some(c.clip_sample_range);
        let pred_original =
            alpha_pred_original(c.prediction_type, model_output, sample, alpha_prod_t, clip)?;
        // The noise that `x_0` implies: `(sample - sqrt(a) * x_0) / sqrt(1 - a)`.
        let epsilon_of =
            |x0: &Tensor| div(&(sample - mul(x0, alpha_prod_t.sqrt())?)?, beta_prod_t.sqrt());
        let pred_epsilon = if self.options.use_clipped_model_output {
            epsilon_of(&pred_original)?
        } else {
            match c.prediction_type {
                PredictionType::Epsilon => model_output.clone(),
                PredictionType::Sample => epsilon_of(model_output)?,
                PredictionType::VPrediction => {
                    (mul(model_output, alpha_prod_t.sqrt())? + mul(sample, beta_prod_t.sqrt())?)?
                }
            }
        };
        // _get_variance
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let eta = self.options.eta;
        let std_dev_t = eta as f32 * variance.sqrt();
        let direction =
            mul(&pred_epsilon, (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt())?;
        let mut prev = (mul(&pred_original, alpha_prod_t_prev.sqrt())? + direction)?;
        if eta > 0.0 {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            prev = (prev + mul(&noise, std_dev_t)?)?;
        }
        self.state.pred_original_sample = Some(pred_original);
        Ok(prev)
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
