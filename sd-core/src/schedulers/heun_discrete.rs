//! `HeunDiscreteScheduler` of diffusers 0.42: Heun's second-order method (Algorithm 2 of Karras
//! et al. 2022) on the k-diffusion sigmas. Every step but the last takes two model evaluations, so
//! the timesteps repeat (`[t0, t1, t1, t2, t2, ...]`), as in diffusers.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    check_choice, check_sigma_choice, k_init_noise_sigma, k_pred_original, k_scale, k_sigmas,
    k_timesteps, scheduler_config, sigma_at, train_sigmas, training_schedule, SigmaKind, StepIndex,
    STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "HeunDiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `HeunDiscreteScheduler`, with its defaults.
    pub struct HeunDiscreteConfig {
        /// Number of diffusion steps the model was trained with.
        num_train_timesteps: usize = 1000 => usize,
        /// First training beta.
        beta_start: f64 = 0.00085 => f64,
        /// Last training beta.
        beta_end: f64 = 0.012 => f64,
        /// How the betas go from `beta_start` to `beta_end`.
        beta_schedule: BetaSchedule = BetaSchedule::Linear => choice,
        /// Explicit betas, overriding `beta_start`/`beta_end`/`beta_schedule`.
        trained_betas: Option<Vec<f64>> = None => opt_f64_vec,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// Use the Karras et al. (2022) sigma schedule (rho = 7).
        use_karras_sigmas: bool = false => bool,
        /// Use exponentially spaced sigmas.
        use_exponential_sigmas: bool = false => bool,
        /// Beta sigmas need scipy's beta quantile function; not supported (an error if true).
        use_beta_sigmas: bool = false => bool,
        /// Clip the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
        clip_sample: bool = false => bool,
        /// The bound of `clip_sample`.
        clip_sample_range: f64 = 1.0 => f64,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
    }
}

impl HeunDiscreteConfig {
    /// Reads the config with `HeunDiscreteScheduler.from_config(config)` semantics.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::read(&mut ConfigReader::new(config, CLASS))
    }

    fn read(r: &mut ConfigReader<'_>) -> Result<Self> {
        let c = Self::read_fields(r)?;
        check_choice(r, CLASS, "beta_schedule", c.beta_schedule, STANDARD_BETAS)?;
        check_sigma_choice(r, c.use_karras_sigmas, c.use_exponential_sigmas, c.use_beta_sigmas)?;
        Ok(c)
    }
}

/// diffusers' `HeunDiscreteScheduler`: `2n - 1` float32 timesteps for `n` steps, `2n` sigmas.
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    config: HeunDiscreteConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    hidden_sigma_min: Option<f64>,
    hidden_sigma_max: Option<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
    index: StepIndex,
    /// First-order state between the two evaluations: derivative, dt and the sample.
    first: Option<(Tensor, f32, Tensor)>,
    pred_original_sample: Option<Tensor>,
}

impl HeunDiscreteScheduler {
    /// `HeunDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = HeunDiscreteConfig::read(&mut r)?;
        let (hidden_sigma_min, hidden_sigma_max) =
            (r.hidden_f64("sigma_min"), r.hidden_f64("sigma_max"));
        let resolved = r.resolved(c.write());
        let schedule = training_schedule(
            CLASS,
            &resolved,
            c.beta_schedule,
            c.beta_start,
            c.beta_end,
            c.num_train_timesteps,
            c.trained_betas.as_deref(),
            false,
        )?;
        let n = c.num_train_timesteps;
        let mut s = Self {
            config: c,
            resolved,
            schedule,
            hidden_sigma_min,
            hidden_sigma_max,
            timesteps: vec![],
            sigmas: vec![],
            num_inference_steps: None,
            index: StepIndex::default(),
            first: None,
            pred_original_sample: None,
        };
        s.set_timesteps(n)?;
        s.num_inference_steps = None;
        Ok(s)
    }

    /// `HeunDiscreteScheduler(**config)`.
    pub fn new(config: HeunDiscreteConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &HeunDiscreteConfig {
        &self.config
    }

    /// True between the two evaluations of a step (diffusers' `not state_in_first_order`).
    pub fn in_second_order(&self) -> bool {
        self.first.is_some()
    }
}

impl Scheduler for HeunDiscreteScheduler {
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
        let kind = SigmaKind::new(c.use_karras_sigmas, c.use_exponential_sigmas);
        let (sigmas, ts) = k_sigmas(
            kind,
            &ts,
            &train_sigmas(&self.schedule.alphas_cumprod),
            self.hidden_sigma_min,
            self.hidden_sigma_max,
        );
        let mut s32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        s32.push(0.0);
        let n = s32.len();
        let mut sigmas = vec![s32[0]];
        for &s in &s32[1..n - 1] {
            sigmas.extend([s, s]);
        }
        sigmas.push(s32[n - 1]);
        let t32: Vec<f64> = ts.iter().map(|&t| t as f32 as f64).collect();
        let mut timesteps = vec![t32[0]];
        for &t in &t32[1..] {
            timesteps.extend([t, t]);
        }
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.num_inference_steps = Some(num_inference_steps);
        self.first = None;
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
        _generators: &mut Generators,
    ) -> Result<Tensor> {
        same_shape(model_output, sample, "HeunDiscreteScheduler::step")?;
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        let i = self.index.init(&self.timesteps, timestep, CLASS, false)?;
        let first_order = self.first.is_none();
        let (sigma, sigma_next) = if first_order {
            (sigma_at(&self.sigmas, i, CLASS)?, sigma_at(&self.sigmas, i + 1, CLASS)?)
        } else {
            (self.sigmas[i - 1], self.sigmas[i])
        };
        let sigma_hat = sigma;
        let (sample, model_output) = (to_f32(sample)?, to_f32(model_output)?);
        let sigma_input = if first_order { sigma_hat } else { sigma_next };
        let mut pred_original =
            k_pred_original(self.config.prediction_type, &model_output, &sample, sigma_input)?;
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            pred_original = pred_original.clamp(-r, r)?;
        }
        let prev = if first_order {
            let derivative = div(&(&sample - &pred_original)?, sigma_hat)?;
            let dt = sigma_next - sigma_hat;
            let prev = (&sample + mul(&derivative, dt)?)?;
            self.first = Some((derivative, dt, sample));
            prev
        } else {
            let derivative = div(&(&sample - &pred_original)?, sigma_next)?;
            let (prev_derivative, dt, first_sample) =
                self.first.take().expect("second-order state");
            let derivative = div(&(prev_derivative + derivative)?, 2.0)?;
            (&first_sample + mul(&derivative, dt)?)?
        };
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
        same_shape(original_samples, noise, "HeunDiscreteScheduler::add_noise")?;
        let i = self.index.for_add_noise(&self.timesteps, timestep, CLASS, false)?;
        let sigma = sigma_at(&self.sigmas, i, CLASS)?;
        Ok((to_f32(original_samples)? + mul(&to_f32(noise)?, sigma)?)?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }

    fn order(&self) -> usize {
        2
    }
}
