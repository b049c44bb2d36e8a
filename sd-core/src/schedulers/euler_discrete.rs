//! `EulerDiscreteScheduler` of diffusers 0.42: Euler steps on the k-diffusion sigma schedule
//! (Algorithm 2 of Karras et al. 2022), optionally with churn noise, Karras or exponential sigmas.

use candle_core::Tensor;

use super::common::{
    check_sigma_config, euler_update, k_pred_original, mul, scheduler_config, ClassConfig,
};
use super::config::{
    BetaSchedule, ConfigReader, FinalSigmasType, InterpolationType, PredictionType,
    SchedulerConfig, TimestepSpacing, TimestepType,
};
use super::sigma_schedule::{SigmaSpacing, TrainSigmas};
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState, SigmaRange,
};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "EulerDiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `EulerDiscreteScheduler`, with its defaults.
    pub struct EulerDiscreteConfig for "EulerDiscreteScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// How sigmas are interpolated between training timesteps.
        interpolation_type: InterpolationType = InterpolationType::Linear => choice,
        ..sigma_schedule_flags,
        /// Lowest sigma of Karras/exponential schedules (default: the schedule's own).
        sigma_min: Option<f64> = None => opt_f64,
        /// Highest sigma of Karras/exponential schedules (default: the schedule's own).
        sigma_max: Option<f64> = None => opt_f64,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// `continuous` with v-prediction uses `0.25 * ln(sigma)` as timesteps.
        timestep_type: TimestepType = TimestepType::Discrete => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
        /// The sigma after the last step: 0 or the smallest training sigma.
        final_sigmas_type: FinalSigmasType = FinalSigmasType::Zero => choice,
    }
}

impl ClassConfig for EulerDiscreteConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        check_sigma_config!(r, &self);
        Ok(self)
    }
}

/// `timestep_type="continuous"`: the timesteps are `0.25 * ln(sigma)`, in float32.
fn continuous_timesteps(sigmas: &[f32]) -> Vec<f64> {
    sigmas.iter().map(|s| (0.25f32 * s.ln()) as f64).collect()
}

impl EulerDiscreteConfig {
    /// `timestep_type="continuous"` with v-prediction: the timesteps are `0.25 * ln(sigma)`.
    fn continuous_timesteps(&self) -> bool {
        self.timestep_type == TimestepType::Continuous
            && self.prediction_type == PredictionType::VPrediction
    }
}

/// The keyword arguments of `EulerDiscreteScheduler.step()` (churn noise; off by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EulerStepOptions {
    /// Churn amount (0: no noise is added).
    pub s_churn: f64,
    /// Noise is only added for sigmas at or above this.
    pub s_tmin: f64,
    /// Noise is only added for sigmas at or below this.
    pub s_tmax: f64,
    /// Scale of the added noise.
    pub s_noise: f64,
}

impl Default for EulerStepOptions {
    fn default() -> Self {
        Self { s_churn: 0.0, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 }
    }
}

/// diffusers' `EulerDiscreteScheduler`.
///
/// Timesteps are float32 values (interpolated for Karras/exponential sigmas); sigmas are float32
/// with a final 0 (or `sigma_min`). The step index is set from the timestep on the first
/// [`scale_model_input`](super::Scheduler::scale_model_input) or
/// [`step`](super::Scheduler::step) and then advances by one per step, as in diffusers.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    state: SchedulerState<EulerDiscreteConfig>,
    /// The churn options passed to every [`step`](super::Scheduler::step).
    pub options: EulerStepOptions,
}

scheduler_api!(EulerDiscreteScheduler, EulerDiscreteConfig, euler_config);

impl EulerDiscreteScheduler {
    /// `EulerDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut state = Self::load_state(config)?;
        let c = &state.config;
        // The class's own keys (what diffusers' `hasattr(self.config, ...)` finds).
        state.sigma_range = SigmaRange { min: c.sigma_min, max: c.sigma_max };
        if c.continuous_timesteps() {
            state.timesteps = continuous_timesteps(&state.sigmas[..state.sigmas.len() - 1]);
        }
        Ok(Self { state, options: EulerStepOptions::default() })
    }

    /// The sigmas of the current schedule (float32 values), one more than the timesteps.
    pub fn sigmas(&self) -> Vec<f64> {
        self.state.sigmas_f64()
    }

    /// The current step index (`None` until the first `scale_model_input`/`step`).
    pub fn step_index(&self) -> Option<usize> {
        self.state.index.step
    }
}

impl SchedulerClass for EulerDiscreteScheduler {
    scheduler_state!(CLASS, Parametrization::KDiffusion, state: EulerDiscreteConfig);

    const NEEDS_SET_TIMESTEPS: bool = false;

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.state.config;
        let n = num_inference_steps;
        let train = TrainSigmas::new(&self.state.schedule);
        let spacing = SigmaSpacing::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        let (sigmas, timesteps) = train.k_schedule(
            self.state.k_timesteps(n),
            c.interpolation_type,
            spacing,
            self.state.sigma_range,
        );
        let mut timesteps: Vec<f64> = timesteps.into_iter().map(|t| t as f32 as f64).collect();
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        if c.continuous_timesteps() {
            timesteps = continuous_timesteps(&sigmas);
        }
        sigmas.push(match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train.sigmas[0],
        });
        self.state.set_schedule(timesteps, sigmas, n);
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
        let sigmas = &self.state.sigmas;
        if i + 1 >= sigmas.len() {
            return Err(Error::invalid(format!(
                "{CLASS}: step {i} is past the end of the schedule ({} steps)",
                sigmas.len() - 1
            )));
        }
        let sigma = sigmas[i];
        let o = self.options;
        let gamma = if (o.s_tmin as f32) <= sigma && sigma <= (o.s_tmax as f32) {
            (o.s_churn / (sigmas.len() - 1) as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let sigma_hat = sigma * (gamma + 1.0) as f32;
        let mut sample = sample.clone();
        if gamma > 0.0 {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            let eps = mul(&noise, o.s_noise as f32)?;
            sample = (&sample + mul(&eps, (sigma_hat * sigma_hat - sigma * sigma).sqrt())?)?;
        }
        // diffusers scales epsilon predictions by sigma_hat, v predictions by sigma.
        let prediction = self.state.config.prediction_type;
        let sigma_input = if prediction == PredictionType::Epsilon { sigma_hat } else { sigma };
        let pred_original = k_pred_original(prediction, model_output, &sample, sigma_input)?;
        let dt = sigmas[i + 1] - sigma_hat;
        let (prev, _) = euler_update(&sample, &pred_original, sigma_hat, dt)?;
        self.state.finish_step(i, Some(pred_original));
        Ok(prev)
    }

    fn set_step_option(&mut self, name: &str, value: f64) -> Result<()> {
        match name {
            "s_churn" => self.options.s_churn = value,
            "s_tmin" => self.options.s_tmin = value,
            "s_tmax" => self.options.s_tmax = value,
            "s_noise" => self.options.s_noise = value,
            _ => {
                return Err(Error::invalid(format!(
                    "{CLASS} has no step option `{name}`; valid: s_churn, s_tmin, s_tmax, s_noise"
                )))
            }
        }
        Ok(())
    }
}
