//! `DPMSolverMultistepScheduler` of diffusers 0.42: DPM-Solver++ ("DPM++ 2M", with Karras sigmas
//! "DPM++ 2M Karras"), its stochastic variant ("DPM++ 2M SDE", noise drawn from the run's
//! generators at every step) and the original DPM-Solver, of order 1 to 3.

use candle_core::Tensor;

use super::common::{
    check_solver_order, int_timestep, mul, same_shape, scheduler_config, ClassConfig,
};
use super::config::{
    AlgorithmType, BetaSchedule, ConfigReader, FinalSigmasType, PredictionType, SchedulerConfig,
    SolverType, TimestepSpacing, VarianceType,
};
use super::multistep::{
    alpha_sigma, check_multistep_config, lambda, predicted_noise, predicted_x0, MultistepHistory,
};
use super::numeric::np_linspace;
use super::sigma_schedule::{MultistepSchedule, SigmaSpacing, TrainSigmas};
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "DPMSolverMultistepScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `DPMSolverMultistepScheduler`, with its defaults.
    pub struct DPMSolverMultistepConfig for "DPMSolverMultistepScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
        /// The solver order, 1 to 3 (2 is "2M").
        solver_order: usize = 2 => usize,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        ..thresholding_keys,
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
        ..sigma_schedule_flags,
        /// Sigmas evenly spaced in `log sigma` ("Lu lambdas").
        use_lu_lambdas: bool = false => bool,
        ..flow_sigma_keys,
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
        ..dynamic_shifting_keys,
    }
}

impl ClassConfig for DPMSolverMultistepConfig {
    fn validate(mut self, r: &mut ConfigReader<'_>) -> Result<Self> {
        let c = &mut self;
        check_multistep_config!(r, &*c);
        check_solver_order(r, c.solver_order)?;
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
            r.check_among(
                "variance_type",
                v,
                &[VarianceType::Learned, VarianceType::LearnedRange],
            )?;
        }
        Ok(self)
    }
}

impl DPMSolverMultistepConfig {
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
    state: SchedulerState<DPMSolverMultistepConfig>,
    model_outputs: MultistepHistory,
}

scheduler_api!(DPMSolverMultistepScheduler, DPMSolverMultistepConfig, typed_config);

impl DPMSolverMultistepScheduler {
    /// `DPMSolverMultistepScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let state = Self::load_state(config)?;
        let model_outputs = MultistepHistory::new(CLASS, state.config.solver_order);
        Ok(Self { state, model_outputs })
    }

    /// `lambda_t = log(alpha_t) - log(sigma_t)` of the training schedule, float32.
    fn train_lambdas(&self) -> Vec<f32> {
        self.state
            .schedule
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
        let c = &self.state.config;
        let alpha_sigma_t = alpha_sigma(self.state.sigmas[i]);
        let model_output = match (c.variance_type, c.prediction_type) {
            (Some(_), PredictionType::Epsilon) => model_output.narrow(1, 0, 3)?,
            _ => model_output.clone(),
        };
        if c.plus_plus() {
            predicted_x0(c.prediction_type, &model_output, sample, alpha_sigma_t)
        } else {
            predicted_noise(c.prediction_type, &model_output, sample, alpha_sigma_t)
        }
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
        let (alpha_t, sigma_t) = alpha_sigma(self.state.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.state.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match self.state.config.algorithm_type {
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
        let (alpha_t, sigma_t) = alpha_sigma(self.state.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.state.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.state.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let m0 = self.model_outputs.get(0)?;
        let m1 = self.model_outputs.get(1)?;
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d0 = m0;
        let heun = self.state.config.solver_type == SolverType::Heun;
        match self.state.config.algorithm_type {
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
        let (alpha_t, sigma_t) = alpha_sigma(self.state.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.state.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.state.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.state.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let m0 = self.model_outputs.get(0)?;
        let m1 = self.model_outputs.get(1)?;
        let m2 = self.model_outputs.get(2)?;
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul(&diff, 1.0 / (r0 + r1))?;
        match self.state.config.algorithm_type {
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

impl SchedulerClass for DPMSolverMultistepScheduler {
    scheduler_state!(CLASS, Parametrization::AlphaSigma, state: DPMSolverMultistepConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.state.config;
        let n_train = c.num_train_timesteps;
        let n = num_inference_steps;
        // searchsorted(flip(lambda_t), lambda_min_clipped): how many lambdas lie below the clip.
        let clip = c.lambda_min_clipped as f32;
        let clipped_idx = self.train_lambdas().iter().filter(|&&l| l < clip).count();
        let last_timestep = n_train - clipped_idx;
        let int_ts = self.state.multistep_timesteps(n, last_timestep);
        if int_ts.is_empty() {
            return Err(Error::invalid(format!(
                "{CLASS}: no timesteps left after lambda_min_clipped"
            )));
        }
        let train = TrainSigmas::new(&self.state.schedule);
        let round_karras = c.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let spacing = SigmaSpacing::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        // Karras sigmas win over Lu lambdas, which win over exponential sigmas.
        let schedule = if c.use_lu_lambdas && spacing != Some(SigmaSpacing::Karras) {
            let logs = &train.log_sigmas;
            let (lmin, lmax) = (logs[0] as f64, logs[n_train - 1] as f64);
            let sigmas: Vec<f64> = np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|r| (lmax + r * (lmin - lmax)).exp())
                .collect();
            MultistepSchedule::respaced(&sigmas, &train.int_timesteps(&sigmas, round_karras))
        } else {
            train.multistep_schedule(&int_ts, spacing, n, self.state.sigma_range, round_karras)
        };
        let final_sigma = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train.sigmas[0],
        };
        self.model_outputs = MultistepHistory::new(CLASS, c.solver_order);
        self.state.set_multistep_schedule(schedule, final_sigma);
        Ok(())
    }

    /// The model output may carry a learned variance in extra channels.
    fn check_step_inputs(&self, model_output: &Tensor, sample: &Tensor) -> Result<()> {
        if self.state.config.variance_type.is_none() {
            same_shape(model_output, sample, "DPMSolverMultistepScheduler::step")?;
        }
        if self.state.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        int_timestep(timestep, CLASS)?;
        let i = self.state.step_index(timestep)?;
        self.state.sigma(i + 1)?;
        let c = &self.state.config;
        let len = self.state.timesteps.len();
        let lower_order_final = i == len - 1
            && (c.euler_at_final
                || (c.lower_order_final && len < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == len && c.lower_order_final && len < 15;
        let converted = self.convert_model_output(model_output, sample, i)?;
        self.model_outputs.push(converted.clone());
        let noise = if c.sde() {
            Some(generators.randn(converted.dims(), converted.device())?)
        } else {
            None
        };
        let order = c.solver_order;
        let warm_up = self.model_outputs.lower_order_nums();
        let prev = if order == 1 || warm_up < 1 || lower_order_final {
            self.first_order(i, &converted, sample, noise.as_ref())?
        } else if order == 2 || warm_up < 2 || lower_order_second {
            self.second_order(i, sample, noise.as_ref())?
        } else {
            self.third_order(i, sample, noise.as_ref())?
        };
        self.model_outputs.count_step(order);
        let pred_original = self.state.config.plus_plus().then_some(converted);
        self.state.finish_step(i, pred_original);
        Ok(prev)
    }
}
