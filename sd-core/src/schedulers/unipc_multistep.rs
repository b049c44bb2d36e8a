//! `UniPCMultistepScheduler` of diffusers 0.42 (Zhao et al. 2023, "UniPC"): a multistep
//! predictor (UniP) with a corrector (UniC) applied at the start of the next step, with the
//! B(h) variants `bh1` / `bh2` and noise or data prediction.

use candle_core::Tensor;

use super::common::{
    check_solver_order, div, int_timestep, mul, scheduler_config, ClassConfig, ConfigFields,
};
use super::config::{
    BetaSchedule, ConfigReader, FinalSigmasType, PredictionType, SchedulerConfig, SolverType,
    TimestepSpacing,
};
use super::multistep::{
    alpha_sigma, check_multistep_config, lambda, predicted_noise, predicted_x0, MultistepHistory,
};
use super::numeric::solve_f32;
use super::sigma_schedule::SigmaSpacing;
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState, SigmaRange,
};
use crate::rng::Generators;
use crate::Result;

const CLASS: &str = "UniPCMultistepScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `UniPCMultistepScheduler`, with its defaults.
    pub struct UniPCMultistepConfig for "UniPCMultistepScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
        /// The solver order, 1 to 3.
        solver_order: usize = 2 => usize,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        ..thresholding_keys,
        /// Use the data-prediction (`x_0`) form of the updates (the default).
        predict_x0: bool = true => bool,
        /// `bh1` or `bh2` (the default); the DPM-Solver names are read as `bh2`, as diffusers does.
        solver_type: SolverType = SolverType::Bh2 => choice,
        /// Use lower-order steps at the end.
        lower_order_final: bool = true => bool,
        /// Step indices (minus one) at which the corrector is skipped.
        disable_corrector: Vec<usize> = vec![] => usize_vec,
        ..sigma_schedule_flags,
        ..flow_sigma_keys,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
        /// The sigma after the last step: 0 or the smallest sigma.
        final_sigmas_type: FinalSigmasType = FinalSigmasType::Zero => choice,
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
        ..dynamic_shifting_keys,
        /// Lowest sigma of Karras/exponential schedules (default: the schedule's own).
        sigma_min: Option<f64> = None => opt_f64,
        /// Highest sigma of Karras/exponential schedules (default: the schedule's own).
        sigma_max: Option<f64> = None => opt_f64,
        /// Flow models only; must be null.
        shift_terminal: Option<f64> = None => opt_f64,
    }
}

impl ClassConfig for UniPCMultistepConfig {
    fn validate(mut self, r: &mut ConfigReader<'_>) -> Result<Self> {
        r.null("solver_p")?;
        check_multistep_config!(r, &self);
        if self.shift_terminal.is_some() {
            return Err(r.error(
                "shift_terminal",
                "is only supported with use_flow_sigmas, which is not supported",
            ));
        }
        check_solver_order(r, self.solver_order)?;
        if !matches!(self.solver_type, SolverType::Bh1 | SolverType::Bh2) {
            self.solver_type = SolverType::Bh2;
        }
        Ok(self)
    }

    /// `solver_p` (a scheduler object in diffusers) is always null here.
    fn resolved_values(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut values = self.write();
        values.insert("solver_p".into(), serde_json::Value::Null);
        values
    }
}

/// diffusers' `UniPCMultistepScheduler`: integer timesteps, float32 sigmas, `init_noise_sigma` 1
/// and no input scaling.
#[derive(Debug, Clone)]
pub struct UniPCMultistepScheduler {
    state: SchedulerState<UniPCMultistepConfig>,
    model_outputs: MultistepHistory,
    this_order: usize,
    last_sample: Option<Tensor>,
}

scheduler_api!(UniPCMultistepScheduler, UniPCMultistepConfig, typed_config);

