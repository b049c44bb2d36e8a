//! `DEISMultistepScheduler` of diffusers 0.42 (Zhang & Chen, "Fast Sampling of Diffusion Models
//! with Exponential Integrator"): the log-rho multistep DEIS solver of order 1 to 3.

use candle_core::Tensor;

use super::common::{check_solver_order, div, int_timestep, mul, scheduler_config, ClassConfig};
use super::config::{
    AlgorithmType, BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, SolverType,
    TimestepSpacing,
};
use super::multistep::{
    alpha_sigma, check_multistep_config, lambda, predicted_x0, MultistepHistory,
};
use super::numeric::np_log_f32;
use super::sigma_schedule::SigmaSpacing;
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::Result;

const CLASS: &str = "DEISMultistepScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `DEISMultistepScheduler`, with its defaults.
    pub struct DEISMultistepConfig for "DEISMultistepScheduler" {
        num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02,
        beta_schedule = BetaSchedule::Linear;
        /// The solver order, 1 to 3.
        solver_order: usize = 2 => usize,
        /// What the model predicts (noise, `v`, or the sample).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        ..thresholding_keys,
        /// Always `deis` (the DPM-Solver names are read as `deis`, as diffusers does).
        algorithm_type: AlgorithmType = AlgorithmType::Deis => choice,
        /// Always `logrho` (the other solvers' names are read as `logrho`).
        solver_type: SolverType = SolverType::Logrho => choice,
        /// Use lower-order steps at the end with fewer than 15 steps.
        lower_order_final: bool = true => bool,
        ..sigma_schedule_flags,
        ..flow_sigma_keys,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
        ..dynamic_shifting_keys,
    }
}

impl ClassConfig for DEISMultistepConfig {
    fn validate(mut self, r: &mut ConfigReader<'_>) -> Result<Self> {
        let c = &mut self;
        check_multistep_config!(r, &*c);
        check_solver_order(r, c.solver_order)?;
        match c.algorithm_type {
            AlgorithmType::Deis => {}
            AlgorithmType::DpmSolver | AlgorithmType::DpmSolverPlusPlus => {
                c.algorithm_type = AlgorithmType::Deis
            }
            other => {
                return Err(
                    r.error("algorithm_type", format!("`{other}` is not implemented for {CLASS}"))
                )
            }
        }
        c.solver_type = SolverType::Logrho;
        Ok(self)
    }
}

/// diffusers' `DEISMultistepScheduler`: integer timesteps, float32 sigmas ending with the
/// smallest one, `init_noise_sigma` 1 and no input scaling.
#[derive(Debug, Clone)]
pub struct DEISMultistepScheduler {
    state: SchedulerState<DEISMultistepConfig>,
    model_outputs: MultistepHistory,
}

scheduler_api!(DEISMultistepScheduler, DEISMultistepConfig, typed_config);

impl DEISMultistepScheduler {
    /// `DEISMultistepScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let state = Self::load_state(config)?;
        let model_outputs = MultistepHistory::new(CLASS, state.config.solver_order);
        Ok(Self { state, model_outputs })
    }

    /// `convert_model_output`: the noise prediction (via `x_0`, as diffusers computes it).
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.state.sigmas[i]);
        let prediction = self.state.config.prediction_type;
        let x0 = predicted_x0(prediction, model_output, sample, (alpha_t, sigma_t))?;
        div(&(sample - mul(&x0, alpha_t)?)?, sigma_t)
    }
}

/// `np.log` of a float32 0-d tensor (numpy's float32 `log`).
fn ln(x: f32) -> f32 {
    np_log_f32(x)
}

/// The second-order `ind_fn(t, b, c)`: `t * (-log c + log t - 1) / (log b - log c)` in float32.
fn ind2(t: f32, b: f32, c: f32) -> f32 {
    t * (-ln(c) + ln(t) - 1.0) / (ln(b) - ln(c))
}

/// The third-order `ind_fn(t, b, c, d)` in float32.
fn ind3(t: f32, b: f32, c: f32, d: f32) -> f32 {
    let (lt, lb, lc, ld) = (ln(t), ln(b), ln(c), ln(d));
    let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
    let denominator = (lb - lc) * (lb - ld);
    numerator / denominator
}

impl SchedulerClass for DEISMultistepScheduler {
    scheduler_state!(CLASS, Parametrization::AlphaSigma, state: DEISMultistepConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.state.config;
        let spacing = SigmaSpacing::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        let schedule = self.state.multistep_schedule(num_inference_steps, spacing);
        // DEIS ends with the smallest sigma of the schedule.
        let final_sigma = schedule.sigma_min;
        self.model_outputs = MultistepHistory::new(CLASS, c.solver_order);
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
        let len = self.state.timesteps.len();
        let lower_order_final = i + 1 == len && c.lower_order_final && len < 15;
        let lower_order_second = i + 2 == len && c.lower_order_final && len < 15;
        let m0 = self.convert_model_output(model_output, sample, i)?;
        self.model_outputs.push(m0.clone());
        let order = c.solver_order;
        let s = &self.state.sigmas;
        let warm_up = self.model_outputs.lower_order_nums();
        let prev = if order == 1 || warm_up < 1 || lower_order_final {
            let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
            let (alpha_s, sigma_s) = alpha_sigma(s[i]);
            let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
            (mul(sample, alpha_t / alpha_s)? - mul(&m0, sigma_t * (h.exp() - 1.0))?)?
        } else if order == 2 || warm_up < 2 || lower_order_second {
            let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
            let (alpha_s0, sigma_s0) = alpha_sigma(s[i]);
            let (alpha_s1, sigma_s1) = alpha_sigma(s[i - 1]);
            let m1 = self.model_outputs.get(1)?;
            let (rho_t, rho_s0, rho_s1) =
                (sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1);
            let coef1 = ind2(rho_t, rho_s0, rho_s1) - ind2(rho_s0, rho_s0, rho_s1);
            let coef2 = ind2(rho_t, rho_s1, rho_s0) - ind2(rho_s0, rho_s1, rho_s0);
            let inner = ((div(sample, alpha_s0)? + mul(&m0, coef1)?)? + mul(m1, coef2)?)?;
            mul(&inner, alpha_t)?
        } else {
            let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
            let (alpha_s0, sigma_s0) = alpha_sigma(s[i]);
            let (alpha_s1, sigma_s1) = alpha_sigma(s[i - 1]);
            let (alpha_s2, sigma_s2) = alpha_sigma(s[i - 2]);
            let m1 = self.model_outputs.get(1)?;
            let m2 = self.model_outputs.get(2)?;
            let (rho_t, rho_s0, rho_s1, rho_s2) =
                (sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1, sigma_s2 / alpha_s2);
            let coef1 = ind3(rho_t, rho_s0, rho_s1, rho_s2) - ind3(rho_s0, rho_s0, rho_s1, rho_s2);
            let coef2 = ind3(rho_t, rho_s1, rho_s2, rho_s0) - ind3(rho_s0, rho_s1, rho_s2, rho_s0);
            let coef3 = ind3(rho_t, rho_s2, rho_s0, rho_s1) - ind3(rho_s0, rho_s2, rho_s0, rho_s1);
            let inner = (((div(sample, alpha_s0)? + mul(&m0, coef1)?)? + mul(m1, coef2)?)?
                + mul(m2, coef3)?)?;
            mul(&inner, alpha_t)?
        };
        self.model_outputs.count_step(order);
        self.state.finish_step(i, None);
        Ok(prev)
    }
}
