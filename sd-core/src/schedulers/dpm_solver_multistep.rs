//! `DPMSolverMultistepScheduler` of diffusers 0.42: DPM-Solver++ ("DPM++ 2M", with Karras sigmas
//! "DPM++ 2M Karras"), its stochastic variant ("DPM++ 2M SDE", noise drawn from the run's
//! generators at every step) and the original DPM-Solver, of order 1 to 3.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    alpha_sigma, check_choice, check_sigma_choice, exponential_sigmas, int_timestep, interp_sigmas,
    karras_sigmas, lambda, log_sigmas, multistep_timesteps, reject_flag, scheduler_config,
    sigma_at, sigma_to_t, train_sigmas, training_schedule, StepIndex, STANDARD_BETAS,
};
use super::config::{
    AlgorithmType, BetaSchedule, ConfigReader, FinalSigmasType, PredictionType, SchedulerConfig,
    SolverType, TimeShiftType, TimestepSpacing, VarianceType,
};
use super::numeric::{np_linspace, np_round};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "DPMSolverMultistepScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `DPMSolverMultistepScheduler`, with its defaults.
    pub struct DPMSolverMultistepConfig {
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
        /// The solver order, 1 to 3 (2 is "2M").
        solver_order: usize = 2 => usize,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// Dynamic thresholding is not supported: `true` is a config error.
        thresholding: bool = false => bool,
        /// Kept for config round trips (thresholding is not supported).
        dynamic_thresholding_ratio: f64 = 0.995 => f64,
        /// Kept for config round trips (thresholding is not supported).
        sample_max_value: f64 = 1.0 => f64,
        /// `dpmsolver++` (the default), `sde-dpmsolver++`, or the deprecated `dpmsolver` /
        /// `sde-dpmsolver` (`deis` is read as `dpmsolver++`, as diffusers does).
        algorithm_type: AlgorithmType = AlgorithmType::DpmSolverPlusPlus => choice,
        /// The second-order update: `midpoint` (the default) or `heun` (`logrho`, `bh1` and
        /// `bh2` are read as `midpoint`).
        solver_type: SolverType = SolverType::Midpoint => choice,
        /// Use lower-order steps at the end with fewer than 15 steps.
        lower_order_final: bool = true => bool,
        /// Use a first-order step at the very end.
        euler_at_final: bool = false => bool,
        /// Use the Karras et al. (2022) sigma schedule (rho = 7).
        use_karras_sigmas: bool = false => bool,
        /// Use exponentially spaced sigmas.
        use_exponential_sigmas: bool = false => bool,
        /// Beta sigmas need scipy's beta quantile function; not supported (an error if true).
        use_beta_sigmas: bool = false => bool,
        /// Sigmas evenly spaced in `log sigma` ("Lu lambdas").
        use_lu_lambdas: bool = false => bool,
        /// Flow-matching sigmas are not supported (an error if true).
        use_flow_sigmas: bool = false => bool,
        /// Kept for config round trips (flow sigmas are not supported).
        flow_shift: f64 = 1.0 => f64,
        /// The sigma after the last step: 0 or the smallest training sigma.
        final_sigmas_type: FinalSigmasType = FinalSigmasType::Zero => choice,
        /// Timesteps whose `lambda` is below this are not used (`-inf`: all are).
        lambda_min_clipped: f64 = f64::NEG_INFINITY => f64,
        /// `learned` / `learned_range` when the model also predicts a variance (the first 3
        /// channels are then the noise).
        variance_type: Option<VarianceType> = None => opt_choice,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
        /// Rescale betas to a zero terminal SNR.
        rescale_betas_zero_snr: bool = false => bool,
        /// Dynamic shifting (flow models) is not supported (an error if true).
        use_dynamic_shifting: bool = false => bool,
        /// Kept for config round trips.
        time_shift_type: TimeShiftType = TimeShiftType::Exponential => choice,
    }
}

