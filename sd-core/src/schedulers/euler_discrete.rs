//! `EulerDiscreteScheduler` of diffusers 0.42: Euler steps on the k-diffusion sigma schedule
//! (Algorithm 2 of Karras et al. 2022), optionally with churn noise, Karras or exponential sigmas.

use candle_core::Tensor;
use serde_json::Map;

use super::betas::TrainingSchedule;
use super::config::{
    BetaSchedule, ConfigReader, ConfigWriter, FinalSigmasType, InterpolationType, PredictionType,
    SchedulerConfig, TimestepSpacing, TimestepType,
};
use super::numeric::{np_arange, np_interp, np_linspace, np_log_f32, np_round};
use super::{check_steps, div, index_for_timestep, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "EulerDiscreteScheduler";

/// The `__init__` arguments of diffusers' `EulerDiscreteScheduler`, with its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerDiscreteConfig {
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
    /// What the model predicts (noise, `v`, or the sample).
    pub prediction_type: PredictionType,
    /// How sigmas are interpolated between training timesteps.
    pub interpolation_type: InterpolationType,
    /// Use the Karras et al. (2022) sigma schedule (rho = 7).
    pub use_karras_sigmas: bool,
    /// Use exponentially spaced sigmas.
    pub use_exponential_sigmas: bool,
    /// Beta sigmas need scipy's beta quantile function; not supported (an error if true).
    pub use_beta_sigmas: bool,
    /// Lowest sigma of Karras/exponential schedules (default: the schedule's own).
    pub sigma_min: Option<f64>,
    /// Highest sigma of Karras/exponential schedules (default: the schedule's own).
    pub sigma_max: Option<f64>,
    /// How inference timesteps are picked from the training ones.
    pub timestep_spacing: TimestepSpacing,
    /// `continuous` with v-prediction uses `0.25 * ln(sigma)` as timesteps.
    pub timestep_type: TimestepType,
    /// Added to the timesteps with `leading` spacing (SD uses 1).
    pub steps_offset: i64,
    /// Rescale betas to a zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// The sigma after the last step: 0 or the smallest training sigma.
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl EulerDiscreteConfig {
    /// Reads the config with `EulerDiscreteScheduler.from_config(config)` semantics.
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
            prediction_type: r.choice("prediction_type", d.prediction_type)?,
            interpolation_type: r.choice("interpolation_type", d.interpolation_type)?,
            use_karras_sigmas: r.bool("use_karras_sigmas", d.use_karras_sigmas)?,
            use_exponential_sigmas: r.bool("use_exponential_sigmas", d.use_exponential_sigmas)?,
            use_beta_sigmas: r.bool("use_beta_sigmas", d.use_beta_sigmas)?,
            sigma_min: r.opt_f64("sigma_min")?,
            sigma_max: r.opt_f64("sigma_max")?,
            timestep_spacing: r.choice("timestep_spacing", d.timestep_spacing)?,
            timestep_type: r.choice("timestep_type", d.timestep_type)?,
            steps_offset: r.i64("steps_offset", d.steps_offset)?,
            rescale_betas_zero_snr: r.bool("rescale_betas_zero_snr", d.rescale_betas_zero_snr)?,
            final_sigmas_type: r.choice("final_sigmas_type", d.final_sigmas_type)?,
        };
        let chosen = [c.use_karras_sigmas, c.use_exponential_sigmas, c.use_beta_sigmas]
            .iter()
            .filter(|&&b| b)
            .count();
        if chosen > 1 {
            return Err(r.error(
                "use_karras_sigmas",
                "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be true",
            ));
        }
        if c.use_beta_sigmas {
            return Err(r.error(
                "use_beta_sigmas",
                "beta sigmas are not supported (they need scipy's beta.ppf)",
            ));
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
            .choice("prediction_type", self.prediction_type)
            .choice("interpolation_type", self.interpolation_type)
            .set("use_karras_sigmas", self.use_karras_sigmas)
            .set("use_exponential_sigmas", self.use_exponential_sigmas)
            .set("use_beta_sigmas", self.use_beta_sigmas)
            .opt_f64("sigma_min", self.sigma_min)
            .opt_f64("sigma_max", self.sigma_max)
            .choice("timestep_spacing", self.timestep_spacing)
            .choice("timestep_type", self.timestep_type)
            .set("steps_offset", self.steps_offset)
            .set("rescale_betas_zero_snr", self.rescale_betas_zero_snr)
            .choice("final_sigmas_type", self.final_sigmas_type);
        w.0
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
/// [`scale_model_input`](Scheduler::scale_model_input) or [`step`](Scheduler::step) and then
/// advances by one per step, as in diffusers.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
    pred_original_sample: Option<Tensor>,
    /// The churn options passed to every [`step`](Scheduler::step).
    pub options: EulerStepOptions,
}

impl EulerDiscreteScheduler {
    /// `EulerDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = EulerDiscreteConfig::read(&mut r)?;
        let resolved = r.resolved(c.write());
        Self::build(c, resolved)
    }

    /// `EulerDiscreteScheduler(**config)`.
    pub fn new(config: EulerDiscreteConfig) -> Result<Self> {
        let raw = SchedulerConfig::from_map(config.write());
        Self::from_config(&raw)
    }

    fn build(config: EulerDiscreteConfig, resolved: SchedulerConfig) -> Result<Self> {
        let schedule = TrainingSchedule::new(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
            config.rescale_betas_zero_snr,
        )
        .map_err(|e| {
            Error::config(
                resolved.source().unwrap_or(std::path::Path::new("<scheduler config>")),
                format!("{CLASS}: {e}"),
            )
        })?;
        let mut schedule = schedule;
        if config.rescale_betas_zero_snr {
            // Close to zero but not zero, so the last sigma stays finite.
            if let Some(last) = schedule.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let n = config.num_train_timesteps;
        let mut sigmas: Vec<f32> = schedule.sigmas();
        sigmas.reverse();
        let timesteps: Vec<f64> = if config.timestep_type == TimestepType::Continuous
            && config.prediction_type == PredictionType::VPrediction
        {
            sigmas.iter().map(|s| (0.25f32 * s.ln()) as f64).collect()
        } else {
            np_linspace(0.0, (n - 1) as f64, n).into_iter().rev().map(|t| t as f32 as f64).collect()
        };
        sigmas.push(0.0);
        Ok(Self {
            config,
            resolved,
            schedule,
            timesteps,
            sigmas,
            num_inference_steps: None,
            step_index: None,
            begin_index: None,
            pred_original_sample: None,
            options: EulerStepOptions::default(),
        })
    }

    /// The typed config.
    pub fn euler_config(&self) -> &EulerDiscreteConfig {
        &self.config
    }

    /// The sigmas of the current schedule (float32 values), one more than the timesteps.
    pub fn sigmas(&self) -> Vec<f64> {
        self.sigmas.iter().map(|&s| s as f64).collect()
    }

    /// The training `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    /// The current step index (`None` until the first `scale_model_input`/`step`).
    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    fn init_step_index(&mut self, timestep: f64) -> Result<usize> {
        if let Some(i) = self.step_index {
            return Ok(i);
        }
        let i = match self.begin_index {
            Some(b) => b,
            None => index_for_timestep(&self.timesteps, timestep).ok_or_else(|| {
                Error::invalid(format!("timestep {timestep} is not in the {CLASS} schedule"))
            })?,
        };
        self.step_index = Some(i);
        Ok(i)
    }

    /// `_sigma_to_t`: the (fractional) training timestep of `sigma`, interpolating in log space.
    fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
        let log_sigma = sigma.max(1e-10).ln();
        let last_ge = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0);
        let low_idx = last_ge.min(log_sigmas.len() - 2);
        let high_idx = low_idx + 1;
        let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
        let w = (low as f64 - log_sigma) / (low - high) as f64;
        let w = if w.is_nan() { w } else { w.clamp(0.0, 1.0) };
        (1.0 - w) * low_idx as f64 + w * high_idx as f64
    }

    fn karras(&self, in_sigmas: &[f64], n: usize) -> Vec<f64> {
        let sigma_min = self.config.sigma_min.unwrap_or(in_sigmas[in_sigmas.len() - 1]);
        let sigma_max = self.config.sigma_max.unwrap_or(in_sigmas[0]);
        let rho = 7.0f64;
        let min_inv_rho = sigma_min.powf(1.0 / rho);
        let max_inv_rho = sigma_max.powf(1.0 / rho);
        np_linspace(0.0, 1.0, n)
            .into_iter()
            .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
            .collect()
    }

    fn exponential(&self, in_sigmas: &[f64], n: usize) -> Vec<f64> {
        let sigma_min = self.config.sigma_min.unwrap_or(in_sigmas[in_sigmas.len() - 1]);
        let sigma_max = self.config.sigma_max.unwrap_or(in_sigmas[0]);
        np_linspace(sigma_max.ln(), sigma_min.ln(), n).into_iter().map(f64::exp).collect()
    }
}

