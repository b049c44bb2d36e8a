//! `DEISMultistepScheduler` of diffusers 0.42 (Zhang & Chen, "Fast Sampling of Diffusion Models
//! with Exponential Integrator"): the log-rho multistep DEIS solver of order 1 to 3.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    alpha_sigma, check_choice, check_sigma_choice, exponential_sigmas, int_timestep, interp_sigmas,
    karras_sigmas, lambda, log_sigmas, multistep_timesteps, reject_flag, scheduler_config,
    sigma_at, sigma_to_t, train_sigmas, training_schedule, StepIndex, STANDARD_BETAS,
};
use super::config::{
    AlgorithmType, BetaSchedule, ConfigReader, PredictionType, SchedulerConfig, SolverType,
    TimeShiftType, TimestepSpacing,
};
use super::numeric::{np_linspace, np_round};
use super::{check_steps, div, mul, same_shape, to_f32, Scheduler};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "DEISMultistepScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `DEISMultistepScheduler`, with its defaults.
    pub struct DEISMultistepConfig {
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
        /// Always `deis` (the DPM-Solver names are read as `deis`, as diffusers does).
        algorithm_type: AlgorithmType = AlgorithmType::Deis => choice,
        /// Always `logrho` (the other solvers' names are read as `logrho`).
        solver_type: SolverType = SolverType::Logrho => choice,
        /// Use lower-order steps at the end with fewer than 15 steps.
        lower_order_final: bool = true => bool,
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
        /// Dynamic shifting (flow models) is not supported (an error if true).
        use_dynamic_shifting: bool = false => bool,
        /// Kept for config round trips.
        time_shift_type: TimeShiftType = TimeShiftType::Exponential => choice,
    }
}

impl DEISMultistepConfig {
    /// Reads the config with `DEISMultistepScheduler.from_config(config)` semantics.
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
        Ok(c)
    }
}

/// diffusers' `DEISMultistepScheduler`: integer timesteps, float32 sigmas ending with the
/// smallest one, `init_noise_sigma` 1 and no input scaling.
#[derive(Debug, Clone)]
pub struct DEISMultistepScheduler {
    config: DEISMultistepConfig,
    resolved: SchedulerConfig,
    schedule: TrainingSchedule,
    hidden_sigma_min: Option<f64>,
    hidden_sigma_max: Option<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    index: StepIndex,
}

impl DEISMultistepScheduler {
    /// `DEISMultistepScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(config, CLASS);
        let c = DEISMultistepConfig::read(&mut r)?;
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
        })
    }

    /// `DEISMultistepScheduler(**config)`.
    pub fn new(config: DEISMultistepConfig) -> Result<Self> {
        Self::from_config(&SchedulerConfig::from_map(config.write()))
    }

    /// The typed config.
    pub fn typed_config(&self) -> &DEISMultistepConfig {
        &self.config
    }

    /// `convert_model_output`: the noise prediction (via `x_0`, as diffusers computes it).
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?,
        };
        div(&(sample - mul(&x0, alpha_t)?)?, sigma_t)
    }

    fn missing() -> Error {
        Error::invalid(format!("{CLASS}: missing previous model output"))
    }
}

