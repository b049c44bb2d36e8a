//! `PNDMScheduler` of diffusers 0.42 (pseudo numerical methods, Liu et al. 2022): linear
//! multistep (PLMS) steps, after Runge-Kutta (PRK) warm-up steps unless `skip_prk_steps` (which
//! Stable Diffusion's configs set).

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    alpha_add_noise, alpha_at, check_choice, int_timestep, scheduler_config, training_schedule,
    STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::numeric::{np_arange, np_linspace, np_round};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "PNDMScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `PNDMScheduler`, with its defaults.
    pub struct PNDMConfig {
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
        /// Skip the Runge-Kutta warm-up (PLMS only; Stable Diffusion sets it).
        skip_prk_steps: bool = false => bool,
        /// Use alpha = 1 after the last step (else the first training alpha).
        set_alpha_to_one: bool = false => bool,
        /// What the model predicts (`epsilon` or `v_prediction`).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Leading => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
    }
}

impl PNDMConfig {
    /// Reads the config with `PNDMScheduler.from_config(config)` semantics.
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

/// diffusers' `PNDMScheduler`. With `skip_prk_steps` and `n` steps the schedule has `n + 1`
/// integer timesteps (the second one repeated: the first PLMS step is a two-evaluation
/// predictor-corrector); without it, 12 Runge-Kutta timesteps come first.
#[derive(Debug, Clone)]
pub struct PNDMScheduler {
    config: PNDMConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    final_alpha_cumprod: f32,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl PNDMScheduler {
    /// `PNDMScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = PNDMConfig::read(&mut r)?;
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
        let final_alpha_cumprod = if c.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Self {
            config: c,
            resolved,
            schedule,
            final_alpha_cumprod,
            prk_timesteps: vec![],
            timesteps: vec![],
            num_inference_steps: None,
            counter: 0,
            ets: vec![],
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// `PNDMScheduler(**config)`.
    pub fn new(config: PNDMConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &PNDMConfig {
        &self.config
    }

    /// The training `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        if t >= 0 {
            alpha_at(&self.schedule.alphas_cumprod, t, CLASS)
        } else {
            Ok(self.final_alpha_cumprod)
        }
    }

    /// `_get_prev_sample`: formula (9) of the PNDM paper, in float32.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_prod_t = alpha_at(&self.schedule.alphas_cumprod, timestep, CLASS)?;
        let alpha_prod_t_prev = self.alpha(prev_timestep)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.config.prediction_type {
            PredictionType::VPrediction => {
                (mul(model_output, alpha_prod_t.sqrt())? + mul(sample, beta_prod_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let scaled = div(&mul(&model_output, alpha_prod_t_prev - alpha_prod_t)?, denom)?;
        Ok((mul(sample, sample_coeff)? - scaled)?)
    }

    fn step_prk(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let n = self.num_inference_steps.expect("set_timesteps was called");
        let half = (self.config.num_train_timesteps / n / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];
        let acc = |cur: &Option<Tensor>, add: Tensor| -> Result<Tensor> {
            Ok(match cur {
                Some(c) => (c + add)?,
                None => add,
            })
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output =
                    Some(acc(&self.cur_model_output, mul(model_output, (1.0f64 / 6.0) as f32)?)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            1 | 2 => {
                self.cur_model_output =
                    Some(acc(&self.cur_model_output, mul(model_output, (1.0f64 / 3.0) as f32)?)?);
                model_output.clone()
            }
            _ => {
                let out = acc(&self.cur_model_output, mul(model_output, (1.0f64 / 6.0) as f32)?)?;
                self.cur_model_output = None;
                out
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let n = self.num_inference_steps.expect("set_timesteps was called");
        let ratio = (self.config.num_train_timesteps / n) as i64;
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::invalid(format!(
                "{CLASS}: PLMS steps need 3 Runge-Kutta steps first"
            )));
        }
        let mut timestep = timestep;
        let mut prev_timestep = timestep - ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }
        let mut sample = sample.clone();
        let e = &self.ets;
        let model_output = if e.len() == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if e.len() == 1 && self.counter == 1 {
            sample = self
                .cur_sample
                .take()
                .ok_or_else(|| Error::invalid(format!("{CLASS}: missing the first sample")))?;
            div(&(model_output + &e[0])?, 2.0)?
        } else if e.len() == 2 {
            div(&(mul(&e[1], 3.0)? - &e[0])?, 2.0)?
        } else if e.len() == 3 {
            div(&((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?, 12.0)?
        } else {
            let sum = (((mul(&e[3], 55.0)? - mul(&e[2], 59.0)?)? + mul(&e[1], 37.0)?)?
                - mul(&e[0], 9.0)?)?;
            mul(&sum, (1.0f64 / 24.0) as f32)?
        };
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for PNDMScheduler {
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
        // Ascending, as diffusers' `_timesteps`.
        let ts: Vec<i64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .map(|t| np_round(t) as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n_train / n;
                (0..n).map(|i| (i * ratio) as i64 + c.steps_offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / n as f64;
                np_arange(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .rev()
                    .map(|t| np_round(t) as i64 - 1)
                    .collect()
            }
        };
        let (prk, plms): (Vec<i64>, Vec<i64>) = if c.skip_prk_steps {
            let len = ts.len();
            let mut plms: Vec<i64> = ts[..len - 1].to_vec();
            if len >= 2 {
                plms.push(ts[len - 2]);
            }
            plms.push(ts[len - 1]);
            plms.reverse();
            (vec![], plms)
        } else {
            if ts.len() < 4 {
                return Err(Error::invalid(format!(
                    "{CLASS}: the Runge-Kutta warm-up needs at least 4 steps (or skip_prk_steps)"
                )));
            }
            let half = (n_train / n / 2) as i64;
            let mut base = Vec::with_capacity(8);
            for &t in &ts[ts.len() - 4..] {
                base.push(t);
                base.push(t + half);
            }
            base.pop();
            let mut rep = Vec::with_capacity(base.len() * 2);
            for &t in &base {
                rep.push(t);
                rep.push(t);
            }
            let mut prk: Vec<i64> = rep[1..rep.len() - 1].to_vec();
            prk.reverse();
            let mut plms: Vec<i64> = ts[..ts.len() - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.timesteps = prk.iter().chain(&plms).map(|&t| t as f64).collect();
        self.prk_timesteps = prk;
        self.num_inference_steps = Some(n);
        self.ets.clear();
        self.counter = 0;
        self.cur_sample = None;
        self.cur_model_output = None;
        Ok(())
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        to_f32(sample)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _generators: &mut Generators,
    ) -> Result<Tensor> {
        same_shape(model_output, sample, "PNDMScheduler::step")?;
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        let t = int_timestep(timestep, CLASS)?;
        let (model_output, sample) = (to_f32(model_output)?, to_f32(sample)?);
        if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(&model_output, t, &sample)
        } else {
            self.step_plms(&model_output, t, &sample)
        }
    }

    fn add_noise(
        &self,
        original_samples: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        same_shape(original_samples, noise, "PNDMScheduler::add_noise")?;
        let a = alpha_at(&self.schedule.alphas_cumprod, int_timestep(timestep, CLASS)?, CLASS)?;
        alpha_add_noise(original_samples, noise, a)
    }
}
