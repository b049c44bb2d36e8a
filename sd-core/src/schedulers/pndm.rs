//! `PNDMScheduler` of diffusers 0.42 (pseudo numerical methods, Liu et al. 2022): linear
//! multistep (PLMS) steps, after Runge-Kutta (PRK) warm-up steps unless `skip_prk_steps` (which
//! Stable Diffusion's configs set).

use candle_core::Tensor;

use super::common::{
    alpha_at, div, int_timestep, mul, scheduler_config, ClassConfig, EPSILON_OR_V, STANDARD_BETAS,
};
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, TimestepSpacing};
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "PNDMScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `PNDMScheduler`, with its defaults.
    pub struct PNDMConfig for "PNDMScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
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

impl ClassConfig for PNDMConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        r.check_among("beta_schedule", self.beta_schedule, STANDARD_BETAS)?;
        r.check_among("prediction_type", self.prediction_type, EPSILON_OR_V)?;
        Ok(self)
    }
}

/// diffusers' `PNDMScheduler`. With `skip_prk_steps` and `n` steps the schedule has `n + 1`
/// integer timesteps (the second one repeated: the first PLMS step is a two-evaluation
/// predictor-corrector); without it, 12 Runge-Kutta timesteps come first.
#[derive(Debug, Clone)]
pub struct PNDMScheduler {
    state: SchedulerState<PNDMConfig>,
    final_alpha_cumprod: f32,
    prk_timesteps: Vec<i64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

scheduler_api!(PNDMScheduler, PNDMConfig, typed_config);

impl PNDMScheduler {
    /// `PNDMScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut state = Self::load_state(config)?;
        // diffusers' PNDM has no timesteps before `set_timesteps`.
        state.timesteps.clear();
        let final_alpha_cumprod = state.schedule.final_alpha_cumprod(state.config.set_alpha_to_one);
        Ok(Self {
            state,
            final_alpha_cumprod,
            prk_timesteps: vec![],
            counter: 0,
            ets: vec![],
            cur_sample: None,
            cur_model_output: None,
        })
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        if t >= 0 {
            alpha_at(&self.state.schedule.alphas_cumprod, t, CLASS)
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
        let alpha_prod_t = alpha_at(&self.state.schedule.alphas_cumprod, timestep, CLASS)?;
        let alpha_prod_t_prev = self.alpha(prev_timestep)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.state.config.prediction_type {
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
        let n = self.state.num_inference_steps.expect("set_timesteps was called");
        let half = (self.state.config.num_train_timesteps / n / 2) as i64;
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
        let n = self.state.num_inference_steps.expect("set_timesteps was called");
        let ratio = (self.state.config.num_train_timesteps / n) as i64;
        if !self.state.config.skip_prk_steps && self.ets.len() < 3 {
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

impl SchedulerClass for PNDMScheduler {
    scheduler_state!(CLASS, Parametrization::AlphasCumprod, state: PNDMConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.state.config;
        let n_train = c.num_train_timesteps;
        let n = num_inference_steps;
        // Ascending, as diffusers' `_timesteps`.
        let mut ts = self.state.discrete_timesteps(n);
        ts.reverse();
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
        let timesteps = prk.iter().chain(&plms).map(|&t| t as f64).collect();
        self.state.set_schedule(timesteps, vec![], n);
        self.prk_timesteps = prk;
        self.ets.clear();
        self.counter = 0;
        self.cur_sample = None;
        self.cur_model_output = None;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _generators: &mut Generators,
    ) -> Result<Tensor> {
        let t = int_timestep(timestep, CLASS)?;
        if self.counter < self.prk_timesteps.len() && !self.state.config.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }
}