/// `np.log` of a float32 0-d tensor (numpy's float32 `log`).
fn ln(x: f32) -> f32 {
    super::numeric::np_log_f32(x)
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

impl Scheduler for DEISMultistepScheduler {
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
        let lo = self.hidden_sigma_min.unwrap_or(train[0] as f64);
        let hi = self.hidden_sigma_max.unwrap_or(train[n_train - 1] as f64);
        let (sigmas, timesteps): (Vec<f32>, Vec<i64>) = if c.use_karras_sigmas
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
            let mut s32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
            s32.push(s[n - 1] as f32);
            (s32, t)
        } else {
            let ts64: Vec<f64> = int_ts.iter().map(|&t| t as f64).collect();
            let mut s32: Vec<f32> =
                interp_sigmas(&ts64, &train).iter().map(|&x| x as f32).collect();
            let a0 = self.schedule.alphas_cumprod[0];
            s32.push(((1.0 - a0) / a0).sqrt());
            (s32, int_ts)
        };
        self.timesteps = timesteps.iter().map(|&t| t as f64).collect();
        self.sigmas = sigmas;
        self.num_inference_steps = Some(self.timesteps.len());
        self.model_outputs = vec![None; c.solver_order];
        self.lower_order_nums = 0;
        self.index.reset();
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
        same_shape(model_output, sample, "DEISMultistepScheduler::step")?;
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{CLASS}: call set_timesteps before step")));
        }
        int_timestep(timestep, CLASS)?;
        let i = self.index.init(&self.timesteps, timestep, CLASS, true)?;
        sigma_at(&self.sigmas, i + 1, CLASS)?;
        let c = &self.config;
        let len = self.timesteps.len();
        let lower_order_final = i + 1 == len && c.lower_order_final && len < 15;
        let lower_order_second = i + 2 == len && c.lower_order_final && len < 15;
        let (model_output, sample) = (to_f32(model_output)?, to_f32(sample)?);
        let m0 = self.convert_model_output(&model_output, &sample, i)?;
        self.model_outputs.rotate_left(1);
        let n = self.model_outputs.len();
        self.model_outputs[n - 1] = Some(m0.clone());
        let order = c.solver_order;
        let s = &self.sigmas;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
            let (alpha_s, sigma_s) = alpha_sigma(s[i]);
            let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
            (mul(&sample, alpha_t / alpha_s)? - mul(&m0, sigma_t * (h.exp() - 1.0))?)?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
            let (alpha_s0, sigma_s0) = alpha_sigma(s[i]);
            let (alpha_s1, sigma_s1) = alpha_sigma(s[i - 1]);
            let m1 = self.model_outputs[n - 2].as_ref().ok_or_else(Self::missing)?;
            let (rho_t, rho_s0, rho_s1) =
                (sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1);
            let coef1 = ind2(rho_t, rho_s0, rho_s1) - ind2(rho_s0, rho_s0, rho_s1);
            let coef2 = ind2(rho_t, rho_s1, rho_s0) - ind2(rho_s0, rho_s1, rho_s0);
            let inner = ((div(&sample, alpha_s0)? + mul(&m0, coef1)?)? + mul(m1, coef2)?)?;
            mul(&inner, alpha_t)?
        } else {
            let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
            let (alpha_s0, sigma_s0) = alpha_sigma(s[i]);
            let (alpha_s1, sigma_s1) = alpha_sigma(s[i - 1]);
            let (alpha_s2, sigma_s2) = alpha_sigma(s[i - 2]);
            let m1 = self.model_outputs[n - 2].as_ref().ok_or_else(Self::missing)?;
            let m2 = self.model_outputs[n - 3].as_ref().ok_or_else(Self::missing)?;
            let (rho_t, rho_s0, rho_s1, rho_s2) =
                (sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1, sigma_s2 / alpha_s2);
            let coef1 = ind3(rho_t, rho_s0, rho_s1, rho_s2) - ind3(rho_s0, rho_s0, rho_s1, rho_s2);
            let coef2 = ind3(rho_t, rho_s1, rho_s2, rho_s0) - ind3(rho_s0, rho_s1, rho_s2, rho_s0);
            let coef3 = ind3(rho_t, rho_s2, rho_s0, rho_s1) - ind3(rho_s0, rho_s2, rho_s0, rho_s1);
            let inner = (((div(&sample, alpha_s0)? + mul(&m0, coef1)?)? + mul(m1, coef2)?)?
                + mul(m2, coef3)?)?;
            mul(&inner, alpha_t)?
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index.step = Some(i + 1);
        Ok(prev)
    }

    fn add_noise(
        &self,
        original_samples: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        same_shape(original_samples, noise, "DEISMultistepScheduler::add_noise")?;
        let i = self.index.for_add_noise(&self.timesteps, timestep, CLASS, true)?;
        let (alpha_t, sigma_t) = alpha_sigma(sigma_at(&self.sigmas, i, CLASS)?);
        Ok((mul(&to_f32(original_samples)?, alpha_t)? + mul(&to_f32(noise)?, sigma_t)?)?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }
}
