//! `KDPM2DiscreteScheduler` of diffusers 0.42 ("DPM2"): k-diffusion's second-order DPM-Solver-2
//! (Algorithm 2 of Karras et al. 2022 with a midpoint at the geometric mean of two sigmas). Each
//! step evaluates the model at `t` and at the interpolated midpoint timestep, so the schedule
//! interleaves them: `[t0, ti1, t1, ti2, t2, ...]`, as in diffusers.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    check_choice, check_sigma_choice, k_init_noise_sigma, k_pred_original, k_scale, k_sigmas,
    k_timesteps, log_sigmas, scheduler_config, sigma_at, sigma_to_t_f32, train_sigmas,
    training_schedule, SigmaKind, StepIndex, STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::numeric::np_round;
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "KDPM2DiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `KDPM2DiscreteScheduler` (and of
    /// `KDPM2AncestralDiscreteScheduler`, which has the same ones), with their defaults.
    pub struct KDPM2DiscreteConfig {
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
        /// Use the Karras et al. (2022) sigma schedule (rho = 7).
        use_karras_sigmas: bool = false => bool,
        /// Use exponentially spaced sigmas.
        use_exponential_sigmas: bool = false => bool,
        /// Beta sigmas need scipy's beta quantile function; not supported (an error if true).
        use_beta_sigmas: bool = false => bool,
        /// What the model predicts (`epsilon` or `v_prediction`).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
    }
}

impl KDPM2DiscreteConfig {
    /// Reads the config with `KDPM2DiscreteScheduler.from_config(config)` semantics.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::read(&mut ConfigReader::new(config, CLASS), CLASS)
    }

    pub(crate) fn read(r: &mut ConfigReader<'_>, class: &str) -> Result<Self> {
        let c = Self::read_fields(r)?;
        check_choice(r, class, "beta_schedule", c.beta_schedule, STANDARD_BETAS)?;
        check_choice(
            r,
            class,
            "prediction_type",
            c.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
        )?;
        check_sigma_choice(r, c.use_karras_sigmas, c.use_exponential_sigmas, c.use_beta_sigmas)?;
        Ok(c)
    }

    pub(crate) fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        self.write()
    }
}

/// The float32 sigma schedule of KDPM2 before interleaving: the `n + 1` sigmas (final 0), the
/// timesteps (float32 values, or float64 for Karras/exponential sigmas, as diffusers keeps
/// them), and the float32 log training sigmas.
pub(crate) struct Kdpm2Base {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f64>,
    pub log_sigmas: Vec<f32>,
}

pub(crate) fn kdpm2_base(
    c: &KDPM2DiscreteConfig,
    schedule: &TrainingSchedule,
    n: usize,
    hidden_sigma_min: Option<f64>,
    hidden_sigma_max: Option<f64>,
) -> Kdpm2Base {
    let ts = k_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset);
    let train = train_sigmas(&schedule.alphas_cumprod);
    let kind = SigmaKind::new(c.use_karras_sigmas, c.use_exponential_sigmas);
    let (sigmas, ts64) = k_sigmas(kind, &ts, &train, hidden_sigma_min, hidden_sigma_max);
    let timesteps = match kind {
        SigmaKind::Interpolated => ts64.iter().map(|&t| t as f32 as f64).collect(),
        SigmaKind::Karras => ts64.iter().map(|&t| np_round(t)).collect(),
        SigmaKind::Exponential => ts64,
    };
    let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
    sigmas.push(0.0);
    Kdpm2Base { sigmas, timesteps, log_sigmas: log_sigmas(&train) }
}

/// `start.lerp(end, 0.5)` of torch in float32 (`end - (end - start) * 0.5`), through `log`/`exp`:
/// the geometric mean of two sigmas as diffusers computes it.
pub(crate) fn log_midpoint(a: f32, b: f32) -> f32 {
    let (start, end) = (a.ln(), b.ln());
    (end - (end - start) * 0.5).exp()
}

/// `torch.cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`.
pub(crate) fn interleave_repeat(x: &[f32]) -> Vec<f32> {
    let mut out = vec![x[0]];
    for &v in &x[1..] {
        out.extend([v, v]);
    }
    out.push(x[x.len() - 1]);
    out
}

