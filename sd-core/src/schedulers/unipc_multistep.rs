//! `UniPCMultistepScheduler` of diffusers 0.42 (Zhao et al. 2023, "UniPC"): a multistep
//! predictor (UniP) with a corrector (UniC) applied at the start of the next step, with the
//! B(h) variants `bh1` / `bh2` and noise or data prediction.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    alpha_sigma, check_choice, check_sigma_choice, exponential_sigmas, int_timestep, interp_sigmas,
    karras_sigmas, lambda, log_sigmas, multistep_timesteps, reject_flag, scheduler_config,
    sigma_at, sigma_to_t, solve_f32, train_sigmas, training_schedule, StepIndex, STANDARD_BETAS,
};
use super::config::{
    BetaSchedule, ConfigReader, FinalSigmasType, PredictionType, SchedulerConfig, SolverType,
    TimeShiftType, TimestepSpacing,
};
use super::numeric::{np_linspace, np_round};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "UniPCMultistepScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `UniPCMultistepScheduler`, with its defaults.
    pub struct UniPCMultistepConfig {
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
        /// The solver order, 1 to 3.
        solver_order: usize = 2 => usize,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// Dynamic thresholding is not supported: `true` is a config error.
        thresholding: bool = false => bool,
        /// Kept for config round trips (thresholding is not supported).
        dynamic_thresholding_ratio: f64 = 0.995 => f64,
        /// Kept for config round trips (thresholding is not supported).
        sample_max_value: f64 = 1.0 => f64,
        /// Use the data-prediction (`x_0`) form of the updates (the default).
        predict_x0: bool = true => bool,
        /// `bh1` or `bh2` (the default); the DPM-Solver names are read as `bh2`, as diffusers does.
        solver_type: SolverType = SolverType::Bh2 => choice,
        /// Use lower-order steps at the end.
        lower_order_final: bool = true => bool,
        /// Step indices (minus one) at which the corrector is skipped.
        disable_corrector: Vec<usize> = vec![] => usize_vec,
        /// Use the Karras et al. (2022) sigma schedule (rho = 7).
        use_karras_sigmas: bool = false => bool,
        /// Use exponentially spaced sigmas.
        use_exponential_sigmas: bool = false => bool,
        /// Beta sigmas need scipy's beta quantile function; not supported (an error if true).
        use_beta_sigmas: bool = false => bool,
        /// Flow-matching sigmas are not supported (an error if true).
        use_flow_sigmas: bool = false => bool,
        /// Kept for config round trips (flow sigmas are not supported).
        flow_shift: f64 = 1.0 => f64,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
        /// The sigma after the last step: 0 or the smallest sigma.
        final_sigmas_type: FinalSigmasType = FinalSigmasType::Zero => choice,
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
        /// Dynamic shifting (flow models) is not supported (an error if true).
        use_dynamic_shifting: bool = false => bool,
        /// Kept for config round trips.
        time_shift_type: TimeShiftType = TimeShiftType::Exponential => choice,
        /// Lowest sigma of Karras/exponential schedules (default: the schedule's own).
        sigma_min: Option<f64> = None => opt_f64,
        /// Highest sigma of Karras/exponential schedules (default: the schedule's own).
        sigma_max: Option<f64> = None => opt_f64,
        /// Flow models only; must be null.
        shift_terminal: Option<f64> = None => opt_f64,
    }
}

