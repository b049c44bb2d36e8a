//! Noise schedulers, numerically matched to HF diffusers 0.42.
//!
//! Every scheduler implements [`Scheduler`], the subset of diffusers' `SchedulerMixin` API a
//! denoising loop needs:
//!
//! ```no_run
//! # use sd_core::schedulers::*; use sd_core::rng::Generators; use candle_core::{Device, Tensor};
//! # fn unet(x: &Tensor, t: f64) -> sd_core::Result<Tensor> { Ok(x.clone()) }
//! # fn main() -> sd_core::Result<()> {
//! let config = SchedulerConfig::from_file("model/scheduler/scheduler_config.json")?;
//! let mut scheduler = scheduler_from_name("euler", &config)?; // EulerDiscreteScheduler.from_config(config)
//! scheduler.set_timesteps(25)?;
//! let mut generators = Generators::from_seed(42);
//! let mut latents = (generators.randn(&[1, 4, 96, 96], &Device::Cpu)? * scheduler.init_noise_sigma())?;
//! for t in scheduler.timesteps().to_vec() {
//!     let input = scheduler.scale_model_input(&latents, t)?;
//!     let noise_pred = unet(&input, t)?;
//!     latents = scheduler.step(&noise_pred, t, &latents, &mut generators)?;
//! }
//! # Ok(()) }
//! ```
//!
//! Configs are read with diffusers' `from_config` semantics (see [`config`]); schedules are
//! computed with the same float32/float64 mix as diffusers (see [`numeric`]) so timesteps and
//! sigmas come out identical, and step arithmetic is done in float32 like diffusers does on f32
//! latents.
//!
//! Implemented (diffusers class, short names, A1111 names; see [`SCHEDULERS`]):
//!
//! | class | short names | A1111 |
//! |---|---|---|
//! | [`EulerDiscreteScheduler`] | `euler`, `euler_karras` | Euler |
//! | [`EulerAncestralDiscreteScheduler`] | `euler_a` | Euler a |
//! | [`DPMSolverMultistepScheduler`] | `dpmpp_2m`, `dpmpp_2m_karras`, `dpmpp_2m_sde`, `dpmpp_2m_sde_karras` | DPM++ 2M (Karras), DPM++ 2M SDE (Karras) |
//! | [`DDIMScheduler`] | `ddim` | DDIM |
//! | [`PNDMScheduler`] | `pndm`, `plms` | PNDM |
//! | [`LMSDiscreteScheduler`] | `lms`, `lms_karras` | LMS, LMS Karras |
//! | [`HeunDiscreteScheduler`] | `heun` | Heun |
//! | [`UniPCMultistepScheduler`] | `unipc` | UniPC |
//! | [`DDPMScheduler`] | `ddpm` | |
//! | [`KDPM2DiscreteScheduler`] | `dpm2`, `dpm2_karras` | DPM2, DPM2 Karras |
//! | [`KDPM2AncestralDiscreteScheduler`] | `dpm2_a`, `dpm2_a_karras` | DPM2 a, DPM2 a Karras |
//! | [`DEISMultistepScheduler`] | `deis` | DEIS |
//! | [`LCMScheduler`] | `lcm` | LCM |
//!
//! Look schedulers up by name with [`scheduler_from_name`]; an A1111 name is a class plus
//! config overrides applied on top of the model's config (e.g. "DPM++ 2M Karras" is
//! `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)`), as diffusers'
//! documentation maps them.

// Each class file holds its config, its `set_timesteps` math and its `step` math; what the classes
// share is in `state` (the state every class embeds and the `Scheduler` implementation built on
// it), `sigma_schedule` (timestep spacings and sigma schedules), `multistep` (the multistep
// solvers' history) and `common` (the config macro and checks, the float32 tensor arithmetic).
pub mod betas;
pub(crate) mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod deis_multistep;
pub mod dpm_solver_multistep;
pub mod euler_ancestral;
pub mod euler_discrete;
pub mod heun_discrete;
pub mod kdpm2_ancestral_discrete;
pub mod kdpm2_discrete;
pub mod lcm;
pub mod lms_discrete;
pub(crate) mod multistep;
pub mod numeric;
pub mod pndm;
pub(crate) mod sigma_schedule;
pub(crate) mod state;
pub mod unipc_multistep;

use candle_core::Tensor;

