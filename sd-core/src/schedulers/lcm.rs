//! `LCMScheduler` of diffusers 0.42 (Luo et al., "Latent Consistency Models"): multistep
//! consistency sampling. Each step denoises with the consistency boundary condition, then (except
//! at the last step) re-noises to the next timestep with noise drawn from the run's generators.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    alpha_add_noise, alpha_at, check_choice, int_timestep, reject_flag, scheduler_config,
    training_schedule, StepIndex, STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::numeric::np_linspace;
use super::{div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "LCMScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `LCMScheduler`, with its defaults.
    pub struct LCMConfig {
        /// Number of diffusion steps the model was trained with.
        num_train_timesteps: usize = 1000 => usize,
        /// First training beta.
        beta_start: f64 = 0.00085 => f64,
        /// Last training beta.
        beta_end: f64 = 0.012 => f64,
        /// How the betas go from `beta_start` to `beta_end`.
        beta_schedule: BetaSchedule = BetaSchedule::ScaledLinear => choice,
        /// Explicit betas, overriding `beta_start`/`beta_end`/`beta_schedule`.
        trained_betas: Option<Vec<f64>> = None => opt_f64_vec,
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
        /// Dynamic thresholding is not supported: `true` is a config error.
        thresholding: bool = false => bool,
        /// Kept for config round trips (thresholding is not supported).
        dynamic_thresholding_ratio: f64 = 0.995 => f64,
        /// Kept for config round trips (thresholding is not supported).
        sample_max_value: f64 = 1.0 => f64,
        /// Kept for config round trips (LCM's timesteps do not use it).
        timestep_spacing: TimestepSpacing = TimestepSpacing::Leading => choice,
        /// Scales the timestep in the boundary-condition coefficients.
        timestep_scaling: f64 = 10.0 => f64,
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
    }
}

impl LCMConfig {
    /// Reads the config with `LCMScheduler.from_config(config)` semantics.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::read(&mut ConfigReader::new(config, CLASS))
    }

    fn read(r: &mut ConfigReader<'_>) -> Result<Self> {
        let c = Self::read_fields(r)?;
        check_choice(r, CLASS, "beta_schedule", c.beta_schedule, STANDARD_BETAS)?;
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
        Ok(c)
    }
}

/// diffusers' `LCMScheduler`: integer timesteps picked from the `original_inference_steps`
/// distillation schedule, `init_noise_sigma` 1, no input scaling. Its
/// [`pred_original_sample`](Scheduler::pred_original_sample) is diffusers' `denoised`.
#[derive(Debug, Clone)]
pub struct LCMScheduler {
    config: LCMConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    index: StepIndex,
    denoised: Option<Tensor>,
}

impl LCMScheduler {
    /// `LCMScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = LCMConfig::read(&mut r)?;
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
        let final_alpha_cumprod = if c.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod[0] };
        let timesteps = (0..c.num_train_timesteps).rev().map(|t| t as f64).collect();
        Ok(Self {
            config: c,
            resolved,
            schedule,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
            index: StepIndex::default(),
            denoised: None,
        })
    }

    /// `LCMScheduler(**config)`.
    pub fn new(config: LCMConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &LCMConfig {
        &self.config
    }

    /// `get_scalings_for_boundary_condition_discrete(t)`: `(c_skip, c_out)` in float32.
    fn scalings(&self, t: i64) -> (f32, f32) {
        let sigma_data2 = 0.25f32; // 0.5 ** 2
        let scaled = t as f32 * self.config.timestep_scaling as f32;
        let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
        let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
        (c_skip, c_out)
    }
}

impl Scheduler for LCMScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn config(&self) -> &SchedulerConfig {
        &self.resolved
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let n = num_inference_steps;
        if n == 0 {
            return Err(Error::invalid("num_inference_steps must be at least 1"));
        }
        let original_steps = c.original_inference_steps;
        if n > c.num_train_timesteps {
            return Err(Error::invalid(format!(
                "num_inference_steps ({n}) cannot be larger than num_train_timesteps ({})",
                c.num_train_timesteps
            )));
        }
        if n > original_steps {
            return Err(Error::invalid(format!(
                "{CLASS}: num_inference_steps ({n}) cannot be larger than original_inference_steps ({original_steps})"
            )));
        }
        let k = (c.num_train_timesteps / original_steps) as i64;
        // lcm_origin_timesteps = [1..=original_steps] * k - 1, reversed.
        let origin: Vec<i64> = (1..=original_steps as i64).rev().map(|i| i * k - 1).collect();
        let indices = np_linspace(0.0, origin.len() as f64, n + 1);
        self.timesteps = indices[..n].iter().map(|&x| origin[x.floor() as usize] as f64).collect();
        self.num_inference_steps = Some(n);
        self.index.reset();
        self.denoised = None;
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
        same_shape(model_output, sample, "LCMScheduler::step")?;
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid(format!("{CLASS}: call set_timesteps before step")))?;
        let t = int_timestep(timestep, CLASS)?;
        let i = self.index.init(&self.timesteps, timestep, CLASS, false)?;
        let prev_t = self.timesteps.get(i + 1).map(|&p| p as i64).unwrap_or(t);
        let ac = &self.schedule.alphas_cumprod;
        let alpha_prod_t = alpha_at(ac, t, CLASS)?;
        let alpha_prod_t_prev =
            if prev_t >= 0 { alpha_at(ac, prev_t, CLASS)? } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let (c_skip, c_out) = self.scalings(t);
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
        let denoised = (mul(&pred_original, c_out)? + mul(&sample, c_skip)?)?;
        let prev = if i + 1 != n {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            (mul(&denoised, alpha_prod_t_prev.sqrt())? + mul(&noise, beta_prod_t_prev.sqrt())?)?
        } else {
            denoised.clone()
        };
        self.index.step = Some(i + 1);
        self.denoised = Some(denoised);
        Ok(prev)
    }

    fn pred_original_sample(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }

    fn add_noise(
        &self,
        original_samples: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        same_shape(original_samples, noise, "LCMScheduler::add_noise")?;
        let a = alpha_at(&self.schedule.alphas_cumprod, int_timestep(timestep, CLASS)?, CLASS)?;
        alpha_add_noise(original_samples, noise, a)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }
}