impl UniPCMultistepScheduler {
    /// `UniPCMultistepScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut state = Self::load_state(config)?;
        let c = &state.config;
        // The class's own keys (what diffusers' `hasattr(self.config, ...)` finds).
        state.sigma_range = SigmaRange { min: c.sigma_min, max: c.sigma_max };
        let model_outputs = MultistepHistory::new(CLASS, state.config.solver_order);
        Ok(Self { state, model_outputs, this_order: 0, last_sample: None })
    }

    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let alpha_sigma_t = alpha_sigma(self.state.sigmas[i]);
        let prediction = self.state.config.prediction_type;
        if self.state.config.predict_x0 {
            predicted_x0(prediction, model_output, sample, alpha_sigma_t)
        } else {
            predicted_noise(prediction, model_output, sample, alpha_sigma_t)
        }
    }

    /// The shared part of the predictor and the corrector: `h`, `rks`, `D1s`, the `R`/`b`
    /// system and the scalars of the update, from the sigmas at `t` (target), `s0` (current)
    /// and the earlier ones `s_k = prev(k)`.
    fn coefficients(
        &self,
        sigma_t: f32,
        sigma_s0: f32,
        prev_sigma: impl Fn(usize) -> f32,
        order: usize,
    ) -> Coeffs {
        let (alpha_t, sigma_t) = alpha_sigma(sigma_t);
        let (alpha_s0, sigma_s0) = alpha_sigma(sigma_s0);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let mut rks = Vec::with_capacity(order);
        for k in 1..order {
            let (alpha_si, sigma_si) = alpha_sigma(prev_sigma(k));
            let lambda_si = lambda(alpha_si, sigma_si);
            rks.push((lambda_si - lambda_s0) / h);
        }
        rks.push(1.0);
        let hh = if self.state.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i: u64 = 1;
        let b_h = match self.state.config.solver_type {
            SolverType::Bh1 => hh,
            _ => hh.exp_m1(),
        };
        let mut r_mat = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r_mat.push(rks.iter().map(|&r| powi_f32(r, i - 1)).collect::<Vec<f32>>());
            b.push(h_phi_k * factorial_i as f32 / b_h);
            factorial_i *= i as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0f64 / factorial_i as f64) as f32;
        }
        Coeffs { alpha_t, sigma_t, alpha_s0, sigma_s0, rks, h_phi_1, b_h, r_mat, b }
    }

    /// `x_t_` of both updates: the first-order part.
    fn base_update(&self, k: &Coeffs, x: &Tensor, m0: &Tensor) -> Result<Tensor> {
        Ok(if self.state.config.predict_x0 {
            (mul(x, k.sigma_t / k.sigma_s0)? - mul(m0, k.alpha_t * k.h_phi_1)?)?
        } else {
            (mul(x, k.alpha_t / k.alpha_s0)? - mul(m0, k.sigma_t * k.h_phi_1)?)?
        })
    }

    /// `einsum("k,bkc...->bc...", rhos, D1s)`.
    fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Tensor> {
        let mut acc = mul(&d1s[0], rhos[0])?;
        for (r, d) in rhos.iter().zip(d1s).skip(1) {
            acc = (acc + mul(d, *r)?)?;
        }
        Ok(acc)
    }

    fn predictor(&self, i: usize, sample: &Tensor, order: usize) -> Result<Tensor> {
        let m0 = self.model_outputs.get(0)?;
        let k = self.coefficients(
            self.state.sigmas[i + 1],
            self.state.sigmas[i],
            |j| self.state.sigmas[i - j],
            order,
        );
        let mut d1s = Vec::new();
        for j in 1..order {
            let mi = self.model_outputs.get(j)?;
            d1s.push(div(&(mi - m0)?, k.rks[j - 1])?);
        }
        let x_t_ = self.base_update(&k, sample, m0)?;
        if d1s.is_empty() {
            return Ok(x_t_);
        }
        let rhos_p = if order == 2 {
            vec![0.5f32]
        } else {
            let r: Vec<Vec<f32>> =
                k.r_mat[..order - 1].iter().map(|row| row[..order - 1].to_vec()).collect();
            solve_f32(r, k.b[..order - 1].to_vec())?
        };
        let pred_res = Self::weighted_sum(&rhos_p, &d1s)?;
        let scale =
            if self.state.config.predict_x0 { k.alpha_t * k.b_h } else { k.sigma_t * k.b_h };
        Ok((x_t_ - mul(&pred_res, scale)?)?)
    }

    fn corrector(
        &self,
        i: usize,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let m0 = self.model_outputs.get(0)?;
        let k = self.coefficients(
            self.state.sigmas[i],
            self.state.sigmas[i - 1],
            |j| self.state.sigmas[i - (j + 1)],
            order,
        );
        let mut d1s = Vec::new();
        for j in 1..order {
            let mi = self.model_outputs.get(j)?;
            d1s.push(div(&(mi - m0)?, k.rks[j - 1])?);
        }
        let rhos_c =
            if order == 1 { vec![0.5f32] } else { solve_f32(k.r_mat.clone(), k.b.clone())? };
        let x_t_ = self.base_update(&k, last_sample, m0)?;
        let d1_t = (model_t - m0)?;
        let last = *rhos_c.last().expect("at least one rho");
        let inner = if d1s.is_empty() {
            mul(&d1_t, last)?
        } else {
            (Self::weighted_sum(&rhos_c[..rhos_c.len() - 1], &d1s)? + mul(&d1_t, last)?)?
        };
        let scale =
            if self.state.config.predict_x0 { k.alpha_t * k.b_h } else { k.sigma_t * k.b_h };
        Ok((x_t_ - mul(&inner, scale)?)?)
    }
}