impl Scheduler for EulerDiscreteScheduler {
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
        // float32 timesteps, as numpy computes them.
        let mut timesteps: Vec<f64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n_train / n;
                (0..n)
                    .rev()
                    .map(|i| (np_round((i * ratio) as f64) as f32 + c.steps_offset as f32) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / n as f64;
                np_arange(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| (np_round(t) as f32 - 1.0) as f64)
                    .collect()
            }
        };
        let train_sigmas = self.schedule.sigmas(); // float32, ascending in t
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|&s| np_log_f32(s)).collect();
        let xp: Vec<f64> = (0..n_train).map(|i| i as f64).collect();
        let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f64> = match c.interpolation_type {
            InterpolationType::Linear => np_interp(&timesteps, &xp, &fp),
            InterpolationType::LogLinear => {
                let start = np_log_f32(train_sigmas[n_train - 1]) as f64;
                let end = np_log_f32(train_sigmas[0]) as f64;
                super::numeric::torch_linspace_f32(start, end, n + 1)
                    .into_iter()
                    .map(|l| l.exp() as f64)
                    .collect()
            }
        };
        if c.use_karras_sigmas {
            sigmas = self.karras(&sigmas, n);
            timesteps =
                sigmas.iter().map(|&s| Self::sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        } else if c.use_exponential_sigmas {
            sigmas = self.exponential(&sigmas, n);
            timesteps =
                sigmas.iter().map(|&s| Self::sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        let sigma_last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0f32,
            FinalSigmasType::SigmaMin => {
                let a0 = self.schedule.alphas_cumprod[0];
                ((1.0 - a0) / a0).sqrt()
            }
        };
        let mut sigmas_f32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas_f32.push(sigma_last);
        if c.timestep_type == TimestepType::Continuous
            && c.prediction_type == PredictionType::VPrediction
        {
            timesteps = sigmas_f32[..sigmas_f32.len() - 1]
                .iter()
                .map(|s| (0.25f32 * s.ln()) as f64)
                .collect();
        }
        self.timesteps = timesteps;
        self.sigmas = sigmas_f32;
        self.num_inference_steps = Some(n);
        self.step_index = None;
        self.begin_index = None;
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
        Some(EulerDiscreteScheduler::sigmas(self))
    }

    /// `max(sigmas)` for linspace/trailing spacing, `sqrt(max(sigmas)^2 + 1)` for leading
    /// (diffusers 0.42's rule), in float32.
    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        }
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.init_step_index(timestep)?;
        let sigma = *self.sigmas.get(i).ok_or_else(|| {
            Error::invalid(format!("{CLASS}: step index {i} is past the schedule"))
        })?;
        div(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        same_shape(model_output, sample, "EulerDiscreteScheduler::step")?;
        let i = self.init_step_index(timestep)?;
        if i + 1 >= self.sigmas.len() {
            return Err(Error::invalid(format!(
                "{CLASS}: step {i} is past the end of the schedule ({} steps)",
                self.sigmas.len() - 1
            )));
        }
        let mut sample = to_f32(sample)?;
        let model_output = to_f32(model_output)?;
        let sigma = self.sigmas[i];
        let o = self.options;
        let gamma = if (o.s_tmin as f32) <= sigma && sigma <= (o.s_tmax as f32) {
            (o.s_churn / (self.sigmas.len() - 1) as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let sigma_hat = sigma * (gamma + 1.0) as f32;
        if gamma > 0.0 {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            let eps = mul(&noise, o.s_noise as f32)?;
            sample = (&sample + mul(&eps, (sigma_hat * sigma_hat - sigma * sigma).sqrt())?)?;
        }
        let pred_original = match self.config.prediction_type {
            PredictionType::Sample => model_output.clone(),
            PredictionType::Epsilon => (&sample - mul(&model_output, sigma_hat)?)?,
            PredictionType::VPrediction => {
                let sigma2p1 = sigma * sigma + 1.0;
                (mul(&model_output, -sigma / sigma2p1.sqrt())? + div(&sample, sigma2p1)?)?
            }
        };
        let derivative = div(&(&sample - &pred_original)?, sigma_hat)?;
        let dt = self.sigmas[i + 1] - sigma_hat;
        let prev = (&sample + mul(&derivative, dt)?)?;
        self.step_index = Some(i + 1);
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
        same_shape(original_samples, noise, "EulerDiscreteScheduler::add_noise")?;
        let i = match (self.begin_index, self.step_index) {
            (None, _) => index_for_timestep(&self.timesteps, timestep).ok_or_else(|| {
                Error::invalid(format!("timestep {timestep} is not in the {CLASS} schedule"))
            })?,
            (Some(_), Some(s)) => s,
            (Some(b), None) => b,
        };
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| Error::invalid(format!("{CLASS}: index {i} is past the schedule")))?;
        Ok((to_f32(original_samples)? + mul(&to_f32(noise)?, sigma)?)?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
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