/// The timestep of an interpolated sigma (`_sigma_to_t` on float32 tensors), in the dtype of
/// the schedule's timesteps.
pub(crate) fn interpol_timestep(sigma: f32, log_sigmas: &[f32]) -> f64 {
    sigma_to_t_f32(sigma, log_sigmas) as f64
}

/// diffusers' `KDPM2DiscreteScheduler`: `2n - 1` timesteps for `n` steps.
#[derive(Debug, Clone)]
pub struct KDPM2DiscreteScheduler {
    config: KDPM2DiscreteConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    hidden_sigma_min: Option<f64>,
    hidden_sigma_max: Option<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    num_inference_steps: Option<usize>,
    index: StepIndex,
    /// The sample of the first evaluation, kept for the second.
    first_sample: Option<Tensor>,
    pred_original_sample: Option<Tensor>,
}

impl KDPM2DiscreteScheduler {
    /// `KDPM2DiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = KDPM2DiscreteConfig::read(&mut r, CLASS)?;
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
            sigmas_interpol: vec![],
            num_inference_steps: None,
            index: StepIndex::default(),
            first_sample: None,
            pred_original_sample: None,
        };
        s.set_timesteps(n)?;
        s.num_inference_steps = None;
        Ok(s)
    }

    /// `KDPM2DiscreteScheduler(**config)`.
    pub fn new(config: KDPM2DiscreteConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &KDPM2DiscreteConfig {
        &self.config
    }

    /// The interleaved interpolated sigmas (float32 values).
    pub fn sigmas_interpol(&self) -> Vec<f64> {
        self.sigmas_interpol.iter().map(|&s| s as f64).collect()
    }
}

impl Scheduler for KDPM2DiscreteScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn config(&self) -> &SchedulerConfig {
        &self.resolved
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps, self.config.num_train_timesteps)?;
        let base = kdpm2_base(
            &self.config,
            &self.schedule,
            num_inference_steps,
            self.hidden_sigma_min,
            self.hidden_sigma_max,
        );
        let s = &base.sigmas;
        let n1 = s.len();
        // sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()
        let interpol: Vec<f32> =
            (0..n1).map(|k| log_midpoint(s[k], s[(k + n1 - 1) % n1])).collect();
        let ti: Vec<f64> =
            interpol.iter().map(|&x| interpol_timestep(x, &base.log_sigmas)).collect();
        let t = &base.timesteps;
        let mut timesteps = vec![t[0]];
        for k in 1..n1 - 1 {
            timesteps.extend([ti[k], t[k]]);
        }
        self.timesteps = timesteps;
        self.sigmas = interleave_repeat(s);
        self.sigmas_interpol = interleave_repeat(&interpol);
        self.num_inference_steps = Some(num_inference_steps);
        self.first_sample = None;
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
        let sigma = if self.first_sample.is_none() {
            sigma_at(&self.sigmas, i, CLASS)?
        } else {
            sigma_at(&self.sigmas_interpol, i, CLASS)?
        };
        k_scale(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _generators: &mut Generators,
    ) -> Result<Tensor> {
        same_shape(model_output, sample, "KDPM2DiscreteScheduler::step")?;
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        let i = self.index.init(&self.timesteps, timestep, CLASS, false)?;
        let first_order = self.first_sample.is_none();
        let (sigma, sigma_interpol, sigma_next) = if first_order {
            (
                sigma_at(&self.sigmas, i, CLASS)?,
                sigma_at(&self.sigmas_interpol, i + 1, CLASS)?,
                self.sigmas[i + 1],
            )
        } else {
            (self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i])
        };
        let sigma_hat = sigma;
        let (sample, model_output) = (to_f32(sample)?, to_f32(model_output)?);
        let sigma_input = if first_order { sigma_hat } else { sigma_interpol };
        let pred_original =
            k_pred_original(self.config.prediction_type, &model_output, &sample, sigma_input)?;
        let prev = if first_order {
            let derivative = div(&(&sample - &pred_original)?, sigma_hat)?;
            let dt = sigma_interpol - sigma_hat;
            let prev = (&sample + mul(&derivative, dt)?)?;
            self.first_sample = Some(sample);
            prev
        } else {
            let derivative = div(&(&sample - &pred_original)?, sigma_interpol)?;
            let dt = sigma_next - sigma_hat;
            let first = self.first_sample.take().expect("second-order state");
            (&first + mul(&derivative, dt)?)?
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
        same_shape(original_samples, noise, "KDPM2DiscreteScheduler::add_noise")?;
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