impl UniPCMultistepConfig {
    /// Reads the config with `UniPCMultistepScheduler.from_config(config)` semantics.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::read(&mut ConfigReader::new(config, CLASS))
    }

    fn read(r: &mut ConfigReader<'_>) -> Result<Self> {
        let mut c = Self::read_fields(r)?;
        r.null("solver_p")?;
        check_choice(r, CLASS, "beta_schedule", c.beta_schedule, STANDARD_BETAS)?;
        check_sigma_choice(r, c.use_karras_sigmas, c.use_exponential_sigmas, c.use_beta_sigmas)?;
        reject_flag(r, "thresholding", c.thresholding, "dynamic thresholding")?;
        reject_flag(r, "use_flow_sigmas", c.use_flow_sigmas, "flow sigmas")?;
        reject_flag(r, "use_dynamic_shifting", c.use_dynamic_shifting, "dynamic shifting")?;
        if c.shift_terminal.is_some() {
            return Err(r.error(
                "shift_terminal",
                "is only supported with use_flow_sigmas, which is not supported",
            ));
        }
        if !(1..=3).contains(&c.solver_order) {
            return Err(
                r.error("solver_order", format!("must be 1, 2 or 3, got {}", c.solver_order))
            );
        }
        if !matches!(c.solver_type, SolverType::Bh1 | SolverType::Bh2) {
            c.solver_type = SolverType::Bh2;
        }
        Ok(c)
    }
}

/// diffusers' `UniPCMultistepScheduler`: integer timesteps, float32 sigmas, `init_noise_sigma` 1
/// and no input scaling.
#[derive(Debug, Clone)]
pub struct UniPCMultistepScheduler {
    config: UniPCMultistepConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
    index: StepIndex,
    pred_original_sample: Option<Tensor>,
}

