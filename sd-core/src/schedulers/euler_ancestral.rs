//! `EulerAncestralDiscreteScheduler` of diffusers 0.42 ("Euler a"): Euler steps to `sigma_down`
//! plus fresh noise of scale `sigma_up` at every step, drawn from the run's generators.

use candle_core::Tensor;

use super::common::{
    euler_update, k_pred_original, mul, scheduler_config, ClassConfig, EPSILON_OR_V, STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::sigma_schedule::TrainSigmas;
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::Result;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `EulerAncestralDiscreteScheduler`, with its defaults.
    pub struct EulerAncestralDiscreteConfig for "EulerAncestralDiscreteScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
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

impl ClassConfig for EulerAncestralDiscreteConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        r.check_among("beta_schedule", self.beta_schedule, STANDARD_BETAS)?;
        r.check_among("prediction_type", self.prediction_type, EPSILON_OR_V)?;
        Ok(self)
    }
}

/// diffusers' `EulerAncestralDiscreteScheduler`: float32 timesteps and sigmas (with a final 0),
/// noise drawn with `randn_tensor(model_output.shape, generator=...)` at every step.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    state: SchedulerState<EulerAncestralDiscreteConfig>,
}

scheduler_api!(EulerAncestralDiscreteScheduler, EulerAncestralDiscreteConfig, typed_config);

impl EulerAncestralDiscreteScheduler {
    /// `EulerAncestralDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let state = Self::load_state(config)?;
        Ok(Self { state })
    }
}

impl SchedulerClass for EulerAncestralDiscreteScheduler {
    scheduler_state!(CLASS, Parametrization::KDiffusion, state: EulerAncestralDiscreteConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ts = self.state.k_timesteps(num_inference_steps);
        let train = TrainSigmas::new(&self.state.schedule);
        let mut sigmas: Vec<f32> = train.interpolate(&ts).into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        self.state.set_schedule(ts, sigmas, num_inference_steps);
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        let i = self.state.step_index(timestep)?;
        let sigma_to = self.state.sigma(i + 1)?;
        let sigma = self.state.sigmas[i];
        let prediction = self.state.config.prediction_type;
        let pred_original = k_pred_original(prediction, model_output, sample, sigma)?;
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let (prev, _) = euler_update(sample, &pred_original, sigma, sigma_down - sigma)?;
        let noise = generators.randn(model_output.dims(), model_output.device())?;
        let prev = (prev + mul(&noise, sigma_up)?)?;
        self.state.finish_step(i, Some(pred_original));
        Ok(prev)
    }
}