pub use config::{
    AlgorithmType, BetaSchedule, ConfigEnum, FinalSigmasType, InterpolationType, PredictionType,
    SchedulerConfig, SolverType, TimeShiftType, TimestepSpacing, TimestepType, VarianceType,
};
pub use ddim::{DDIMConfig, DDIMScheduler};
pub use ddpm::{DDPMConfig, DDPMScheduler};
pub use deis_multistep::{DEISMultistepConfig, DEISMultistepScheduler};
pub use dpm_solver_multistep::{DPMSolverMultistepConfig, DPMSolverMultistepScheduler};
pub use euler_ancestral::{EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler};
pub use euler_discrete::{EulerDiscreteConfig, EulerDiscreteScheduler};
pub use heun_discrete::{HeunDiscreteConfig, HeunDiscreteScheduler};
pub use kdpm2_ancestral_discrete::{KDPM2AncestralDiscreteConfig, KDPM2AncestralDiscreteScheduler};
pub use kdpm2_discrete::{KDPM2DiscreteConfig, KDPM2DiscreteScheduler};
pub use lcm::{LCMConfig, LCMScheduler};
pub use lms_discrete::{LMSDiscreteConfig, LMSDiscreteScheduler};
pub use pndm::{PNDMConfig, PNDMScheduler};
pub use unipc_multistep::{UniPCMultistepConfig, UniPCMultistepScheduler};

use crate::rng::Generators;
use crate::{Error, Result};

/// A diffusers noise scheduler: the timestep schedule and the update rule of a sampler.
///
/// Call order, as in a diffusers pipeline: [`set_timesteps`](Scheduler::set_timesteps) once, then
/// for each `t` in [`timesteps`](Scheduler::timesteps): [`scale_model_input`](Scheduler::scale_model_input),
/// run the model, [`step`](Scheduler::step). Schedulers keep per-run state (step index, model
/// output history), so use one instance per run.
///
/// Tensors go in as any float dtype and come out as f32: the arithmetic is done in f32, as
/// diffusers does for f32 latents.
pub trait Scheduler: Send + Sync {
    /// The diffusers class this scheduler reproduces, e.g. `"EulerDiscreteScheduler"`.
    fn class_name(&self) -> &'static str;

    /// The resolved config, like diffusers' `scheduler.config`: every key of the class with its
    /// value, `_use_default_values`, `_class_name`, and the source's other keys. Another
    /// scheduler can be built from it (`Other.from_config(scheduler.config)`).
    fn config(&self) -> &SchedulerConfig;

    /// Sets the number of denoising steps and computes the timesteps (diffusers'
    /// `set_timesteps(num_inference_steps)`). Errors on 0 or more than `num_train_timesteps`.
    /// Resets the per-run state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The number of steps given to the last [`set_timesteps`](Scheduler::set_timesteps), if any.
    fn num_inference_steps(&self) -> Option<usize>;

    /// The timesteps the model is called with, in order (integers for DDIM, float32 values for the
    /// sigma-based schedulers; multi-stage schedulers repeat some).
    fn timesteps(&self) -> &[f64];

    /// The sigmas of the current schedule (diffusers' `scheduler.sigmas`, float32 values), for the
    /// schedulers that have them.
    fn sigmas(&self) -> Option<Vec<f64>> {
        None
    }

    /// The standard deviation of the initial noise: multiply `randn` latents by it.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the denoising model input for `timestep` (e.g. `sample / sqrt(sigma^2 + 1)` for the
    /// sigma-based schedulers, the identity for DDIM). Takes `&mut self` because schedulers that
    /// track a step index set it on the first call, as diffusers does.
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// One denoising step: from the model output at `timestep` and the current `sample`, returns
    /// the previous (less noisy) sample, in f32. Noise, when the scheduler adds some, is drawn
    /// from `generators` so the stream continues exactly as diffusers' `generator=`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor>;

    /// The model's prediction of the clean sample `x_0` at the last [`step`](Scheduler::step)
    /// (diffusers' `pred_original_sample`), for previews.
    fn pred_original_sample(&self) -> Option<&Tensor> {
        None
    }

    /// Noises clean samples to the noise level of `timestep` (diffusers' `add_noise`, with the
    /// same timestep for every batch element), for image-to-image.
    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timestep: f64)
        -> Result<Tensor>;

    /// Sets the index of the first step to run (diffusers' `set_begin_index`), for pipelines that
    /// start part-way through the schedule. A no-op for schedulers without a step index.
    fn set_begin_index(&mut self, _begin_index: usize) {}

    /// How many model evaluations a step takes (diffusers' `order`).
    fn order(&self) -> usize {
        1
    }

    /// Sets a keyword argument of diffusers' `step()` for the following steps, e.g. `"eta"` for
    /// DDIM or `"s_churn"` for Euler. Unknown names are an error listing the valid ones.
    fn set_step_option(&mut self, name: &str, _value: f64) -> Result<()> {
        Err(Error::invalid(format!("{} has no step option `{name}`", self.class_name())))
    }
}