impl UniPCMultistepScheduler {
    /// `UniPCMultistepScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = UniPCMultistepConfig::read(&mut r)?;
        let mut values = c.write();
        values.insert("solver_p".into(), serde_json::Value::Null);
        let resolved = r.resolved(values);
        let mut schedule = training_schedule(
            CLASS,
            &resolved,
            c.beta_schedule,
            c.beta_start,
            c.beta_end,
            c.num_train_timesteps,
            c.trained_betas.as_deref(),
            c.rescale_betas_zero_snr,
        )?;
        if c.rescale_betas_zero_snr {
            if let Some(last) = schedule.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let n = c.num_train_timesteps;
        let timesteps = np_linspace(0.0, (n - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32 as f64)
            .collect();
        let sigmas = train_sigmas(&schedule.alphas_cumprod);
        let order = c.solver_order;
        Ok(Self {
            config: c,
            resolved,
            schedule,
            timesteps,
            sigmas,
            num_inference_steps: None,
            model_outputs: vec![None; order],
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
            index: StepIndex::default(),
            pred_original_sample: None,
        })
    }

    /// `UniPCMultistepScheduler(**config)`.
    pub fn new(config: UniPCMultistepConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &UniPCMultistepConfig {
        &self.config
    }

    /// The training `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(if self.config.predict_x0 {
            match self.config.prediction_type {
                PredictionType::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
                PredictionType::Sample => model_output.clone(),
                PredictionType::VPrediction => {
                    (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?
                }
            }
        } else {
            match self.config.prediction_type {
                PredictionType::Epsilon => model_output.clone(),
                PredictionType::Sample => div(&(sample - mul(model_output, alpha_t)?)?, sigma_t)?,
                PredictionType::VPrediction => {
                    (mul(model_output, alpha_t)? + mul(sample, sigma_t)?)?
                }
            }
        })
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
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i: u64 = 1;
        let b_h = match self.config.solver_type {
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
        Ok(if self.config.predict_x0 {
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
        let n = self.model_outputs.len();
        let m0 = self.model_outputs[n - 1].as_ref().expect("current model output");
        let k =
            self.coefficients(self.sigmas[i + 1], self.sigmas[i], |j| self.sigmas[i - j], order);
        let mut d1s = Vec::new();
        for j in 1..order {
            let mi = self.model_outputs[n - 1 - j]
                .as_ref()
                .ok_or_else(|| Error::invalid(format!("{CLASS}: missing previous model output")))?;
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
        let scale = if self.config.predict_x0 { k.alpha_t * k.b_h } else { k.sigma_t * k.b_h };
        Ok((x_t_ - mul(&pred_res, scale)?)?)
    }

    fn corrector(
        &self,
        i: usize,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let n = self.model_outputs.len();
        let m0 = self.model_outputs[n - 1]
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{CLASS}: missing model output")))?;
        let k = self.coefficients(
            self.sigmas[i],
            self.sigmas[i - 1],
            |j| self.sigmas[i - (j + 1)],
            order,
        );
        let mut d1s = Vec::new();
        for j in 1..order {
            let mi = self.model_outputs[n - 1 - j]
                .as_ref()
                .ok_or_else(|| Error::invalid(format!("{CLASS}: missing previous model output")))?;
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
        let scale = if self.config.predict_x0 { k.alpha_t * k.b_h } else { k.sigma_t * k.b_h };
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

impl Scheduler for UniPCMultistepScheduler {
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
        let int_ts = multistep_timesteps(c.timestep_spacing, n_train, n_train, n, c.steps_offset);
        let train = train_sigmas(&self.schedule.alphas_cumprod);
        let lo = c.sigma_min.unwrap_or(train[0] as f64);
        let hi = c.sigma_max.unwrap_or(train[n_train - 1] as f64);
        let (sigmas, timesteps, sigma_last): (Vec<f64>, Vec<i64>, f32) = if c.use_karras_sigmas
            || c.use_exponential_sigmas
        {
            let logs = log_sigmas(&train);
            let karras = c.use_karras_sigmas;
            let s = if karras { karras_sigmas(lo, hi, n) } else { exponential_sigmas(lo, hi, n) };
            let t = s
                .iter()
                .map(|&x| {
                    let t = sigma_to_t(x, &logs);
                    (if karras { np_round(t) } else { t }) as i64
                })
                .collect();
            let last = match c.final_sigmas_type {
                FinalSigmasType::Zero => 0.0,
                FinalSigmasType::SigmaMin => s[n - 1] as f32,
            };
            (s, t, last)
        } else {
            let ts64: Vec<f64> = int_ts.iter().map(|&t| t as f64).collect();
            let last = match c.final_sigmas_type {
                FinalSigmasType::Zero => 0.0,
                FinalSigmasType::SigmaMin => {
                    let a0 = self.schedule.alphas_cumprod[0];
                    ((1.0 - a0) / a0).sqrt()
                }
            };
            (interp_sigmas(&ts64, &train), int_ts, last)
        };
        let mut s32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        s32.push(sigma_last);
        self.timesteps = timesteps.iter().map(|&t| t as f64).collect();
        self.sigmas = s32;
        self.num_inference_steps = Some(self.timesteps.len());
        self.model_outputs = vec![None; c.solver_order];
        self.lower_order_nums = 0;
        self.this_order = 0;
        self.last_sample = None;
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
        same_shape(model_output, sample, "UniPCMultistepScheduler::step")?;
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        int_timestep(timestep, CLASS)?;
        let i = self.index.init(&self.timesteps, timestep, CLASS, true)?;
        sigma_at(&self.sigmas, i + 1, CLASS)?;
        let (model_output, mut sample) = (to_f32(model_output)?, to_f32(sample)?);
        let use_corrector = i > 0
            && !self.config.disable_corrector.contains(&(i - 1))
            && self.last_sample.is_some();
        let converted = self.convert_model_output(&model_output, &sample, i)?;
        if use_corrector {
            let last = self.last_sample.clone().expect("checked");
            sample = self.corrector(i, &converted, &last, self.this_order)?;
        }
        self.model_outputs.rotate_left(1);
        let n = self.model_outputs.len();
        self.model_outputs[n - 1] = Some(converted.clone());
        let len = self.timesteps.len();
        let this_order = if self.config.lower_order_final {
            self.config.solver_order.min(len - i)
        } else {
            self.config.solver_order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predictor(i, &sample, self.this_order)?;
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.index.step = Some(i + 1);
        self.pred_original_sample = if self.config.predict_x0 { Some(converted) } else { None };
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
        same_shape(original_samples, noise, "UniPCMultistepScheduler::add_noise")?;
        let i = self.index.for_add_noise(&self.timesteps, timestep, CLASS, true)?;
        let (alpha_t, sigma_t) = alpha_sigma(sigma_at(&self.sigmas, i, CLASS)?);
        Ok((mul(&to_f32(original_samples)?, alpha_t)? + mul(&to_f32(noise)?, sigma_t)?)?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }
}
