//! What every scheduler class shares: the state built by `from_config` (typed and resolved
//! config, training schedule, timesteps, sigmas, step index) and the [`Scheduler`] methods that
//! only read or reset it. Each class implements [`SchedulerClass`] (its `set_timesteps` and
//! `step` math) and gets [`Scheduler`] from the blanket implementation here.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::common::{
    alpha_add_noise, alpha_at, check_steps, int_timestep, k_scale, mul, same_shape, sigma_at,
    to_f32, ClassConfig, ConfigFields,
};
use super::config::{ConfigReader, SchedulerConfig, TimestepSpacing};
use super::multistep::alpha_sigma;
use super::sigma_schedule::{
    discrete_timesteps, k_timesteps, multistep_timesteps, training_timesteps, MultistepSchedule,
    SigmaSpacing, TrainSigmas,
};
use super::Scheduler;
use crate::rng::Generators;
use crate::{Error, Result};

/// How a class noises samples, scales model inputs and picks `init_noise_sigma`: the three
/// families of diffusers' schedulers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parametrization {
    /// k-diffusion (Euler, Heun, LMS, KDPM2): `x_t = x_0 + sigma * noise`, model inputs scaled
    /// by `1 / sqrt(sigma^2 + 1)`, `init_noise_sigma` from the largest sigma.
    KDiffusion,
    /// The multistep solvers (DPM-Solver, DEIS, UniPC): `alpha_t * x_0 + sigma_t * noise` with
    /// `alpha_t`, `sigma_t` from the sigma schedule; a timestep missing from the schedule means
    /// the last step.
    AlphaSigma,
    /// DDIM, DDPM, PNDM, LCM: `sqrt(alphas_cumprod[t]) * x_0 + sqrt(1 - alphas_cumprod[t]) *
    /// noise` at an integer `t`; no sigmas.
    AlphasCumprod,
}

/// `sigma_min` / `sigma_max` as diffusers reads them for Karras / exponential sigmas:
/// `hasattr(self.config, "sigma_min")`, so the class's own keys or hidden keys kept from the
/// source config.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct SigmaRange {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// diffusers' `_step_index` / `_begin_index` pair (with `_init_step_index`, which diffusers
/// copies from `EulerDiscreteScheduler` into the other classes).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepIndex {
    pub step: Option<usize>,
    pub begin: Option<usize>,
}

impl StepIndex {
    /// `_init_step_index`: the begin index if set, else the position of `timestep` in
    /// `schedule` (the second match when there are several). `or_last`: the multistep solvers'
    /// rule of taking the last index when the timestep is not in the schedule (else an error).
    fn init(
        &mut self,
        schedule: &[f64],
        timestep: f64,
        class: &str,
        or_last: bool,
    ) -> Result<usize> {
        if let Some(i) = self.step {
            return Ok(i);
        }
        let i = match self.begin {
            Some(b) => b,
            None => position_of(schedule, timestep, class, or_last)?,
        };
        self.step = Some(i);
        Ok(i)
    }

    /// The index `add_noise` uses: the timestep's own index without a begin index, else the
    /// current step index (or the begin index before the first step).
    fn for_add_noise(
        &self,
        schedule: &[f64],
        timestep: f64,
        class: &str,
        or_last: bool,
    ) -> Result<usize> {
        match (self.begin, self.step) {
            (None, _) => position_of(schedule, timestep, class, or_last),
            (Some(_), Some(s)) => Ok(s),
            (Some(b), None) => Ok(b),
        }
    }
}