/// `torch.pow(x, e)` for the small integer exponents UniPC uses (0, 1: exact; 2: `x * x`; higher:
/// repeated multiplication).
fn powi_f32(x: f32, e: usize) -> f32 {
    match e {
        0 => 1.0,
        1 => x,
        2 => x * x,
        _ => x.powi(e as i32),
    }
}

struct Coeffs {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    rks: Vec<f32>,
    h_phi_1: f32,
    b_h: f32,
    r_mat: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl SchedulerClass for UniPCMultistepScheduler {
    scheduler_state!(CLASS, Parametrization::AlphaSigma, state: UniPCMultistepConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.state.config;
        let spacing = SigmaSpacing::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        let schedule = self.state.multistep_schedule(num_inference_steps, spacing);
        let final_sigma = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => schedule.sigma_min,
        };
        self.model_outputs = MultistepHistory::new(CLASS, c.solver_order);
        self.this_order = 0;
        self.last_sample = None;
        self.state.set_multistep_schedule(schedule, final_sigma);
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _generators: &mut Generators,
    ) -> Result<Tensor> {
        int_timestep(timestep, CLASS)?;
        let i = self.state.step_index(timestep)?;
        self.state.sigma(i + 1)?;
        let c = &self.state.config;
        let use_corrector =
            i > 0 && !c.disable_corrector.contains(&(i - 1)) && self.last_sample.is_some();
        let converted = self.convert_model_output(model_output, sample, i)?;
        let sample = match &self.last_sample {
            Some(last) if use_corrector => self.corrector(i, &converted, last, self.this_order)?,
            _ => sample.clone(),
        };
        self.model_outputs.push(converted.clone());
        let len = self.state.timesteps.len();
        let this_order =
            if c.lower_order_final { c.solver_order.min(len - i) } else { c.solver_order };
        self.this_order = this_order.min(self.model_outputs.lower_order_nums() + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predictor(i, &sample, self.this_order)?;
        self.model_outputs.count_step(c.solver_order);
        let pred_original = c.predict_x0.then_some(converted);
        self.state.finish_step(i, pred_original);
        Ok(prev)
    }
}
