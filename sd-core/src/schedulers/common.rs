//! Building blocks shared by the scheduler implementations: the typed-config macro and config
//! checks, and the float32 tensor and scalar arithmetic of the steps.
//!
//! Every function says which numpy / torch computation it reproduces and in which precision:
//! diffusers does the per-step scalar arithmetic on float32 0-d tensors.

use candle_core::{DType, Tensor};
use serde_json::{Map, Value};

use super::betas::TrainingSchedule;
use super::config::{BetaSchedule, ConfigReader, PredictionType, SchedulerConfig};
use crate::{Error, Result};

// ---- typed configs ----

/// Declares the typed `__init__` arguments of a diffusers scheduler class: the struct (every
/// field public, with its doc), `Default` with the class defaults, the public `from_config`
/// reader and the [`ConfigFields`] implementation. Field kinds name the [`ConfigReader`] method
/// that reads them. Every class starts with the training-schedule keys (`num_train_timesteps`,
/// `beta_start`, `beta_end`, `beta_schedule` with the class defaults given, then
/// `trained_betas`); `rescale_betas_zero_snr` is optional. Groups of keys several classes
/// declare alike are written `..group,` (`sigma_schedule_flags`, `thresholding_keys`,
/// `flow_sigma_keys`, `dynamic_shifting_keys`). The keys keep their order: it is the order of
/// `_use_default_values`.
macro_rules! scheduler_config {
    (
        $(#[$m:meta])*
        pub struct $name:ident for $class:literal {
            num_train_timesteps = $n:expr, beta_start = $start:expr, beta_end = $end:expr,
            beta_schedule = $schedule:expr;
            $($fields:tt)*
        }
    ) => {
        $crate::schedulers::common::scheduler_config! {
            @fields [$(#[$m])* $name $class] [
                /// Number of diffusion steps the model was trained with.
                num_train_timesteps: usize = $n => usize,
                /// First training beta.
                beta_start: f64 = $start => f64,
                /// Last training beta.
                beta_end: f64 = $end => f64,
                /// How the betas go from `beta_start` to `beta_end`.
                beta_schedule: $crate::schedulers::BetaSchedule = $schedule => choice,
                /// Explicit betas, overriding `beta_start`/`beta_end`/`beta_schedule`.
                trained_betas: Option<Vec<f64>> = None => opt_f64_vec,
            ]
            $($fields)*
        }
    };
    // Groups of keys that several classes share (with their docs), written `..group,`.
    (@fields $head:tt [$($done:tt)*] ..sigma_schedule_flags, $($rest:tt)*) => {
        $crate::schedulers::common::scheduler_config! {
            @fields $head [$($done)*
                /// Use the Karras et al. (2022) sigma schedule (rho = 7).
                use_karras_sigmas: bool = false => bool,
                /// Use exponentially spaced sigmas.
                use_exponential_sigmas: bool = false => bool,
                /// Beta sigmas need scipy's beta quantile function; not supported (an error if
                /// true).
                use_beta_sigmas: bool = false => bool,
            ]
            $($rest)*
        }
    };
    (@fields $head:tt [$($done:tt)*] ..thresholding_keys, $($rest:tt)*) => {
        $crate::schedulers::common::scheduler_config! {
            @fields $head [$($done)*
                /// Dynamic thresholding is not supported: `true` is a config error.
                thresholding: bool = false => bool,
                /// Kept for config round trips (thresholding is not supported).
                dynamic_thresholding_ratio: f64 = 0.995 => f64,
                /// Kept for config round trips (thresholding is not supported).
                sample_max_value: f64 = 1.0 => f64,
            ]
            $($rest)*
        }
    };
    (@fields $head:tt [$($done:tt)*] ..flow_sigma_keys, $($rest:tt)*) => {
        $crate::schedulers::common::scheduler_config! {
            @fields $head [$($done)*
                /// Flow-matching sigmas are not supported (an error if true).
                use_flow_sigmas: bool = false => bool,
                /// Kept for config round trips (flow sigmas are not supported).
                flow_shift: f64 = 1.0 => f64,
            ]
            $($rest)*
        }
    };
    (@fields $head:tt [$($done:tt)*] ..dynamic_shifting_keys, $($rest:tt)*) => {
        $crate::schedulers::common::scheduler_config! {
            @fields $head [$($done)*
                /// Dynamic shifting (flow models) is not supported (an error if true).
                use_dynamic_shifting: bool = false => bool,
                /// Kept for config round trips.
                time_shift_type: $crate::schedulers::TimeShiftType =
                    $crate::schedulers::TimeShiftType::Exponential => choice,
            ]
            $($rest)*
        }
    };
    (
        @fields $head:tt [$($done:tt)*]
        $(#[$fm:meta])* $field:ident : $ty:ty = $default:expr => $kind:ident, $($rest:tt)*
    ) => {
        $crate::schedulers::common::scheduler_config! {
            @fields $head [$($done)* $(#[$fm])* $field: $ty = $default => $kind,] $($rest)*
        }
    };
    (@fields [$(#[$m:meta])* $name:ident $class:literal] [$($done:tt)*]) => {
        $crate::schedulers::common::scheduler_config! {
            @declare $(#[$m])* $name $class { $($done)* }
        }
    };
    (
        @declare $(#[$m:meta])* $name:ident $class:literal {
            $( $(#[$fm:meta])* $field:ident : $ty:ty = $default:expr => $kind:ident ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$fm])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl $name {
            #[doc = concat!("Reads the config with `", $class, ".from_config(config)` semantics.")]
            pub fn from_config(
                config: &$crate::schedulers::SchedulerConfig,
            ) -> $crate::Result<Self> {
                $crate::schedulers::common::read_config(config, $class)
            }
        }

        impl $crate::schedulers::common::ConfigFields for $name {
            fn read_fields(
                r: &mut $crate::schedulers::config::ConfigReader<'_>,
            ) -> $crate::Result<Self> {
                use $crate::schedulers::common::read_field;
                let d = Self::default();
                Ok(Self { $( $field: read_field!(r, $kind, stringify!($field), d.$field), )* })
            }

            fn write(&self) -> serde_json::Map<String, serde_json::Value> {
                use $crate::schedulers::common::write_field;
                let mut w = $crate::schedulers::config::ConfigWriter::default();
                $( write_field!(w, $kind, stringify!($field), &self.$field); )*
                w.0
            }

            fn training_schedule(
                &self,
            ) -> $crate::Result<$crate::schedulers::betas::TrainingSchedule> {
                $crate::schedulers::betas::TrainingSchedule::new(
                    self.beta_schedule,
                    self.beta_start,
                    self.beta_end,
                    self.num_train_timesteps,
                    self.trained_betas.as_deref(),
                    self.rescale_betas_zero_snr(),
                )
            }

            fn num_train_timesteps(&self) -> usize {
                self.num_train_timesteps
            }

            fn timestep_spacing(&self) -> $crate::schedulers::TimestepSpacing {
                self.timestep_spacing
            }

            fn steps_offset(&self) -> i64 {
                self.steps_offset
            }

            fn rescale_betas_zero_snr(&self) -> bool {
                use $crate::schedulers::common::rescale_flag;
                false $( || rescale_flag!(self, $field) )*
            }
        }
    };
}
pub(crate) use scheduler_config;

/// `$config.rescale_betas_zero_snr` when `$field` is that key, `false` for the other fields (the
/// classes without the key never rescale).
macro_rules! rescale_flag {
    ($config:ident, rescale_betas_zero_snr) => {
        $config.rescale_betas_zero_snr
    };
    ($config:ident, $other:ident) => {
        false
    };
}
pub(crate) use rescale_flag;

macro_rules! read_field {
    ($r:ident, usize, $k:expr, $d:expr) => {
        $r.usize($k, $d)?
    };
    ($r:ident, f64, $k:expr, $d:expr) => {
        $r.f64($k, $d)?
    };
    ($r:ident, i64, $k:expr, $d:expr) => {
        $r.i64($k, $d)?
    };
    ($r:ident, bool, $k:expr, $d:expr) => {
        $r.bool($k, $d)?
    };
    ($r:ident, opt_f64, $k:expr, $d:expr) => {{
        let _ = $d;
        $r.opt_f64($k)?
    }};
    ($r:ident, opt_f64_vec, $k:expr, $d:expr) => {{
        let _ = $d;
        $r.opt_f64_vec($k)?
    }};
    ($r:ident, choice, $k:expr, $d:expr) => {
        $r.choice($k, $d)?
    };
    ($r:ident, opt_choice, $k:expr, $d:expr) => {{
        let _ = $d;
        $r.opt_choice($k)?
    }};
    ($r:ident, usize_vec, $k:expr, $d:expr) => {
        $r.usize_vec($k, $d)?
    };
}
pub(crate) use read_field;

macro_rules! write_field {
    ($w:ident, usize, $k:expr, $v:expr) => {
        $w.set($k, *$v)
    };
    ($w:ident, f64, $k:expr, $v:expr) => {
        $w.set($k, *$v)
    };
    ($w:ident, i64, $k:expr, $v:expr) => {
        $w.set($k, *$v)
    };
    ($w:ident, bool, $k:expr, $v:expr) => {
        $w.set($k, *$v)
    };
    ($w:ident, opt_f64, $k:expr, $v:expr) => {
        $w.opt_f64($k, *$v)
    };
    ($w:ident, opt_f64_vec, $k:expr, $v:expr) => {
        $w.opt_f64_vec($k, $v.as_deref())
    };
    ($w:ident, choice, $k:expr, $v:expr) => {
        $w.choice($k, *$v)
    };
    ($w:ident, opt_choice, $k:expr, $v:expr) => {
        $w.opt_choice($k, *$v)
    };
    ($w:ident, usize_vec, $k:expr, $v:expr) => {
        $w.usize_vec($k, $v)
    };
}
pub(crate) use write_field;

/// What [`scheduler_config!`] generates for a typed config: reading and writing its keys, and
/// the training schedule and spacing every class has.
pub(crate) trait ConfigFields: Sized {
    /// Every key with `from_config` semantics, without the class's checks.
    fn read_fields(r: &mut ConfigReader<'_>) -> Result<Self>;
    /// The keys and values of the resolved config.
    fn write(&self) -> Map<String, Value>;
    /// The betas and `alphas_cumprod` of the config's training schedule.
    fn training_schedule(&self) -> Result<TrainingSchedule>;
    /// `num_train_timesteps`.
    fn num_train_timesteps(&self) -> usize;
    /// `timestep_spacing`.
    fn timestep_spacing(&self) -> super::TimestepSpacing;
    /// `steps_offset`.
    fn steps_offset(&self) -> i64;
    /// `rescale_betas_zero_snr` (false for the classes without the key).
    fn rescale_betas_zero_snr(&self) -> bool;
}

/// The per-class part of a typed config: the checks (and renames) of diffusers' `__init__`.
pub(crate) trait ClassConfig: ConfigFields {
    /// Errors on values the class rejects (as [`ConfigReader::error`]s); may normalise others
    /// the way diffusers does (e.g. DPM-Solver reads `solver_type: "bh2"` as `midpoint`).
    fn validate(self, r: &mut ConfigReader<'_>) -> Result<Self>;

    /// The class's own keys of the resolved config (`scheduler.config`).
    fn resolved_values(&self) -> Map<String, Value> {
        self.write()
    }
}

/// Reads the typed config of `class` from `config` with `from_config` semantics.
pub(crate) fn read_config<C: ClassConfig>(
    config: &SchedulerConfig,
    class: &'static str,
) -> Result<C> {
    read_typed(&mut ConfigReader::new(config, class))
}

/// The typed config of `r`: its fields, the class's checks, and the checks every class shares.
pub(crate) fn read_typed<C: ClassConfig>(r: &mut ConfigReader<'_>) -> Result<C> {
    let c = C::read_fields(r)?.validate(r)?;
    // Found by fuzzing: an offset near i64::MAX overflowed the timestep arithmetic of the steps.
    // Larger than the training schedule, it could only give timesteps outside it.
    let max = super::betas::MAX_TRAIN_TIMESTEPS;
    if c.steps_offset().unsigned_abs() > max as u64 {
        let msg = format!("{} is outside -{max}..={max}", c.steps_offset());
        return Err(r.error("steps_offset", msg));
    }
    Ok(c)
}

/// The beta schedules every class here implements.
pub(crate) const STANDARD_BETAS: &[BetaSchedule] =
    &[BetaSchedule::Linear, BetaSchedule::ScaledLinear, BetaSchedule::SquaredcosCapV2];

/// The prediction types of the classes that do not implement `sample`.
pub(crate) const EPSILON_OR_V: &[PredictionType] =
    &[PredictionType::Epsilon, PredictionType::VPrediction];

/// The checks of the classes with `..sigma_schedule_flags`: a beta schedule they implement, at
/// most one alternative sigma schedule, and no beta sigmas (which need scipy's `beta.ppf`). `$c`
/// is the typed config.
macro_rules! check_sigma_config {
    ($r:expr, $c:expr) => {{
        let (r, c) = (&*$r, $c);
        r.check_among(
            "beta_schedule",
            c.beta_schedule,
            $crate::schedulers::common::STANDARD_BETAS,
        )?;
        let flags = [c.use_karras_sigmas, c.use_exponential_sigmas, c.use_beta_sigmas];
        $crate::schedulers::common::check_sigma_flags(r, flags)?;
    }};
}
pub(crate) use check_sigma_config;

/// Errors when more than one of `[karras, exponential, beta]` sigmas is chosen, or beta sigmas
/// are.
pub(crate) fn check_sigma_flags(
    r: &ConfigReader<'_>,
    [karras, exponential, beta]: [bool; 3],
) -> Result<()> {
    if [karras, exponential, beta].iter().filter(|&&b| b).count() > 1 {
        return Err(r.error(
            "use_karras_sigmas",
            "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be true",
        ));
    }
    if beta {
        return Err(r.error(
            "use_beta_sigmas",
            "beta sigmas are not supported (they need scipy's beta.ppf)",
        ));
    }
    Ok(())
}

/// Errors when a flag that this implementation does not support is set.
pub(crate) fn reject_flag(
    r: &ConfigReader<'_>,
    key: &'static str,
    value: bool,
    what: &str,
) -> Result<()> {
    if value {
        return Err(r.error(key, format!("{what} is not supported; set it to false")));
    }
    Ok(())
}

/// Errors unless `solver_order` is 1, 2 or 3 (the multistep solvers).
pub(crate) fn check_solver_order(r: &ConfigReader<'_>, solver_order: usize) -> Result<()> {
    if !(1..=3).contains(&solver_order) {
        return Err(r.error("solver_order", format!("must be 1, 2 or 3, got {solver_order}")));
    }
    Ok(())
}

// ---- arguments ----

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

/// Checks that two tensors have the same shape.
pub(crate) fn same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::invalid(format!(
            "{what}: shapes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

/// `t` as an integer timestep (the multistep solvers, DDIM, DDPM, PNDM and LCM take integer
/// timesteps).
pub(crate) fn int_timestep(timestep: f64, class: &str) -> Result<i64> {
    if timestep.fract() != 0.0 || !timestep.is_finite() {
        return Err(Error::invalid(format!("{class} takes integer timesteps, got {timestep}")));
    }
    Ok(timestep as i64)
}

/// `alphas_cumprod[t]`, checked.
pub(crate) fn alpha_at(alphas_cumprod: &[f32], t: i64, class: &str) -> Result<f32> {
    usize::try_from(t).ok().and_then(|i| alphas_cumprod.get(i).copied()).ok_or_else(|| {
        Error::invalid(format!("{class}: timestep {t} is outside 0..{}", alphas_cumprod.len()))
    })
}

/// Errors unless `i` (a sigma index) is inside the schedule.
pub(crate) fn sigma_at(sigmas: &[f32], i: usize, class: &str) -> Result<f32> {
    sigmas.get(i).copied().ok_or_else(|| {
        Error::invalid(format!("{class}: step index {i} is past the end of the schedule"))
    })
}

// ---- float32 tensor arithmetic ----

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

/// `sqrt(alpha_prod) * original + sqrt(1 - alpha_prod) * noise` in float32 (DDPM-style
/// `add_noise`).
pub(crate) fn alpha_add_noise(
    original: &Tensor,
    noise: &Tensor,
    alpha_prod: f32,
) -> Result<Tensor> {
    Ok((mul(&to_f32(original)?, alpha_prod.sqrt())?
        + mul(&to_f32(noise)?, (1.0 - alpha_prod).sqrt())?)?)
}

/// The `pred_original_sample` of DDPM, LCM and DDIM from the model output at `alpha_prod_t`
/// (epsilon: `(x - sqrt(1 - a) eps) / sqrt(a)`, v: `sqrt(a) x - sqrt(1 - a) v`), clipped to
/// `[-clip, clip]` when `clip` is given, in float32.
pub(crate) fn alpha_pred_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
    clip: Option<f64>,
) -> Result<Tensor> {
    let beta_prod_t = 1.0 - alpha_prod_t;
    let pred = match prediction {
        PredictionType::Epsilon => {
            div(&(sample - mul(model_output, beta_prod_t.sqrt())?)?, alpha_prod_t.sqrt())?
        }
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => {
            (mul(sample, alpha_prod_t.sqrt())? - mul(model_output, beta_prod_t.sqrt())?)?
        }
    };
    Ok(match clip {
        Some(range) => pred.clamp(-(range as f32), range as f32)?,
        None => pred,
    })
}

/// `sample / (sigma ** 2 + 1) ** 0.5` in float32 (the k-diffusion classes' `scale_model_input`).
pub(crate) fn k_scale(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    div(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())
}

/// The k-diffusion `pred_original_sample` from an epsilon or v prediction at `sigma` (`sample`
/// predictions are the model output itself).
pub(crate) fn k_pred_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => (sample - mul(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let s2p1 = sigma * sigma + 1.0;
            (mul(model_output, -sigma / s2p1.sqrt())? + div(sample, s2p1)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

/// The k-diffusion Euler update `sample + (sample - pred_original) / sigma * dt` in float32
/// (the derivative is returned too, for Heun's second evaluation).
pub(crate) fn euler_update(
    sample: &Tensor,
    pred_original: &Tensor,
    sigma: f32,
    dt: f32,
) -> Result<(Tensor, Tensor)> {
    let derivative = div(&(sample - pred_original)?, sigma)?;
    let prev = (sample + mul(&derivative, dt)?)?;
    Ok((prev, derivative))
}
