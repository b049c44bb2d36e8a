//! `KDPM2DiscreteScheduler` of diffusers 0.42 ("DPM2"): k-diffusion's second-order DPM-Solver-2
//! (Algorithm 2 of Karras et al. 2022 with a midpoint at the geometric mean of two sigmas). Each
//! step evaluates the model at `t` and at the interpolated midpoint timestep, so the schedule
//! interleaves them: `[t0, ti1, t1, ti2, t2, ...]`, as in diffusers.

use candle_core::Tensor;

use super::common::{
    check_sigma_flags, div, k_pred_original, k_scale, mul, scheduler_config, sigma_at, ClassConfig,
    EPSILON_OR_V, STANDARD_BETAS,
};
use super::config::{
    BetaSchedule, ConfigReader, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::numeric::np_round;
use super::sigma_schedule::{SigmaSpacing, TrainSigmas};
use super::state::{
    scheduler_api, scheduler_state, Parametrization, SchedulerClass, SchedulerState,
};
use crate::rng::Generators;
use crate::Result;

const CLASS: &str = "KDPM2DiscreteScheduler";

scheduler_config! {
    /// The `__init__` arguments of diffusers' `KDPM2DiscreteScheduler` (and of
    /// `KDPM2AncestralDiscreteScheduler`, which has the same ones), with their defaults.
    pub struct KDPM2DiscreteConfig for "KDPM2DiscreteScheduler" {
        num_train_timesteps = 1000, beta_start = 0.00085, beta_end = 0.012,
        beta_schedule = BetaSchedule::Linear;
        ..sigma_schedule_flags,
        /// What the model predicts (`epsilon` or `v_prediction`).
        prediction_type: PredictionType = PredictionType::Epsilon => choice,
        /// How inference timesteps are picked from the training ones.
        timestep_spacing: TimestepSpacing = TimestepSpacing::Linspace => choice,
        /// Added to the timesteps with `leading` spacing (SD uses 1).
        steps_offset: i64 = 0 => i64,
    }
}

impl ClassConfig for KDPM2DiscreteConfig {
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self> {
        let c = &self;
        r.check_among("beta_schedule", c.beta_schedule, STANDARD_BETAS)?;
        r.check_among("prediction_type", c.prediction_type, EPSILON_OR_V)?;
        check_sigma_flags(r, [c.use_karras_sigmas, c.use_exponential_sigmas, c.use_beta_sigmas])?;
        Ok(self)
    }
}

/// The float32 sigma schedule of KDPM2 before interleaving: the `n + 1` sigmas (final 0), the
/// timesteps (float32 values, or float64 for Karras/exponential sigmas, as diffusers keeps
/// them), and the training sigmas.
pub(crate) struct Kdpm2Base {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f64>,
    pub train: TrainSigmas,
}

impl Kdpm2Base {
    /// The timestep of an interpolated sigma (`_sigma_to_t` on float32 tensors).
    pub fn interpol_timestep(&self, sigma: f32) -> f64 {
        self.train.sigma_to_t_f32(sigma) as f64
    }
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

/// What KDPM2 and its ancestral variant share: the state, the interleaved midpoint sigmas and
/// the sample of a step's first evaluation.
#[derive(Debug, Clone)]
pub(crate) struct Dpm2State {
    pub state: SchedulerState<KDPM2DiscreteConfig>,
    pub sigmas_interpol: Vec<f32>,
    pub first_sample: Option<Tensor>,
}

impl Dpm2State {
    pub fn new(state: SchedulerState<KDPM2DiscreteConfig>) -> Self {
        Self { state, sigmas_interpol: vec![], first_sample: None }
    }

    /// The schedule of `n` steps before the midpoints are interleaved.
    pub fn base(&self, n: usize) -> Kdpm2Base {
        let state = &self.state;
        let c = &state.config;
        let train = TrainSigmas::new(&state.schedule);
        let spacing = SigmaSpacing::from_flags(c.use_karras_sigmas, c.use_exponential_sigmas);
        let linear = InterpolationType::Linear;
        let (sigmas, ts) =
            train.k_schedule(state.k_timesteps(n), linear, spacing, state.sigma_range);
        let timesteps = match spacing {
            None => ts.iter().map(|&t| t as f32 as f64).collect(),
            Some(SigmaSpacing::Karras) => ts.iter().map(|&t| np_round(t)).collect(),
            Some(SigmaSpacing::Exponential) => ts,
        };
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        Kdpm2Base { sigmas, timesteps, train }
    }

    /// Sets the interleaved schedule: `timesteps` `[t0, ti, t1, ti, t2, ...]` with `ti(k)` the
    /// midpoint timestep of step `k`, and the sigmas and midpoint sigmas repeated alike.
    pub fn set_schedule(
        &mut self,
        base: &Kdpm2Base,
        interpol: &[f32],
        midpoint_timestep: impl Fn(usize) -> f64,
        n: usize,
    ) {
        let t = &base.timesteps;
        let mut timesteps = vec![t[0]];
        for (k, &t_k) in t.iter().enumerate().skip(1) {
            timesteps.extend([midpoint_timestep(k), t_k]);
        }
        self.state.set_schedule(timesteps, interleave_repeat(&base.sigmas), n);
        self.sigmas_interpol = interleave_repeat(interpol);
        self.first_sample = None;
    }

    /// `scale_model_input`: at the step's sigma for the first evaluation, else at the midpoint
    /// sigma `interpol_offset` entries back.
    pub fn scale_model_input(
        &mut self,
        sample: &Tensor,
        timestep: f64,
        interpol_offset: usize,
    ) -> Result<Tensor> {
        let i = self.state.step_index(timestep)?;
        let sigma = match self.first_sample {
            None => self.state.sigma(i)?,
            Some(_) => {
                sigma_at(&self.sigmas_interpol, i.wrapping_sub(interpol_offset), self.state.class)?
            }
        };
        k_scale(sample, sigma)
    }

    /// One evaluation of DPM-Solver-2: the first goes from `sigma` to the midpoint
    /// `sigma_interpol` (keeping the sample), the second from the kept sample to `sigma_next`
    /// with the derivative at the midpoint. Returns the previous sample and `x_0`.
    pub fn update(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
        sigma_interpol: f32,
        sigma_next: f32,
    ) -> Result<(Tensor, Tensor)> {
        let prediction = self.state.config.prediction_type;
        let first_order = self.first_sample.is_none();
        let (sigma_input, dt) = if first_order {
            (sigma, sigma_interpol - sigma)
        } else {
            (sigma_interpol, sigma_next - sigma)
        };
        let pred_original = k_pred_original(prediction, model_output, sample, sigma_input)?;
        let derivative = div(&(sample - &pred_original)?, sigma_input)?;
        let base = match self.first_sample.take() {
            None => {
                self.first_sample = Some(sample.clone());
                sample.clone()
            }
            Some(first) => first,
        };
        Ok(((&base + mul(&derivative, dt)?)?, pred_original))
    }
}

/// diffusers' `KDPM2DiscreteScheduler`: `2n - 1` timesteps for `n` steps.
#[derive(Debug, Clone)]
pub struct KDPM2DiscreteScheduler {
    dpm2: Dpm2State,
}

scheduler_api!(KDPM2DiscreteScheduler, KDPM2DiscreteConfig, typed_config);

impl KDPM2DiscreteScheduler {
    /// `KDPM2DiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self { dpm2: Dpm2State::new(Self::load_state(config)?) }.with_training_timesteps()
    }

    /// The interleaved interpolated sigmas (float32 values).
    pub fn sigmas_interpol(&self) -> Vec<f64> {
        self.dpm2.sigmas_interpol.iter().map(|&s| s as f64).collect()
    }
}

impl SchedulerClass for KDPM2DiscreteScheduler {
    scheduler_state!(CLASS, Parametrization::KDiffusion, dpm2.state: KDPM2DiscreteConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let base = self.dpm2.base(num_inference_steps);
        let s = &base.sigmas;
        let n1 = s.len();
        // sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()
        let interpol: Vec<f32> =
            (0..n1).map(|k| log_midpoint(s[k], s[(k + n1 - 1) % n1])).collect();
        let ti = |k: usize| base.interpol_timestep(interpol[k]);
        self.dpm2.set_schedule(&base, &interpol, ti, num_inference_steps);
        Ok(())
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        self.dpm2.scale_model_input(sample, timestep, 0)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _generators: &mut Generators,
    ) -> Result<Tensor> {
        let d = &mut self.dpm2;
        let i = d.state.step_index(timestep)?;
        let (sigma, sigma_interpol, sigma_next) = if d.first_sample.is_none() {
            let sigma = d.state.sigma(i)?;
            (sigma, sigma_at(&d.sigmas_interpol, i + 1, CLASS)?, d.state.sigmas[i + 1])
        } else {
            (d.state.sigmas[i - 1], d.sigmas_interpol[i], d.state.sigmas[i])
        };
        let (prev, pred_original) =
            d.update(model_output, sample, sigma, sigma_interpol, sigma_next)?;
        d.state.finish_step(i, Some(pred_original));
        Ok(prev)
    }

    fn order(&self) -> usize {
        2
    }
}