/// diffusers' `index_for_timestep` (copied from `EulerDiscreteScheduler` into the other
/// classes): the position of `timestep` in `schedule` (compared as f32, like the float32
/// timestep tensors), taking the second match when there are several.
fn index_for_timestep(schedule: &[f64], timestep: f64) -> Option<usize> {
    let t = timestep as f32;
    let mut matches = schedule.iter().enumerate().filter(|(_, &s)| s as f32 == t).map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// [`index_for_timestep`], or the last index (`or_last`), or an error.
fn position_of(schedule: &[f64], timestep: f64, class: &str, or_last: bool) -> Result<usize> {
    match index_for_timestep(schedule, timestep) {
        Some(i) => Ok(i),
        None if or_last && !schedule.is_empty() => Ok(schedule.len() - 1),
        None => Err(Error::invalid(format!("timestep {timestep} is not in the {class} schedule"))),
    }
}

/// The state of a scheduler of class `class` with typed config `C`.
#[derive(Debug, Clone)]
pub(crate) struct SchedulerState<C> {
    pub class: &'static str,
    pub parametrization: Parametrization,
    pub config: C,
    /// The resolved config (`scheduler.config`).
    pub resolved: SchedulerConfig,
    pub schedule: TrainingSchedule,
    pub sigma_range: SigmaRange,
    /// The timesteps of the current schedule.
    pub timesteps: Vec<f64>,
    /// The float32 sigmas of the current schedule (empty for [`Parametrization::AlphasCumprod`]).
    pub sigmas: Vec<f32>,
    pub index: StepIndex,
    /// Set by `set_timesteps`.
    pub num_inference_steps: Option<usize>,
    pub pred_original_sample: Option<Tensor>,
}

impl<C: ClassConfig> SchedulerState<C> {
    /// What every `from_config` starts with: the typed config with the class's checks, the
    /// resolved config, the training schedule (its errors reported as config errors), the
    /// sigma range, and the schedule of diffusers' `__init__`: the training timesteps (float32
    /// values, descending) and, by parametrization, the training sigmas (descending with a
    /// final 0 for k-diffusion, ascending for the multistep solvers, none for the others). The
    /// sigma-based classes keep the largest sigma finite under zero-terminal-SNR rescaling.
    pub fn from_config(
        config: &SchedulerConfig,
        class: &'static str,
        parametrization: Parametrization,
    ) -> Result<Self> {
        let mut r = ConfigReader::new(config, class);
        let typed: C = super::common::read_typed(&mut r)?;
        let resolved = r.resolved(typed.resolved_values());
        let sigma_range =
            SigmaRange { min: r.hidden_f64("sigma_min"), max: r.hidden_f64("sigma_max") };
        let mut schedule = typed.training_schedule().map_err(|e| {
            Error::config(
                resolved.source().unwrap_or(std::path::Path::new("<scheduler config>")),
                format!("{class}: {e}"),
            )
        })?;
        let sigma_based = parametrization != Parametrization::AlphasCumprod;
        if sigma_based && typed.rescale_betas_zero_snr() {
            schedule.keep_terminal_sigma_finite();
        }
        let sigmas = match parametrization {
            Parametrization::KDiffusion => {
                schedule.sigmas().into_iter().rev().chain([0.0]).collect()
            }
            Parametrization::AlphaSigma => schedule.sigmas(),
            Parametrization::AlphasCumprod => vec![],
        };
        Ok(Self {
            class,
            parametrization,
            timesteps: training_timesteps(typed.num_train_timesteps()),
            config: typed,
            resolved,
            schedule,
            sigma_range,
            sigmas,
            index: StepIndex::default(),
            num_inference_steps: None,
            pred_original_sample: None,
        })
    }
}

impl<C: ConfigFields> SchedulerState<C> {
    /// The timesteps of the k-diffusion classes for `n` steps (float32 values, descending).
    pub fn k_timesteps(&self, n: usize) -> Vec<f64> {
        let c = &self.config;
        let ts = k_timesteps(c.timestep_spacing(), c.num_train_timesteps(), n, c.steps_offset());
        ts.into_iter().map(f64::from).collect()
    }

    /// The integer timesteps of DDIM, DDPM and PNDM for `n` steps (descending).
    pub fn discrete_timesteps(&self, n: usize) -> Vec<i64> {
        let c = &self.config;
        discrete_timesteps(c.timestep_spacing(), c.num_train_timesteps(), n, c.steps_offset())
    }

    /// The integer timesteps of the multistep solvers for `n` steps, up to `last_timestep`
    /// (`num_train_timesteps` unless DPM-Solver clips some).
    pub fn multistep_timesteps(&self, n: usize, last_timestep: usize) -> Vec<i64> {
        let c = &self.config;
        let (spacing, n_train) = (c.timestep_spacing(), c.num_train_timesteps());
        multistep_timesteps(spacing, n_train, last_timestep, n, c.steps_offset())
    }

    /// The schedule of `n` steps of DEIS and UniPC ([`TrainSigmas::multistep_schedule`] with
    /// Karras timesteps rounded).
    pub fn multistep_schedule(&self, n: usize, spacing: Option<SigmaSpacing>) -> MultistepSchedule {
        let timesteps = self.multistep_timesteps(n, self.config.num_train_timesteps());
        let train = TrainSigmas::new(&self.schedule);
        train.multistep_schedule(&timesteps, spacing, n, self.sigma_range, true)
    }

    /// Sets a multistep solver's schedule, ending with `final_sigma`. The number of steps is
    /// the number of timesteps.
    pub fn set_multistep_schedule(&mut self, schedule: MultistepSchedule, final_sigma: f32) {
        let MultistepSchedule { timesteps, mut sigmas, .. } = schedule;
        sigmas.push(final_sigma);
        let steps = timesteps.len();
        self.set_schedule(timesteps, sigmas, steps);
    }

    /// `set_timesteps` of DDIM and DDPM: the integer timesteps, no sigmas.
    pub fn set_discrete_schedule(&mut self, num_inference_steps: usize) {
        let timesteps = self.discrete_timesteps(num_inference_steps);
        let timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.set_schedule(timesteps, vec![], num_inference_steps);
    }

    /// Sets a new schedule (the end of `set_timesteps`) and forgets the position and the last
    /// prediction.
    pub fn set_schedule(
        &mut self,
        timesteps: Vec<f64>,
        sigmas: Vec<f32>,
        num_inference_steps: usize,
    ) {
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.num_inference_steps = Some(num_inference_steps);
        self.index = StepIndex::default();
        self.pred_original_sample = None;
    }

    /// The step index for `timestep`, set on the first call after `set_timesteps`.
    pub fn step_index(&mut self, timestep: f64) -> Result<usize> {
        let or_last = self.parametrization == Parametrization::AlphaSigma;
        self.index.init(&self.timesteps, timestep, self.class, or_last)
    }

    /// `sigmas[i]`, checked.
    pub fn sigma(&self, i: usize) -> Result<f32> {
        sigma_at(&self.sigmas, i, self.class)
    }

    /// The end of a step at index `i`: the index moves on, and the step's `x_0` prediction is
    /// kept for [`Scheduler::pred_original_sample`].
    pub fn finish_step(&mut self, i: usize, pred_original_sample: Option<Tensor>) {
        self.index.step = Some(i + 1);
        self.pred_original_sample = pred_original_sample;
    }

    /// The float32 sigmas as f64 values.
    pub fn sigmas_f64(&self) -> Vec<f64> {
        self.sigmas.iter().map(|&s| s as f64).collect()
    }
}

/// The [`SchedulerClass`] items that name a class and reach its state:
/// `scheduler_state!(CLASS, Parametrization::X, field: Config)` for the class `CLASS` whose
/// `SchedulerState<Config>` is at `self.field` (a path such as `dpm2.state` works too).
macro_rules! scheduler_state {
    ($class:expr, $parametrization:expr, $($field:ident).+ : $config:ty) => {
        type Config = $config;

        const CLASS: &'static str = $class;

        const PARAMETRIZATION: $crate::schedulers::state::Parametrization = $parametrization;

        fn state(&self) -> &$crate::schedulers::state::SchedulerState<$config> {
            &self.$($field).+
        }

        fn state_mut(&mut self) -> &mut $crate::schedulers::state::SchedulerState<$config> {
            &mut self.$($field).+
        }
    };
}
pub(crate) use scheduler_state;

/// The public inherent methods every scheduler type has: `new(config)` (diffusers'
/// `Class(**config)`), the typed config (named `$typed_config`) and the training
/// `alphas_cumprod`. `$ty` implements [`SchedulerClass`] and has a `from_config`.
macro_rules! scheduler_api {
    ($ty:ident, $config:ty, $typed_config:ident) => {
        impl $ty {
            #[doc = concat!("`", stringify!($ty), "(**config)`.")]
            pub fn new(config: $config) -> $crate::Result<Self> {
                use $crate::schedulers::common::ConfigFields;
                Self::from_config(&$crate::schedulers::SchedulerConfig::from_map(config.write()))
            }

            /// The typed config.
            pub fn $typed_config(&self) -> &$config {
                &$crate::schedulers::state::SchedulerClass::state(self).config
            }

            /// The training `alphas_cumprod` (float32).
            pub fn alphas_cumprod(&self) -> &[f32] {
                &$crate::schedulers::state::SchedulerClass::state(self).schedule.alphas_cumprod
            }
        }
    };
}
pub(crate) use scheduler_api;

/// A diffusers scheduler class: its state and its math. [`Scheduler`] is implemented for every
/// class from these methods; the provided ones are what most classes share.
pub(crate) trait SchedulerClass: Send + Sync {
    /// The typed `__init__` arguments.
    type Config: ConfigFields;

    /// The diffusers class name.
    const CLASS: &'static str;

    /// How the class noises samples and scales model inputs.
    const PARAMETRIZATION: Parametrization;

    /// Whether [`step`](Self::step) needs [`set_timesteps`](Self::set_timesteps) first (Euler
    /// and DDPM can step on the schedule of their `__init__`).
    const NEEDS_SET_TIMESTEPS: bool = true;

    fn state(&self) -> &SchedulerState<Self::Config>;

    fn state_mut(&mut self) -> &mut SchedulerState<Self::Config>;

    /// [`Scheduler::set_timesteps`], for a step count already checked against
    /// `num_train_timesteps`.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// [`Scheduler::step`] after [`check_step_inputs`](Self::check_step_inputs), with the
    /// tensors converted to f32.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor>;

    /// The checks before a step: the model output has the sample's shape, and
    /// `set_timesteps` was called.
    fn check_step_inputs(&self, model_output: &Tensor, sample: &Tensor) -> Result<()> {
        let state = self.state();
        same_shape(model_output, sample, &format!("{}::step", state.class))?;
        if Self::NEEDS_SET_TIMESTEPS && state.num_inference_steps.is_none() {
            return Err(Error::invalid(format!("{}: call set_timesteps before step", state.class)));
        }
        Ok(())
    }

    /// The state `from_config` starts from ([`SchedulerState::from_config`]).
    fn load_state(config: &SchedulerConfig) -> Result<SchedulerState<Self::Config>>
    where
        Self::Config: ClassConfig,
    {
        SchedulerState::from_config(config, Self::CLASS, Self::PARAMETRIZATION)
    }

    /// diffusers' `__init__` of the k-diffusion classes, which ends with
    /// `set_timesteps(num_train_timesteps)` (without counting as a call to it).
    fn with_training_timesteps(mut self) -> Result<Self>
    where
        Self: Sized,
    {
        let num_train_timesteps = self.state().config.num_train_timesteps();
        Scheduler::set_timesteps(&mut self, num_train_timesteps)?;
        self.state_mut().num_inference_steps = None;
        Ok(self)
    }

    /// [`Scheduler::scale_model_input`]: the k-diffusion scaling at the current sigma, else the
    /// sample as f32.
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let state = self.state_mut();
        if state.parametrization != Parametrization::KDiffusion {
            return to_f32(sample);
        }
        let i = state.step_index(timestep)?;
        k_scale(sample, state.sigma(i)?)
    }

    /// [`Scheduler::init_noise_sigma`]: for k-diffusion, `max(sigmas)` for linspace/trailing
    /// spacing and `sqrt(max(sigmas)^2 + 1)` for leading (diffusers 0.42's rule), in float32;
    /// else 1.
    fn init_noise_sigma(&self) -> f64 {
        let state = self.state();
        if state.parametrization != Parametrization::KDiffusion {
            return 1.0;
        }
        let max = state.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match state.config.timestep_spacing() {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        }
    }

    /// [`Scheduler::add_noise`], by [`Parametrization`]: diffusers'
    /// `EulerDiscreteScheduler.add_noise`, `DPMSolverMultistepScheduler.add_noise` and
    /// `DDPMScheduler.add_noise`, which the other classes copy.
    fn add_noise(
        &self,
        original_samples: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        let state = self.state();
        let class = state.class;
        same_shape(original_samples, noise, &format!("{class}::add_noise"))?;
        let or_last = state.parametrization == Parametrization::AlphaSigma;
        let index = || state.index.for_add_noise(&state.timesteps, timestep, class, or_last);
        match state.parametrization {
            Parametrization::KDiffusion => {
                let sigma = state.sigma(index()?)?;
                Ok((to_f32(original_samples)? + mul(&to_f32(noise)?, sigma)?)?)
            }
            Parametrization::AlphaSigma => {
                let (alpha_t, sigma_t) = alpha_sigma(state.sigma(index()?)?);
                Ok((mul(&to_f32(original_samples)?, alpha_t)? + mul(&to_f32(noise)?, sigma_t)?)?)
            }
            Parametrization::AlphasCumprod => {
                let t = int_timestep(timestep, class)?;
                let alpha_prod = alpha_at(&state.schedule.alphas_cumprod, t, class)?;
                alpha_add_noise(original_samples, noise, alpha_prod)
            }
        }
    }

    /// [`Scheduler::order`].
    fn order(&self) -> usize {
        1
    }

    /// [`Scheduler::set_step_option`]: no options.
    fn set_step_option(&mut self, name: &str, _value: f64) -> Result<()> {
        Err(Error::invalid(format!("{} has no step option `{name}`", self.state().class)))
    }
}

