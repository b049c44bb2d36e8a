//! `HeunDiscreteScheduler` of diffusers 0.42: Heun's second-order method (Algorithm 2 of Karras
//! et al. 2022) on the k-diffusion sigmas. Every step but the last takes two model evaluations, so
//! the timesteps repeat (`[t0, t1, t1, t2, t2, ...]`), as in diffusers.

use candle_core::Tensor;

use super::common::{
    check_sigma_config, div, euler_update, k_pred_original, mul, scheduler_config, ClassConfig,
};
use super::config::{
    BetaSchedule, ConfigReader, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::sigma_schedule::{SigmaSpacing, TrainSigmas};
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::Result;

const CLASS: &str = "HeunDiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `HeunDiscreteScheduler`, with its defaults.
    pub struct HeunDiscreteConfig for "HeunDiscreteScheduler" {
        num_train_timesteps = 1000, beta_start = 0.00085, beta_end = 0.012,
        beta_schedule = BetaSchedule::Linear;
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        ..sigma_schedule_flags,
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

impl ClassConfig for HeunDiscreteConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        check_sigma_config!(r, &self);
        Ok(self)
    }
}

/// diffusers' `HeunDiscreteScheduler`: `2n - 1` float32 timesteps for `n` steps, `2n` sigmas.
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    state: SchedulerState<HeunDiscreteConfig>,
    /// First-order state between the two evaluations: derivative, dt and the sample.
    first: Option<(Tensor, f32, Tensor)>,
}

scheduler_api!(HeunDiscreteScheduler, HeunDiscreteConfig, typed_config);

impl HeunDiscreteScheduler {
    /// `HeunDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let state = Self::load_state(config)?;
        Self { state, first: None }.with_training_timesteps()
    }

    /// True between the two evaluations of a step (diffusers' `not state_in_first_order`).
    pub fn in_second_order(&self) -> bool {
        self.first.is_some()
    }
}

impl SchedulerClass for HeunDiscreteScheduler {
    scheduler_state!(CLASS, Parametrization::KDiffusion, state: HeunDiscreteConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.state.config;
        let n = num_inference_steps;
        let train = TrainSigmas::new(&self.state.schedule);
        let spacing = SigmaSpacing::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        let linear = InterpolationType::Linear;
        let (sigmas, ts) =
            train.k_schedule(self.state.k_timesteps(n), linear, spacing, self.state.sigma_range);
        // Every sigma and timestep but the first (and the final sigma 0) repeated.
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        let mut timesteps = vec![ts[0] as f32 as f64];
        for &t in &ts[1..] {
            timesteps.extend([t as f32 as f64; 2]);
        }
        let (first, last) = (sigmas[0], sigmas[sigmas.len() - 1]);
        let mut repeated = vec![first];
        for &s in &sigmas[1..sigmas.len() - 1] {
            repeated.extend([s, s]);
        }
        repeated.push(last);
        self.state.set_schedule(timesteps, repeated, n);
        self.first = None;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _generators: &mut Generators,
    ) -> Result<Tensor> {
        let i = self.state.step_index(timestep)?;
        let first_order = self.first.is_none();
        let (sigma, sigma_next) = if first_order {
            (self.state.sigma(i)?, self.state.sigma(i + 1)?)
        } else {
            (self.state.sigmas[i - 1], self.state.sigmas[i])
        };
        let c = &self.state.config;
        let sigma_input = if first_order { sigma } else { sigma_next };
        let mut pred_original =
            k_pred_original(c.prediction_type, model_output, sample, sigma_input)?;
        if c.clip_sample {
            let r = c.clip_sample_range as f32;
            pred_original = pred_original.clamp(-r, r)?;
        }
        let prev = if first_order {
            let dt = sigma_next - sigma;
            let (prev, derivative) = euler_update(sample, &pred_original, sigma, dt)?;
            self.first = Some((derivative, dt, sample.clone()));
            prev
        } else {
            let derivative = div(&(sample - &pred_original)?, sigma_next)?;
            let (prev_derivative, dt, first_sample) =
                self.first.take().expect("second-order state");
            let derivative = div(&(prev_derivative + derivative)?, 2.0)?;
            (&first_sample + mul(&derivative, dt)?)?
        };
        self.state.finish_step(i, Some(pred_original));
        Ok(prev)
    }

    fn order(&self) -> usize {
        2
    }
}