impl DPMSolverMultistepConfig {
    /// Reads the config with `DPMSolverMultistepScheduler.from_config(config)` semantics.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::read(&mut ConfigReader::new(config, CLASS))
    }

    fn read(r: &mut ConfigReader<'_>) -> Result<Self> {
        let mut c = Self::read_fields(r)?;
        check_choice(r, CLASS, "beta_schedule", c.beta_schedule, STANDARD_BETAS)?;
        check_sigma_choice(r, c.use_karras_sigmas, c.use_exponential_sigmas, c.use_beta_sigmas)?;
        reject_flag(r, "thresholding", c.thresholding, "dynamic thresholding")?;
        reject_flag(r, "use_flow_sigmas", c.use_flow_sigmas, "flow sigmas")?;
        reject_flag(r, "use_dynamic_shifting", c.use_dynamic_shifting, "dynamic shifting")?;
        if !(1..=3).contains(&c.solver_order) {
            return Err(
                r.error("solver_order", format!("must be 1, 2 or 3, got {}", c.solver_order))
            );
        }
        // diffusers checks the algorithm as given (so `deis` needs `sigma_min` too), then reads
        // `deis` as `dpmsolver++`.
        let plus_plus = matches!(
            c.algorithm_type,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus
        );
        if !plus_plus && c.final_sigmas_type == FinalSigmasType::Zero {
            return Err(r.error(
                "final_sigmas_type",
                format!(
                    "`zero` is not supported for algorithm_type `{}`; use `sigma_min`",
                    c.algorithm_type
                ),
            ));
        }
        if c.algorithm_type == AlgorithmType::Deis {
            c.algorithm_type = AlgorithmType::DpmSolverPlusPlus;
        }
        if !matches!(c.solver_type, SolverType::Midpoint | SolverType::Heun) {
            c.solver_type = SolverType::Midpoint;
        }
        if c.algorithm_type == AlgorithmType::SdeDpmSolver && c.solver_order == 3 {
            return Err(r.error(
                "solver_order",
                "third order is not implemented for `sde-dpmsolver` (diffusers neither)",
            ));
        }
        if let Some(v) = c.variance_type {
            check_choice(
                r,
                CLASS,
                "variance_type",
                v,
                &[VarianceType::Learned, VarianceType::LearnedRange],
            )?;
        }
        Ok(c)
    }

    fn plus_plus(&self) -> bool {
        matches!(
            self.algorithm_type,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus
        )
    }

    fn sde(&self) -> bool {
        matches!(
            self.algorithm_type,
            AlgorithmType::SdeDpmSolverPlusPlus | AlgorithmType::SdeDpmSolver
        )
    }
}

/// diffusers' `DPMSolverMultistepScheduler`: integer timesteps, float32 sigmas (with a final 0 or
/// `sigma_min`), `init_noise_sigma` 1 and no input scaling.
#[derive(Debug, Clone)]
pub struct DPMSolverMultistepScheduler {
    config: DPMSolverMultistepConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    /// `sigma_min` / `sigma_max` kept from the source config (diffusers reads them with
    /// `hasattr(self.config, ...)`).
    hidden_sigma_min: Option<f64>,
    hidden_sigma_max: Option<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    index: StepIndex,
    pred_original_sample: Option<Tensor>,
}