/// A scheduler name and how it maps to a diffusers class (plus config overrides, e.g.
/// `use_karras_sigmas`).
#[derive(Debug, Clone, Copy)]
pub struct SchedulerEntry {
    /// The diffusers class.
    pub class_name: &'static str,
    /// Short snake-case names (matched as described at [`normalize_scheduler_name`]).
    pub aliases: &'static [&'static str],
    /// The AUTOMATIC1111 web UI names of this entry (e.g. "DPM++ 2M Karras"), as diffusers'
    /// documentation maps them; empty when A1111 has no equivalent.
    pub a1111_names: &'static [&'static str],
    /// Config keys forced on top of the model's config, as `from_config(config, key=value)`.
    pub overrides: &'static [(&'static str, OverrideValue)],
    build: fn(&SchedulerConfig) -> Result<Box<dyn Scheduler>>,
}

/// A config value forced by a [`SchedulerEntry`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OverrideValue {
    /// A JSON boolean.
    Bool(bool),
    /// A JSON string.
    Str(&'static str),
    /// A JSON number.
    Float(f64),
}

impl From<OverrideValue> for serde_json::Value {
    fn from(v: OverrideValue) -> Self {
        match v {
            OverrideValue::Bool(b) => b.into(),
            OverrideValue::Str(s) => s.into(),
            OverrideValue::Float(f) => f.into(),
        }
    }
}

macro_rules! builders {
    ($($fn_name:ident => $ty:ty),* $(,)?) => {
        $(fn $fn_name(c: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
            Ok(Box::new(<$ty>::from_config(c)?))
        })*
    };
}

builders! {
    build_euler => EulerDiscreteScheduler,
    build_euler_a => EulerAncestralDiscreteScheduler,
    build_dpm => DPMSolverMultistepScheduler,
    build_ddim => DDIMScheduler,
    build_pndm => PNDMScheduler,
    build_lms => LMSDiscreteScheduler,
    build_heun => HeunDiscreteScheduler,
    build_unipc => UniPCMultistepScheduler,
    build_ddpm => DDPMScheduler,
    build_kdpm2 => KDPM2DiscreteScheduler,
    build_kdpm2_a => KDPM2AncestralDiscreteScheduler,
    build_deis => DEISMultistepScheduler,
    build_lcm => LCMScheduler,
}

const KARRAS: (&str, OverrideValue) = ("use_karras_sigmas", OverrideValue::Bool(true));
const SDE_DPMPP: (&str, OverrideValue) = ("algorithm_type", OverrideValue::Str("sde-dpmsolver++"));

macro_rules! entry {
    ($class:literal, $build:ident, [$($alias:literal),*], [$($a1111:literal),*], [$($ov:expr),*]) => {
        SchedulerEntry { class_name: $class, aliases: &[$($alias),*], a1111_names: &[$($a1111),*], overrides: &[$($ov),*], build: $build }
    };
}

