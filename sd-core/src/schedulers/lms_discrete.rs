//! `LMSDiscreteScheduler` of diffusers 0.42: the linear multistep method (order 4) on the
//! k-diffusion sigmas, optionally Karras or exponential ("LMS", "LMS Karras").

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    check_choice, check_sigma_choice, exponential_sigmas, gauss_kronrod_21, interp_sigmas,
    k_init_noise_sigma, k_pred_original, k_scale, k_timesteps, karras_sigmas, log_sigmas,
    scheduler_config, sigma_at, sigma_to_t, train_sigmas, training_schedule, StepIndex,
    STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "LMSDiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `LMSDiscreteScheduler`, with its defaults.
    pub struct LMSDiscreteConfig {
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
        /// Use the Karras et al. (2022) sigma schedule (rho = 7).
        use_karras_sigmas: bool = false => bool,
        /// Use exponentially spaced sigmas.
        use_exponential_sigmas: bool = false => bool,
        /// Beta sigmas need scipy's beta quantile function; not supported (an error if true).
        use_beta_sigmas: bool = false => bool,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
    }
}

impl LMSDiscreteConfig {
    /// Reads the config with `LMSDiscreteScheduler.from_config(config)` semantics.
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

/// The order of the multistep method (diffusers' `step(..., order=4)` default).
pub const LMS_ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler`: float32 timesteps and sigmas (with a final 0); the
/// integration coefficients are computed with the float32 integrand and the Gauss-Kronrod rule
/// scipy's `quad` uses.
#[derive(Debug, Clone)]
pub struct LMSDiscreteScheduler {
    config: LMSDiscreteConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    hidden_sigma_min: Option<f64>,
    hidden_sigma_max: Option<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
    derivatives: Vec<Tensor>,
    index: StepIndex,
    pred_original_sample: Option<Tensor>,
    order: usize,
}

impl LMSDiscreteScheduler {
    /// `LMSDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = LMSDiscreteConfig::read(&mut r)?;
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
            derivatives: vec![],
            index: StepIndex::default(),
            pred_original_sample: None,
            order: LMS_ORDER,
        };
        // diffusers' __init__ calls set_timesteps(num_train_timesteps).
        s.set_timesteps(n)?;
        s.num_inference_steps = None;
        Ok(s)
    }

    /// `LMSDiscreteScheduler(**config)`.
    pub fn new(config: LMSDiscreteConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &LMSDiscreteConfig {
        &self.config
    }

    /// The training `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    /// `get_lms_coefficient(order, t, current_order)`: the integral over `[sigmas[t],
    /// sigmas[t + 1]]` of the Lagrange basis polynomial of `sigmas[t - current_order]`, evaluated
    /// in float32 as diffusers' torch integrand is.
    pub fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let s = &self.sigmas;
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

impl Scheduler for LMSDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn config(&self) -> &SchedulerConfig {
        &self.resolved
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        check_steps(num_inference_steps, c.num_train_timesteps)?;
        let n = num_inference_steps;
        let ts = k_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
        let train = train_sigmas(&self.schedule.alphas_cumprod);
        let ts64: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
        let sigmas = interp_sigmas(&ts64, &train);
        let (sigmas, ts64) = if c.use_karras_sigmas || c.use_exponential_sigmas {
            // LMS's Karras conversion ignores sigma_min/sigma_max; the exponential one reads them
            // as hidden keys kept from the source config (`hasattr(self.config, "sigma_min")`).
            let (lo, hi) = (sigmas[n - 1], sigmas[0]);
            let s = if c.use_karras_sigmas {
                karras_sigmas(lo, hi, n)
            } else {
                exponential_sigmas(
                    self.hidden_sigma_min.unwrap_or(lo),
                    self.hidden_sigma_max.unwrap_or(hi),
                    n,
                )
            };
            let logs = log_sigmas(&train);
            let t: Vec<f64> = s.iter().map(|&x| sigma_to_t(x, &logs) as f32 as f64).collect();
            (s, t)
        } else {
            (sigmas, ts64)
        };
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        self.timesteps = ts64;
        self.sigmas = sigmas;
        self.num_inference_steps = Some(n);
        self.derivatives.clear();
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
        same_shape(model_output, sample, "LMSDiscreteScheduler::step")?;
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        let i = self.index.init(&self.timesteps, timestep, CLASS, false)?;
        sigma_at(&self.sigmas, i + 1, CLASS)?;
        let sigma = self.sigmas[i];
        let (sample, model_output) = (to_f32(sample)?, to_f32(model_output)?);
        let pred_original =
            k_pred_original(self.config.prediction_type, &model_output, &sample, sigma)?;
        let derivative = div(&(&sample - &pred_original)?, sigma)?;
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
            Some(a) => (&sample + a)?,
            None => sample.clone(),
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
        same_shape(original_samples, noise, "LMSDiscreteScheduler::add_noise")?;
        let i = self.index.for_add_noise(&self.timesteps, timestep, CLASS, false)?;
        let sigma = sigma_at(&self.sigmas, i, CLASS)?;
        Ok((to_f32(original_samples)? + mul(&to_f32(noise)?, sigma)?)?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
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