impl<T: SchedulerClass> Scheduler for T {
    fn class_name(&self) -> &'static str {
        self.state().class
    }

    fn config(&self) -> &SchedulerConfig {
        &self.state().resolved
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps, self.state().config.num_train_timesteps())?;
        SchedulerClass::set_timesteps(self, num_inference_steps)
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.state().num_inference_steps
    }

    fn timesteps(&self) -> &[f64] {
        &self.state().timesteps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        let state = self.state();
        (state.parametrization != Parametrization::AlphasCumprod).then(|| state.sigmas_f64())
    }

    fn init_noise_sigma(&self) -> f64 {
        SchedulerClass::init_noise_sigma(self)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        SchedulerClass::scale_model_input(self, sample, timestep)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        self.check_step_inputs(model_output, sample)?;
        SchedulerClass::step(self, &to_f32(model_output)?, timestep, &to_f32(sample)?, generators)
    }

    fn pred_original_sample(&self) -> Option<&Tensor> {
        self.state().pred_original_sample.as_ref()
    }

    fn add_noise(
        &self,
        original_samples: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        SchedulerClass::add_noise(self, original_samples, noise, timestep)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.state_mut().index.begin = Some(begin_index);
    }

    fn order(&self) -> usize {
        SchedulerClass::order(self)
    }

    fn set_step_option(&mut self, name: &str, value: f64) -> Result<()> {
        SchedulerClass::set_step_option(self, name, value)
    }
}
