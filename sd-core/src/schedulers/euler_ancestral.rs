//! `EulerAncestralDiscreteScheduler` of diffusers 0.42 ("Euler a"): Euler steps to `sigma_down`
//! plus fresh noise of scale `sigma_up` at every step, drawn from the run's generators.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    check_choice, interp_sigmas, k_init_noise_sigma, k_pred_original, k_scale, k_timesteps,
    scheduler_config, sigma_at, train_sigmas, training_schedule, StepIndex, STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::numeric::np_linspace;
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `EulerAncestralDiscreteScheduler`, with its defaults.
    pub struct EulerAncestralDiscreteConfig {
        /// Number of diffusion steps the model was trained with.
        num_train_timesteps: usize = 1000 => usize,
        /// First training beta.
        beta_start: f64 = 0.0001 => f64,
        /// Last training beta.
        beta_end: f64 = 0.02 => f64,
        /// How the betas go from `beta_start` to `beta_end`.
        beta_schedule: BetaSchedule = BetaSchedule::Linear => choice,
        /// Explicit betas, overriding `beta_start`/`beta_end`/`beta_schedule`.
        trained_betas: Option<Vec<f64>> = None => opt_f64_vec,
        /// What the model predicts (`epsilon` or `v_prediction`; `sample` is not implemented in
        /// diffusers either).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
    }
}

impl EulerAncestralDiscreteConfig {
    /// Reads the config with `EulerAncestralDiscreteScheduler.from_config(config)` semantics.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::read(&mut ConfigReader::new(config, CLASS))
    }

    fn read(r: &mut ConfigReader<'_>) -> Result<Self> {
        let c = Self::read_fields(r)?;
        check_choice(r, CLASS, "beta_schedule", c.beta_schedule, STANDARD_BETAS)?;
        check_choice(
            r,
            CLASS,
            "prediction_type",
            c.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
        )?;
        Ok(c)
    }
}

/// diffusers' `EulerAncestralDiscreteScheduler`: float32 timesteps and sigmas (with a final 0),
/// noise drawn with `randn_tensor(model_output.shape, generator=...)` at every step.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralDiscreteConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
    index: StepIndex,
    pred_original_sample: Option<Tensor>,
}

impl EulerAncestralDiscreteScheduler {
    /// `EulerAncestralDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = EulerAncestralDiscreteConfig::read(&mut r)?;
        let resolved = r.resolved(c.write());
        let mut schedule = training_schedule(
            CLASS,
            &resolved,
            c.beta_schedule,
            c.beta_start,
            c.beta_end,
            c.num_train_timesteps,
            c.trained_betas.as_deref(),
            c.rescale_betas_zero_snr,
        )?;
        if c.rescale_betas_zero_snr {
            if let Some(last) = schedule.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let n = c.num_train_timesteps;
        let mut sigmas = train_sigmas(&schedule.alphas_cumprod);
        sigmas.reverse();
        sigmas.push(0.0);
        let timesteps = np_linspace(0.0, (n - 1) as f64, n).into_iter().rev().collect();
        Ok(Self {
            config: c,
            resolved,
            schedule,
            timesteps,
            sigmas,
            num_inference_steps: None,
            index: StepIndex::default(),
            pred_original_sample: None,
        })
    }

    /// `EulerAncestralDiscreteScheduler(**config)`.
    pub fn new(config: EulerAncestralDiscreteConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &EulerAncestralDiscreteConfig {
        &self.config
    }

    /// The training `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn config(&self) -> &SchedulerConfig {
        &self.resolved
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        check_steps(num_inference_steps, c.num_train_timesteps)?;
        let ts = k_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            num_inference_steps,
            c.steps_offset,
        );
        let ts64: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
        let mut sigmas: Vec<f32> =
            interp_sigmas(&ts64, &train_sigmas(&self.schedule.alphas_cumprod))
                .into_iter()
                .map(|s| s as f32)
                .collect();
        sigmas.push(0.0);
        self.timesteps = ts64;
        self.sigmas = sigmas;
        self.num_inference_steps = Some(num_inference_steps);
        self.index.reset();
        self.pred_original_sample = None;
        Ok(())
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| s as f64).collect())
    }

    fn init_noise_sigma(&self) -> f64 {
        k_init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.index.init(&self.timesteps, timestep, CLASS, false)?;
        k_scale(sample, sigma_at(&self.sigmas, i, CLASS)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        same_shape(model_output, sample, "EulerAncestralDiscreteScheduler::step")?;
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        let i = self.index.init(&self.timesteps, timestep, CLASS, false)?;
        let sigma_to = sigma_at(&self.sigmas, i + 1, CLASS)?;
        let sigma = self.sigmas[i];
        let sample = to_f32(sample)?;
        let model_output = to_f32(model_output)?;
        let pred_original =
            k_pred_original(self.config.prediction_type, &model_output, &sample, sigma)?;
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&sample - &pred_original)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev = (&sample + mul(&derivative, dt)?)?;
        let noise = generators.randn(model_output.dims(), model_output.device())?;
        let prev = (prev + mul(&noise, sigma_up)?)?;
        self.index.step = Some(i + 1);
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
        same_shape(original_samples, noise, "EulerAncestralDiscreteScheduler::add_noise")?;
        let i = self.index.for_add_noise(&self.timesteps, timestep, CLASS, false)?;
        let sigma = sigma_at(&self.sigmas, i, CLASS)?;
        Ok((to_f32(original_samples)? + mul(&to_f32(noise)?, sigma)?)?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }
}
