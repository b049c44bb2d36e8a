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
//! Implemented: [`EulerDiscreteScheduler`] (`euler`, `euler_karras`) and [`DDIMScheduler`]
//! (`ddim`). Look schedulers up by name with [`scheduler_from_name`].

pub mod betas;
pub mod config;
pub mod ddim;
pub mod euler_discrete;
pub mod numeric;

use candle_core::{DType, Tensor};

pub use config::{
    BetaSchedule, ConfigEnum, FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
    TimestepType,
};
pub use ddim::{DDIMConfig, DDIMScheduler};
pub use euler_discrete::{EulerDiscreteConfig, EulerDiscreteScheduler};

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

    /// The standard deviation of the initial noise: multiply `randn` latents by it.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the denoising model input for `timestep` (e.g. `sample / sqrt(sigma^2 + 1)` for the
    /// sigma-based schedulers, the identity for DDIM). Takes `&mut self` because schedulers that
    /// track a step index set it on the first call, as diffusers does.
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// One denoising step: from the model output at `timestep` and the current `sample`, returns
    /// the previous (less noisy) sample, in f32. Noise, when the scheduler adds some, is drawn
    /// from `generators` so the stream continues exactly as diffusers' `generator=`.
    fn step(&mut self, model_output: &Tensor, timestep: f64, sample: &Tensor, generators: &mut Generators) -> Result<Tensor>;

    /// The model's prediction of the clean sample `x_0` at the last [`step`](Scheduler::step)
    /// (diffusers' `pred_original_sample`), for previews.
    fn pred_original_sample(&self) -> Option<&Tensor> {
        None
    }

    /// Noises clean samples to the noise level of `timestep` (diffusers' `add_noise`, with the
    /// same timestep for every batch element), for image-to-image.
    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;

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
    /// Short names (matched case-insensitively, with ` `, `-` and `_` equivalent).
    pub aliases: &'static [&'static str],
    /// Config keys forced on top of the model's config, as `from_config(config, key=value)`.
    pub overrides: &'static [(&'static str, OverrideValue)],
    build: fn(&SchedulerConfig) -> Result<Box<dyn Scheduler>>,
}

/// A config value forced by a [`SchedulerEntry`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OverrideValue {
    Bool(bool),
    Str(&'static str),
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

fn build_euler(c: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(EulerDiscreteScheduler::from_config(c)?))
}

fn build_ddim(c: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(DDIMScheduler::from_config(c)?))
}

/// Every scheduler name this build knows. A1111's names ("Euler", "DDIM", ...) are matched by the
/// case- and separator-insensitive comparison.
pub const SCHEDULERS: &[SchedulerEntry] = &[
    SchedulerEntry { class_name: "EulerDiscreteScheduler", aliases: &["euler"], overrides: &[], build: build_euler },
    SchedulerEntry {
        class_name: "EulerDiscreteScheduler",
        aliases: &["euler_karras"],
        overrides: &[("use_karras_sigmas", OverrideValue::Bool(true))],
        build: build_euler,
    },
    SchedulerEntry { class_name: "DDIMScheduler", aliases: &["ddim"], overrides: &[], build: build_ddim },
];

fn normalize(name: &str) -> String {
    name.trim().chars().map(|c| if c == ' ' || c == '-' { '_' } else { c.to_ascii_lowercase() }).collect()
}

/// The accepted scheduler names: each diffusers class name, then its short names.
pub fn scheduler_names() -> Vec<&'static str> {
    let mut names = Vec::new();
    for e in SCHEDULERS {
        if !names.contains(&e.class_name) {
            names.push(e.class_name);
        }
        names.extend(e.aliases.iter().copied());
    }
    names
}

/// Finds the registry entry for `name` (a diffusers class name or a short name).
pub fn find_scheduler(name: &str) -> Result<&'static SchedulerEntry> {
    let wanted = normalize(name);
    SCHEDULERS
        .iter()
        .find(|e| e.aliases.iter().any(|a| normalize(a) == wanted))
        .or_else(|| SCHEDULERS.iter().find(|e| e.overrides.is_empty() && normalize(e.class_name) == wanted))
        .ok_or_else(|| Error::UnknownScheduler { name: name.to_string(), valid: scheduler_names().join(", ") })
}

/// Builds the scheduler `name` (a diffusers class name like `"EulerDiscreteScheduler"` or a short
/// name like `"euler"`, case-insensitive) from `config` with diffusers' `from_config` semantics.
/// Unknown names give [`Error::UnknownScheduler`] listing the valid ones.
pub fn scheduler_from_name(name: &str, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let entry = find_scheduler(name)?;
    if entry.overrides.is_empty() {
        return (entry.build)(config);
    }
    let mut config = config.clone();
    for (k, v) in entry.overrides {
        config.set(*k, *v);
    }
    (entry.build)(&config)
}

// ---- helpers shared by the implementations ----

/// diffusers' `index_for_timestep`: the position of `timestep` in `schedule` (compared as f32,
/// like the float32 timestep tensors), taking the second match when there are several.
pub(crate) fn index_for_timestep(schedule: &[f64], timestep: f64) -> Option<usize> {
    let t = timestep as f32;
    let mut matches = schedule.iter().enumerate().filter(|(_, &s)| s as f32 == t).map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// `t` as f32 (the dtype diffusers does the arithmetic in).
pub(crate) fn to_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// `t * s` in f32 (a tensor times a float32 0-d tensor in torch).
pub(crate) fn mul(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.affine(s as f64, 0.0)?)
}

/// `t / s` in f32, a true division like torch's (not a multiplication by `1 / s`).
pub(crate) fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&Tensor::new(s, t.device())?)?)
}

/// Checks that two tensors have the same shape.
pub(crate) fn same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::invalid(format!("{what}: shapes differ: {:?} vs {:?}", a.dims(), b.dims())));
    }
    Ok(())
}

/// Validates `num_inference_steps` against `num_train_timesteps`.
pub(crate) fn check_steps(num_inference_steps: usize, num_train_timesteps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::invalid("num_inference_steps must be at least 1"));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "num_inference_steps ({num_inference_steps}) cannot be larger than num_train_timesteps ({num_train_timesteps})"
        )));
    }
    Ok(())
}
