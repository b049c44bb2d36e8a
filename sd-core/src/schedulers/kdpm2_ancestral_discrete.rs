//! `KDPM2AncestralDiscreteScheduler` of diffusers 0.42 ("DPM2 a"): DPM-Solver-2 steps to the
//! ancestral `sigma_down`, with fresh noise of scale `sigma_up` (drawn from the run's generators)
//! added on each step's second evaluation. Timesteps interleave `t` and the interpolated midpoints
//! (`[t0, ti0, t1, ti1, ...]`), as in diffusers.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    k_init_noise_sigma, k_pred_original, k_scale, sigma_at, training_schedule, StepIndex,
};
use super::config::{ConfigReader, SchedulerConfig};
use super::kdpm2_discrete::{
    interleave_repeat, interpol_timestep, kdpm2_base, log_midpoint, KDPM2DiscreteConfig,
};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "KDPM2AncestralDiscreteScheduler";

/// The `__init__` arguments of diffusers' `KDPM2AncestralDiscreteScheduler`: the same as
/// `KDPM2DiscreteScheduler`'s.
pub type KDPM2AncestralDiscreteConfig = KDPM2DiscreteConfig;

/// diffusers' `KDPM2AncestralDiscreteScheduler`: `2n - 1` timesteps for `n` steps.
#[derive(Debug, Clone)]
pub struct KDPM2AncestralDiscreteScheduler {
    config: KDPM2DiscreteConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    hidden_sigma_min: Option<f64>,
    hidden_sigma_max: Option<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    num_inference_steps: Option<usize>,
    index: StepIndex,
    first_sample: Option<Tensor>,
    pred_original_sample: Option<Tensor>,
}

impl KDPM2AncestralDiscreteScheduler {
    /// `KDPM2AncestralDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = KDPM2DiscreteConfig::read(&mut r, CLASS)?;
        let (hidden_sigma_min, hidden_sigma_max) =
            (r.hidden_f64("sigma_min"), r.hidden_f64("sigma_max"));
        let resolved = r.resolved(c.to_map());
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
            sigmas_up: vec![],
            sigmas_down: vec![],
            num_inference_steps: None,
            index: StepIndex::default(),
            first_sample: None,
            pred_original_sample: None,
        };
        s.set_timesteps(n)?;
        s.num_inference_steps = None;
        Ok(s)
    }

    /// `KDPM2AncestralDiscreteScheduler(**config)`.
    pub fn new(config: KDPM2AncestralDiscreteConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.to_map()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &KDPM2AncestralDiscreteConfig {
        &self.config
    }
}

impl Scheduler for KDPM2AncestralDiscreteScheduler {
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
        let next: Vec<f32> = (0..n1).map(|k| if k + 1 < n1 { s[k + 1] } else { 0.0 }).collect();
        let up: Vec<f32> = (0..n1)
            .map(|k| {
                let (s2, n2) = (s[k] * s[k], next[k] * next[k]);
                (n2 * (s2 - n2) / s2).sqrt()
            })
            .collect();
        let mut down: Vec<f32> =
            (0..n1).map(|k| (next[k] * next[k] - up[k] * up[k]).sqrt()).collect();
        down[n1 - 1] = 0.0;
        let mut interpol: Vec<f32> = (0..n1).map(|k| log_midpoint(s[k], down[k])).collect();
        for v in interpol.iter_mut().skip(n1.saturating_sub(2)) {
            *v = 0.0;
        }
        let ti: Vec<f64> =
            interpol.iter().map(|&x| interpol_timestep(x, &base.log_sigmas)).collect();
        let t = &base.timesteps;
        let mut timesteps = vec![t[0]];
        for k in 1..n1 - 1 {
            timesteps.extend([ti[k - 1], t[k]]);
        }
        self.timesteps = timesteps;
        self.sigmas = interleave_repeat(s);
        self.sigmas_interpol = interleave_repeat(&interpol);
        self.sigmas_up = interleave_repeat(&up);
        self.sigmas_down = interleave_repeat(&down);
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
            sigma_at(&self.sigmas_interpol, i.wrapping_sub(1), CLASS)?
        };
        k_scale(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        same_shape(model_output, sample, "KDPM2AncestralDiscreteScheduler::step")?;
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        let i = self.index.init(&self.timesteps, timestep, CLASS, false)?;
        let first_order = self.first_sample.is_none();
        let (sigma, sigma_interpol, sigma_up, sigma_down) = if first_order {
            let d = if i == 0 { self.sigmas_down.len() - 1 } else { i - 1 };
            (
                sigma_at(&self.sigmas, i, CLASS)?,
                self.sigmas_interpol[i],
                self.sigmas_up[i],
                self.sigmas_down[d],
            )
        } else {
            let j = i
                .checked_sub(1)
                .ok_or_else(|| Error::invalid(format!("{CLASS}: second-order step at index 0")))?;
            (self.sigmas[j], self.sigmas_interpol[j], self.sigmas_up[j], self.sigmas_down[j])
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
            let dt = sigma_down - sigma_hat;
            let first = self.first_sample.take().expect("second-order state");
            let prev = (&first + mul(&derivative, dt)?)?;
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            (prev + mul(&noise, sigma_up)?)?
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
        same_shape(original_samples, noise, "KDPM2AncestralDiscreteScheduler::add_noise")?;
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
