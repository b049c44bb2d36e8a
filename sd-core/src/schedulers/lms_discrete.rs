//! `LMSDiscreteScheduler` of diffusers 0.42: the linear multistep method (order 4) on the
//! k-diffusion sigmas, optionally Karras or exponential ("LMS", "LMS Karras").

use candle_core::Tensor;

use super::common::{check_sigma_config, div, k_pred_original, mul, scheduler_config, ClassConfig};
use super::config::{
    BetaSchedule, ConfigReader, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::numeric::gauss_kronrod_21;
use super::sigma_schedule::{SigmaSpacing, TrainSigmas};
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState, SigmaRange,
};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "LMSDiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `LMSDiscreteScheduler`, with its defaults.
    pub struct LMSDiscreteConfig for "LMSDiscreteScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
        ..sigma_schedule_flags,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
    }
}

impl ClassConfig for LMSDiscreteConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        check_sigma_config!(r, &self);
        Ok(self)
    }
}

/// The order of the multistep method (diffusers' `step(..., order=4)` default).
pub const LMS_ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler`: float32 timesteps and sigmas (with a final 0); the
/// integration coefficients are computed with the float32 integrand and the Gauss-Kronrod rule
/// scipy's `quad` uses.
#[derive(Debug, Clone)]
pub struct LMSDiscreteScheduler {
    state: SchedulerState<LMSDiscreteConfig>,
    derivatives: Vec<Tensor>,
    order: usize,
}

scheduler_api!(LMSDiscreteScheduler, LMSDiscreteConfig, typed_config);

impl LMSDiscreteScheduler {
    /// `LMSDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let state = Self::load_state(config)?;
        Self { state, derivatives: vec![], order: LMS_ORDER }.with_training_timesteps()
    }

    /// `get_lms_coefficient(order, t, current_order)`: the integral over `[sigmas[t],
    /// sigmas[t + 1]]` of the Lagrange basis polynomial of `sigmas[t - current_order]`, evaluated
    /// in float32 as diffusers' torch integrand is.
    pub fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let s = &self.state.sigmas;
        let f = |tau: f64| -> f64 {
            let tau = tau as f32;
            let mut prod = 1.0f32;
            for k in 0..order {
                if current_order == k {
                    continue;
                }
                prod *= (tau - s[t - k]) / (s[t - current_order] - s[t - k]);
            }
            prod as f64
        };
        gauss_kronrod_21(f, s[t] as f64, s[t + 1] as f64)
    }
}

impl SchedulerClass for LMSDiscreteScheduler {
    scheduler_state!(CLASS, Parametrization::KDiffusion, state: LMSDiscreteConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.state.config;
        let n = num_inference_steps;
        let train = TrainSigmas::new(&self.state.schedule);
        let spacing = SigmaSpacing::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        // LMS's Karras conversion ignores sigma_min/sigma_max; the exponential one reads them as
        // hidden keys kept from the source config (`hasattr(self.config, "sigma_min")`).
        let range = match spacing {
            Some(SigmaSpacing::Karras) => SigmaRange::default(),
            _ => self.state.sigma_range,
        };
        let linear = InterpolationType::Linear;
        let (sigmas, ts) = train.k_schedule(self.state.k_timesteps(n), linear, spacing, range);
        let timesteps = ts.into_iter().map(|t| t as f32 as f64).collect();
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        self.state.set_schedule(timesteps, sigmas, n);
        self.derivatives.clear();
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
        self.state.sigma(i + 1)?;
        let sigma = self.state.sigmas[i];
        let prediction = self.state.config.prediction_type;
        let pred_original = k_pred_original(prediction, model_output, sample, sigma)?;
        let derivative = div(&(sample - &pred_original)?, sigma)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > self.order {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(self.order);
        let mut acc: Option<Tensor> = None;
        for (current_order, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let coeff = self.lms_coefficient(order, i, current_order);
            let term = mul(d, coeff as f32)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        let prev = match acc {
            Some(a) => (sample + a)?,
            None => sample.clone(),
        };
        self.state.finish_step(i, Some(pred_original));
        Ok(prev)
    }

    fn set_step_option(&mut self, name: &str, value: f64) -> Result<()> {
        match name {
            "order" if value >= 1.0 && value.fract() == 0.0 => {
                self.order = value as usize;
                Ok(())
            }
            "order" => Err(Error::invalid(format!(
                "{CLASS}: order must be a positive integer, got {value}"
            ))),
            _ => Err(Error::invalid(format!("{CLASS} has no step option `{name}`; valid: order"))),
        }
    }
}