/// Every scheduler name this build knows: each entry is a diffusers class plus config overrides,
/// with its short names and the A1111 (AUTOMATIC1111 web UI) names that map to it in diffusers'
/// documentation. Names are matched case-insensitively, ignoring spaces, `-` and `_`, with `+`
/// read as `p` ("DPM++ 2M" = `dpmpp_2m`).
pub const SCHEDULERS: &[SchedulerEntry] = &[
    entry!("EulerDiscreteScheduler", build_euler, ["euler"], ["Euler"], []),
    entry!("EulerDiscreteScheduler", build_euler, ["euler_karras"], [], [KARRAS]),
    entry!(
        "EulerAncestralDiscreteScheduler",
        build_euler_a,
        ["euler_a", "euler_ancestral"],
        ["Euler a"],
        []
    ),
    entry!(
        "DPMSolverMultistepScheduler",
        build_dpm,
        ["dpmpp_2m", "dpm_solver_multistep"],
        ["DPM++ 2M"],
        []
    ),
    entry!(
        "DPMSolverMultistepScheduler",
        build_dpm,
        ["dpmpp_2m_karras"],
        ["DPM++ 2M Karras"],
        [KARRAS]
    ),
    entry!(
        "DPMSolverMultistepScheduler",
        build_dpm,
        ["dpmpp_2m_sde"],
        ["DPM++ 2M SDE"],
        [SDE_DPMPP]
    ),
    entry!(
        "DPMSolverMultistepScheduler",
        build_dpm,
        ["dpmpp_2m_sde_karras"],
        ["DPM++ 2M SDE Karras"],
        [SDE_DPMPP, KARRAS]
    ),
    entry!("DDIMScheduler", build_ddim, ["ddim"], ["DDIM"], []),
    entry!("PNDMScheduler", build_pndm, ["pndm"], ["PNDM"], []),
    entry!(
        "PNDMScheduler",
        build_pndm,
        ["plms"],
        [],
        [("skip_prk_steps", OverrideValue::Bool(true))]
    ),
    entry!("LMSDiscreteScheduler", build_lms, ["lms"], ["LMS"], []),
    entry!("LMSDiscreteScheduler", build_lms, ["lms_karras"], ["LMS Karras"], [KARRAS]),
    entry!("HeunDiscreteScheduler", build_heun, ["heun"], ["Heun"], []),
    entry!("UniPCMultistepScheduler", build_unipc, ["unipc"], ["UniPC"], []),
    entry!("DDPMScheduler", build_ddpm, ["ddpm"], [], []),
    entry!("KDPM2DiscreteScheduler", build_kdpm2, ["dpm2", "kdpm2"], ["DPM2"], []),
    entry!(
        "KDPM2DiscreteScheduler",
        build_kdpm2,
        ["dpm2_karras", "kdpm2_karras"],
        ["DPM2 Karras"],
        [KARRAS]
    ),
    entry!("KDPM2AncestralDiscreteScheduler", build_kdpm2_a, ["dpm2_a", "kdpm2_a"], ["DPM2 a"], []),
    entry!(
        "KDPM2AncestralDiscreteScheduler",
        build_kdpm2_a,
        ["dpm2_a_karras", "kdpm2_a_karras"],
        ["DPM2 a Karras"],
        [KARRAS]
    ),
    entry!("DEISMultistepScheduler", build_deis, ["deis"], ["DEIS"], []),
    entry!("LCMScheduler", build_lcm, ["lcm"], ["LCM"], []),
];

/// The comparison key of a scheduler name: lowercase, `+` read as `p`, without spaces, `-` and
/// `_` (so "DPM++ 2M Karras", `dpmpp_2m_karras` and "dpmpp-2m-karras" are one name).
pub fn normalize_scheduler_name(name: &str) -> String {
    name.trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == '+' { 'p' } else { c.to_ascii_lowercase() })
        .collect()
}

/// The accepted scheduler names: each diffusers class name, then its short names and A1111 names.
pub fn scheduler_names() -> Vec<&'static str> {
    let mut names = Vec::new();
    for e in SCHEDULERS {
        if !names.contains(&e.class_name) {
            names.push(e.class_name);
        }
        for n in e.aliases.iter().chain(e.a1111_names) {
            if !names.contains(n) {
                names.push(*n);
            }
        }
    }
    names
}

/// Finds the registry entry for `name` (a diffusers class name, a short name or an A1111 name).
/// A class name means the class without overrides.
pub fn find_scheduler(name: &str) -> Result<&'static SchedulerEntry> {
    let wanted = normalize_scheduler_name(name);
    SCHEDULERS
        .iter()
        .find(|e| {
            e.aliases.iter().chain(e.a1111_names).any(|a| normalize_scheduler_name(a) == wanted)
        })
        .or_else(|| {
            SCHEDULERS.iter().find(|e| {
                e.overrides.is_empty() && normalize_scheduler_name(e.class_name) == wanted
            })
        })
        .ok_or_else(|| Error::UnknownScheduler {
            name: name.to_string(),
            valid: scheduler_names().join(", "),
        })
}

/// Builds the scheduler `name` (a diffusers class name like `"EulerDiscreteScheduler"`, a short
/// name like `"euler"` or an A1111 name like `"DPM++ 2M Karras"`) from `config` with diffusers'
/// `from_config` semantics, the entry's overrides applied on top (as
/// `from_config(config, key=value)`). Unknown names give [`Error::UnknownScheduler`] listing the
/// valid ones.
pub fn scheduler_from_name(name: &str, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    find_scheduler(name)?.build(config)
}

impl SchedulerEntry {
    /// Builds this entry's scheduler from `config` with its overrides applied.
    pub fn build(&self, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
        if self.overrides.is_empty() {
            return (self.build)(config);
        }
        (self.build)(&self.apply_overrides(config))
    }

    /// `config` with this entry's overrides set (what `from_config(config, **overrides)` sees).
    pub fn apply_overrides(&self, config: &SchedulerConfig) -> SchedulerConfig {
        let mut config = config.clone();
        for (k, v) in self.overrides {
            config.set(*k, *v);
        }
        config
    }

    /// The name to show for this entry: its A1111 name, else its first short name.
    pub fn display_name(&self) -> &'static str {
        self.a1111_names.first().or(self.aliases.first()).copied().unwrap_or(self.class_name)
    }
}