impl DPMSolverMultistepScheduler {
    /// `DPMSolverMultistepScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = DPMSolverMultistepConfig::read(&mut r)?;
        let (hidden_sigma_min, hidden_sigma_max) =
            (r.hidden_f64("sigma_min"), r.hidden_f64("sigma_max"));
        let resolved = r.resolved(c.write());
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
            hidden_sigma_min,
            hidden_sigma_max,
            timesteps,
            sigmas,
            num_inference_steps: None,
            model_outputs: vec![None; order],
            lower_order_nums: 0,
            index: StepIndex::default(),
            pred_original_sample: None,
        })
    }

    /// `DPMSolverMultistepScheduler(**config)`.
    pub fn new(config: DPMSolverMultistepConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &DPMSolverMultistepConfig {
        &self.config
    }

    /// The training `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    /// `lambda_t = log(alpha_t) - log(sigma_t)` of the training schedule, float32.
    fn train_lambdas(&self) -> Vec<f32> {
        self.schedule
            .alphas_cumprod
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .collect()
    }

    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let model_output = match (c.variance_type, c.prediction_type) {
            (Some(_), PredictionType::Epsilon) => model_output.narrow(1, 0, 3)?,
            _ => model_output.clone(),
        };
        Ok(if c.plus_plus() {
            match c.prediction_type {
                PredictionType::Epsilon => div(&(sample - mul(&model_output, sigma_t)?)?, alpha_t)?,
                PredictionType::Sample => model_output,
                PredictionType::VPrediction => {
                    (mul(sample, alpha_t)? - mul(&model_output, sigma_t)?)?
                }
            }
        } else {
            match c.prediction_type {
                PredictionType::Epsilon => model_output,
                PredictionType::Sample => div(&(sample - mul(&model_output, alpha_t)?)?, sigma_t)?,
                PredictionType::VPrediction => {
                    (mul(&model_output, alpha_t)? + mul(sample, sigma_t)?)?
                }
            }
        })
    }

    /// `sum(coef_k * x_k)` accumulated left to right, each term rounded as torch does.
    fn combine(terms: &[(f32, &Tensor)]) -> Result<Tensor> {
        let mut acc = mul(terms[0].1, terms[0].0)?;
        for (coef, t) in &terms[1..] {
            acc = (acc + mul(t, *coef)?)?;
        }
        Ok(acc)
    }

    fn first_order(
        &self,
        i: usize,
        m0: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match self.config.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis => {
                Self::combine(&[(sigma_t / sigma_s, sample), (-(alpha_t * ((-h).exp() - 1.0)), m0)])
            }
            AlgorithmType::DpmSolver => {
                Self::combine(&[(alpha_t / alpha_s, sample), (-(sigma_t * (h.exp() - 1.0)), m0)])
            }
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let noise = noise.expect("sde noise");
                let e2 = (-2.0 * h).exp();
                Self::combine(&[
                    (sigma_t / sigma_s * (-h).exp(), sample),
                    (alpha_t * (1.0 - e2), m0),
                    (sigma_t * (1.0 - e2).sqrt(), noise),
                ])
            }
            AlgorithmType::SdeDpmSolver => {
                let noise = noise.expect("sde noise");
                Self::combine(&[
                    (alpha_t / alpha_s, sample),
                    (-(2.0 * (sigma_t * (h.exp() - 1.0))), m0),
                    (sigma_t * ((2.0 * h).exp() - 1.0).sqrt(), noise),
                ])
            }
        }
    }

    fn second_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let n = self.model_outputs.len();
        let m0 = self.model_outputs[n - 1].as_ref().expect("current model output");
        let m1 = self.model_outputs[n - 2]
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{CLASS}: missing previous model output")))?;
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d0 = m0;
        let heun = self.config.solver_type == SolverType::Heun;
        match self.config.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis => {
                let e = (-h).exp() - 1.0;
                let c1 = if heun { alpha_t * (e / h + 1.0) } else { -(0.5 * (alpha_t * e)) };
                Self::combine(&[(sigma_t / sigma_s0, sample), (-(alpha_t * e), d0), (c1, &d1)])
            }
            AlgorithmType::DpmSolver => {
                let e = h.exp() - 1.0;
                let c1 = if heun { -(sigma_t * (e / h - 1.0)) } else { -(0.5 * (sigma_t * e)) };
                Self::combine(&[(alpha_t / alpha_s0, sample), (-(sigma_t * e), d0), (c1, &d1)])
            }
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let noise = noise.expect("sde noise");
                let e2 = (-2.0 * h).exp();
                let c1 = if heun {
                    alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
                } else {
                    0.5 * (alpha_t * (1.0 - e2))
                };
                Self::combine(&[
                    (sigma_t / sigma_s0 * (-h).exp(), sample),
                    (alpha_t * (1.0 - e2), d0),
                    (c1, &d1),
                    (sigma_t * (1.0 - e2).sqrt(), noise),
                ])
            }
            AlgorithmType::SdeDpmSolver => {
                let noise = noise.expect("sde noise");
                let e = h.exp() - 1.0;
                let c1 = if heun { -(2.0 * (sigma_t * (e / h - 1.0))) } else { -(sigma_t * e) };
                Self::combine(&[
                    (alpha_t / alpha_s0, sample),
                    (-(2.0 * (sigma_t * e)), d0),
                    (c1, &d1),
                    (sigma_t * ((2.0 * h).exp() - 1.0).sqrt(), noise),
                ])
            }
        }
    }

    fn third_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let n = self.model_outputs.len();
        let missing = || Error::invalid(format!("{CLASS}: missing previous model output"));
        let m0 = self.model_outputs[n - 1].as_ref().expect("current model output");
        let m1 = self.model_outputs[n - 2].as_ref().ok_or_else(missing)?;
        let m2 = self.model_outputs[n - 3].as_ref().ok_or_else(missing)?;
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul(&diff, 1.0 / (r0 + r1))?;
        match self.config.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis => {
                let e = (-h).exp() - 1.0;
                Self::combine(&[
                    (sigma_t / sigma_s0, sample),
                    (-(alpha_t * e), m0),
                    (alpha_t * (e / h + 1.0), &d1),
                    (-(alpha_t * ((e + h) / (h * h) - 0.5)), &d2),
                ])
            }
            AlgorithmType::DpmSolver => {
                let e = h.exp() - 1.0;
                Self::combine(&[
                    (alpha_t / alpha_s0, sample),
                    (-(sigma_t * e), m0),
                    (-(sigma_t * (e / h - 1.0)), &d1),
                    (-(sigma_t * ((e - h) / (h * h) - 0.5)), &d2),
                ])
            }
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let noise = noise.expect("sde noise");
                let e2 = (-2.0 * h).exp();
                let h2 = 2.0 * h;
                Self::combine(&[
                    (sigma_t / sigma_s0 * (-h).exp(), sample),
                    (alpha_t * (1.0 - e2), m0),
                    (alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0), &d1),
                    (alpha_t * ((1.0 - e2 - 2.0 * h) / (h2 * h2) - 0.5), &d2),
                    (sigma_t * (1.0 - e2).sqrt(), noise),
                ])
            }
            AlgorithmType::SdeDpmSolver => Err(Error::invalid(format!(
                "{CLASS}: third order is not implemented for sde-dpmsolver"
            ))),
        }
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
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
        // searchsorted(flip(lambda_t), lambda_min_clipped): how many lambdas lie below the clip.
        let clip = c.lambda_min_clipped as f32;
        let clipped_idx = self.train_lambdas().iter().filter(|&&l| l < clip).count();
        let last_timestep = n_train - clipped_idx;
        let int_ts =
            multistep_timesteps(c.timestep_spacing, n_train, last_timestep, n, c.steps_offset);
        if int_ts.is_empty() {
            return Err(Error::invalid(format!(
                "{CLASS}: no timesteps left after lambda_min_clipped"
            )));
        }
        let train = train_sigmas(&self.schedule.alphas_cumprod);
        let logs = log_sigmas(&train);
        let round_ts = c.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let lo = self.hidden_sigma_min.unwrap_or(train[0] as f64);
        let hi = self.hidden_sigma_max.unwrap_or(train[n_train - 1] as f64);
        let to_ts = |sigmas: &[f64], round: bool| -> Vec<i64> {
            sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    (if round { np_round(t) } else { t }) as i64
                })
                .collect()
        };
        let (sigmas, timesteps): (Vec<f64>, Vec<i64>) = if c.use_karras_sigmas {
            let s = karras_sigmas(lo, hi, n);
            let t = to_ts(&s, round_ts);
            (s, t)
        } else if c.use_lu_lambdas {
            let (lmin, lmax) = (logs[0] as f64, logs[n_train - 1] as f64);
            let s: Vec<f64> = np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|r| (lmax + r * (lmin - lmax)).exp())
                .collect();
            let t = to_ts(&s, round_ts);
            (s, t)
        } else if c.use_exponential_sigmas {
            let s = exponential_sigmas(lo, hi, n);
            let t = to_ts(&s, false);
            (s, t)
        } else {
            let ts64: Vec<f64> = int_ts.iter().map(|&t| t as f64).collect();
            (interp_sigmas(&ts64, &train), int_ts)
        };
        let sigma_last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0f32,
            FinalSigmasType::SigmaMin => {
                let a0 = self.schedule.alphas_cumprod[0];
                ((1.0 - a0) / a0).sqrt()
            }
        };
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(sigma_last);
        self.timesteps = timesteps.iter().map(|&t| t as f64).collect();
        self.sigmas = sigmas;
        self.num_inference_steps = Some(self.timesteps.len());
        self.model_outputs = vec![None; c.solver_order];
        self.lower_order_nums = 0;
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
        generators: &mut Generators,
    ) -> Result<Tensor> {
        if self.config.variance_type.is_none() {
            same_shape(model_output, sample, "DPMSolverMultistepScheduler::step")?;
        }
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        int_timestep(timestep, CLASS)?;
        let i = self.index.init(&self.timesteps, timestep, CLASS, true)?;
        sigma_at(&self.sigmas, i + 1, CLASS)?;
        let c = &self.config;
        let len = self.timesteps.len();
        let lower_order_final = i == len - 1
            && (c.euler_at_final
                || (c.lower_order_final && len < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == len && c.lower_order_final && len < 15;
        let sample = to_f32(sample)?;
        let converted = self.convert_model_output(&to_f32(model_output)?, &sample, i)?;
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(converted.clone());
        let noise = if c.sde() {
            Some(generators.randn(converted.dims(), converted.device())?)
        } else {
            None
        };
        let order = c.solver_order;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &converted, &sample, noise.as_ref())?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, &sample, noise.as_ref())?
        } else {
            self.third_order(i, &sample, noise.as_ref())?
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index.step = Some(i + 1);
        self.pred_original_sample = if self.config.plus_plus() { Some(converted) } else { None };
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
        same_shape(original_samples, noise, "DPMSolverMultistepScheduler::add_noise")?;
        let i = self.index.for_add_noise(&self.timesteps, timestep, CLASS, true)?;
        let (alpha_t, sigma_t) = alpha_sigma(sigma_at(&self.sigmas, i, CLASS)?);
        Ok((mul(&to_f32(original_samples)?, alpha_t)? + mul(&to_f32(noise)?, sigma_t)?)?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }

    fn order(&self) -> usize {
        1
    }
}
