//! Building blocks shared by the scheduler implementations: the typed-config macro, the
//! timestep spacings, the sigma conversions (Karras, exponential, `sigma -> t`), the step-index
//! bookkeeping and the float32 scalar arithmetic of the multistep solvers.
//!
//! Every function says which numpy / torch computation it reproduces and in which precision:
//! diffusers builds its schedules with numpy float64 over float32 torch tensors, and does the
//! per-step scalar arithmetic on float32 0-d tensors.

use candle_core::Tensor;

use super::betas::TrainingSchedule;
use super::config::{BetaSchedule, ConfigEnum, ConfigReader, SchedulerConfig, TimestepSpacing};
use super::numeric::{np_arange, np_interp, np_linspace, np_log_f32, np_round};
use super::{mul, to_f32};
use crate::{Error, Result};

/// Declares the typed `__init__` arguments of a diffusers scheduler class: the struct (every
/// field public, with its doc), `Default` with the class defaults, and the `from_config` reader
/// and resolved-config writer. Field kinds name the [`ConfigReader`] method that reads them.
macro_rules! scheduler_config {
    (
        $(#[$m:meta])*
        pub struct $name:ident {
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
            fn read_fields(r: &mut $crate::schedulers::config::ConfigReader<'_>) -> $crate::Result<Self> {
                let d = Self::default();
                Ok(Self { $( $field: $crate::schedulers::common::read_field!(r, $kind, stringify!($field), d.$field), )* })
            }

            fn write(&self) -> serde_json::Map<String, serde_json::Value> {
                let mut w = $crate::schedulers::config::ConfigWriter::default();
                $( $crate::schedulers::common::write_field!(w, $kind, stringify!($field), &self.$field); )*
                w.0
            }
        }
    };
}
pub(crate) use scheduler_config;

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

// ---- config helpers ----

/// Errors unless `value` is one of `allowed` (a config error naming the key and the valid values).
pub(crate) fn check_choice<T: ConfigEnum>(
    r: &ConfigReader<'_>,
    class: &str,
    key: &'static str,
    value: T,
    allowed: &[T],
) -> Result<()> {
    if allowed.contains(&value) {
        return Ok(());
    }
    let valid: Vec<&str> = allowed.iter().map(|a| a.as_str()).collect();
    Err(r.error(
        key,
        format!(
            "`{}` is not supported by {class}; valid values: {}",
            value.as_str(),
            valid.join(", ")
        ),
    ))
}

/// The beta schedules every class here implements.
pub(crate) const STANDARD_BETAS: &[BetaSchedule] =
    &[BetaSchedule::Linear, BetaSchedule::ScaledLinear, BetaSchedule::SquaredcosCapV2];

/// Errors when more than one of the alternative sigma schedules is chosen, or beta sigmas (which
/// need scipy's `beta.ppf`) are.
pub(crate) fn check_sigma_choice(
    r: &ConfigReader<'_>,
    karras: bool,
    exponential: bool,
    beta: bool,
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

/// The training schedule of a class, with construction errors reported as config errors.
#[allow(clippy::too_many_arguments)] // the config keys diffusers builds the schedule from
pub(crate) fn training_schedule(
    class: &str,
    resolved: &SchedulerConfig,
    schedule: BetaSchedule,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
    trained_betas: Option<&[f64]>,
    rescale_betas_zero_snr: bool,
) -> Result<TrainingSchedule> {
    TrainingSchedule::new(
        schedule,
        beta_start,
        beta_end,
        num_train_timesteps,
        trained_betas,
        rescale_betas_zero_snr,
    )
    .map_err(|e| {
        Error::config(
            resolved.source().unwrap_or(std::path::Path::new("<scheduler config>")),
            format!("{class}: {e}"),
        )
    })
}

// ---- timestep spacings ----

/// The float32 timesteps of the k-diffusion style schedulers (Euler, Euler ancestral, LMS, Heun,
/// KDPM2): `n` values, descending, as numpy computes them before the cast to float32.
pub(crate) fn k_timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (n_train - 1) as f64, n).into_iter().rev().map(|t| t as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| np_round((i * ratio) as f64) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as f32 - 1.0)
                .collect()
        }
    }
}

/// The integer timesteps of DDIM / DDPM (`n` values, descending).
pub(crate) fn discrete_timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| np_round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n).rev().map(|i| (i * ratio) as i64 + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    }
}

/// The integer timesteps of the multistep solvers (DPM-Solver, UniPC, DEIS): `n + 1` points with
/// the last (0) dropped for linspace/leading; `last_timestep` is the first training timestep not
/// clipped by `lambda_min_clipped` (`num_train_timesteps` otherwise).
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .map(|t| np_round(t) as i64)
                .collect();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| (i * ratio) as i64 + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(last_timestep as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    }
}

// ---- sigmas ----

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, ascending in `t`.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.log(sigmas)` of the float32 training sigmas (a float32 array, numpy's float32 `log`).
pub(crate) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|&s| np_log_f32(s)).collect()
}

/// `np.interp(timesteps, np.arange(len(sigmas)), sigmas)` in float64.
pub(crate) fn interp_sigmas(timesteps: &[f64], train_sigmas: &[f32]) -> Vec<f64> {
    let xp: Vec<f64> = (0..train_sigmas.len()).map(|i| i as f64).collect();
    let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
    np_interp(timesteps, &xp, &fp)
}

/// `_convert_to_karras`: `n` sigmas from `sigma_max` to `sigma_min` with rho = 7, in float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// `_convert_to_exponential`: `n` sigmas log-linearly spaced from `sigma_max` to `sigma_min`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n).into_iter().map(f64::exp).collect()
}

/// `_sigma_to_t(sigma, log_sigmas)` with a float64 `sigma` and the float32 `np.log` of the
/// training sigmas, in numpy's mixed precision: the (fractional) training timestep of `sigma`,
/// interpolating in log space.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last_ge = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0);
    let low_idx = last_ge.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = (low as f64 - log_sigma) / (low - high) as f64;
    let w = if w.is_nan() { w } else { w.clamp(0.0, 1.0) };
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `_sigma_to_t` as KDPM2 calls it on float32 torch tensors: every operation in float32.
pub(crate) fn sigma_to_t_f32(sigma: f32, log_sigmas: &[f32]) -> f32 {
    let log_sigma = if sigma.is_nan() { f32::NAN } else { np_log_f32(sigma.max(1e-10f64 as f32)) };
    let last_ge = log_sigmas.iter().rposition(|&l| log_sigma - l >= 0.0).unwrap_or(0);
    let low_idx = last_ge.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = (low - log_sigma) / (low - high);
    let w = if w.is_nan() { w } else { w.clamp(0.0, 1.0) };
    (1.0 - w) * low_idx as f32 + w * high_idx as f32
}

/// The alternative sigma schedule a config picks for the k-diffusion style schedulers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum SigmaKind {
    /// The interpolated training sigmas.
    Interpolated,
    /// Karras et al. (rho = 7).
    Karras,
    /// Log-linear.
    Exponential,
}

impl SigmaKind {
    pub(crate) fn new(karras: bool, exponential: bool) -> Self {
        if karras {
            SigmaKind::Karras
        } else if exponential {
            SigmaKind::Exponential
        } else {
            SigmaKind::Interpolated
        }
    }
}

/// The sigmas (float64, before the cast to float32, without the final one) and the timesteps
/// (float64, not yet rounded) of the k-diffusion style schedulers: interpolated at `timesteps`,
/// then optionally converted (bounds: `sigma_min`/`sigma_max` or the interpolated schedule's
/// ends), with the timesteps recomputed from the converted sigmas.
pub(crate) fn k_sigmas(
    kind: SigmaKind,
    timesteps: &[f32],
    train_sigmas: &[f32],
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
) -> (Vec<f64>, Vec<f64>) {
    let ts: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
    let sigmas = interp_sigmas(&ts, train_sigmas);
    let n = timesteps.len();
    let lo = sigma_min.unwrap_or(sigmas[n - 1]);
    let hi = sigma_max.unwrap_or(sigmas[0]);
    let converted = match kind {
        SigmaKind::Interpolated => return (sigmas, ts),
        SigmaKind::Karras => karras_sigmas(lo, hi, n),
        SigmaKind::Exponential => exponential_sigmas(lo, hi, n),
    };
    let logs = log_sigmas(train_sigmas);
    let ts = converted.iter().map(|&s| sigma_to_t(s, &logs)).collect();
    (converted, ts)
}

/// `1 / (sigma ** 2 + 1) ** 0.5` and `sigma * alpha_t` in float32 (`_sigma_to_alpha_sigma_t`).
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `torch.log(alpha_t) - torch.log(sigma_t)` in float32.
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `max(sigmas)` for linspace/trailing spacing, `sqrt(max(sigmas)^2 + 1)` for leading, in
/// float32 (the k-diffusion schedulers' `init_noise_sigma`).
pub(crate) fn k_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// `sample / (sigma ** 2 + 1) ** 0.5` in float32.
pub(crate) fn k_scale(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    super::div(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())
}

/// The k-diffusion `pred_original_sample` from an epsilon or v prediction at `sigma` (`sample`
/// predictions are the model output itself).
pub(crate) fn k_pred_original(
    prediction: super::PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    use super::PredictionType;
    Ok(match prediction {
        PredictionType::Epsilon => (sample - mul(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let s2p1 = sigma * sigma + 1.0;
            (mul(model_output, -sigma / s2p1.sqrt())? + super::div(sample, s2p1)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

// ---- step index ----

/// diffusers' `_step_index` / `_begin_index` pair.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepIndex {
    pub step: Option<usize>,
    pub begin: Option<usize>,
}

impl StepIndex {
    /// `_init_step_index`: the begin index if set, else the position of `timestep` in
    /// `schedule` (the second match when there are several). `or_last`: the multistep solvers'
    /// rule of taking the last index when the timestep is not in the schedule (else an error).
    pub(crate) fn init(
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
            None => match super::index_for_timestep(schedule, timestep) {
                Some(i) => i,
                None if or_last && !schedule.is_empty() => schedule.len() - 1,
                None => {
                    return Err(Error::invalid(format!(
                        "timestep {timestep} is not in the {class} schedule"
                    )))
                }
            },
        };
        self.step = Some(i);
        Ok(i)
    }

    /// The index `add_noise` uses: the timestep's own index without a begin index, else the
    /// current step index (or the begin index before the first step).
    pub(crate) fn for_add_noise(
        &self,
        schedule: &[f64],
        timestep: f64,
        class: &str,
        or_last: bool,
    ) -> Result<usize> {
        match (self.begin, self.step) {
            (None, _) => match super::index_for_timestep(schedule, timestep) {
                Some(i) => Ok(i),
                None if or_last && !schedule.is_empty() => Ok(schedule.len() - 1),
                None => Err(Error::invalid(format!(
                    "timestep {timestep} is not in the {class} schedule"
                ))),
            },
            (Some(_), Some(s)) => Ok(s),
            (Some(b), None) => Ok(b),
        }
    }

    /// Forgets the position (after `set_timesteps`).
    pub(crate) fn reset(&mut self) {
        *self = StepIndex::default();
    }
}

/// `t` as an integer timestep (the multistep solvers, DDPM, PNDM and LCM take integer
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

/// Errors unless `i` (a sigma index) is inside the schedule.
pub(crate) fn sigma_at(sigmas: &[f32], i: usize, class: &str) -> Result<f32> {
    sigmas.get(i).copied().ok_or_else(|| {
        Error::invalid(format!("{class}: step index {i} is past the end of the schedule"))
    })
}

// ---- numerics ----

/// `scipy.integrate.quad(f, a, b)` for the polynomials LMS integrates: one 21-point
/// Gauss-Kronrod rule (exact for them, and what QUADPACK returns when its error estimate passes
/// at once), summed in QUADPACK's order.
#[allow(clippy::excessive_precision)] // QUADPACK's constants, as published
pub(crate) fn gauss_kronrod_21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const XGK: [f64; 11] = [
        0.995657163025808080735527280689003,
        0.973906528517171720077964012084452,
        0.930157491355708226001207180059508,
        0.865063366688984510732096688423493,
        0.780817726586416897063717578345042,
        0.679409568299024406234327365114874,
        0.562757134668604683339000099272694,
        0.433395394129247190799265943165784,
        0.294392862701460198131126603103866,
        0.148874338981631210884826001129720,
        0.0,
    ];
    const WGK: [f64; 11] = [
        0.011694638867371874278064396062192,
        0.032558162307964727478818972459390,
        0.054755896574351996031381300244580,
        0.075039674810919952767043140916190,
        0.093125454583697605535065465083366,
        0.109387158802297641899210590325805,
        0.123491976262065851077208092339718,
        0.134709217311473325928054001771707,
        0.142775938577060080797094273138717,
        0.147739104901338491374841515972068,
        0.149445554002916905664936468389821,
    ];
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let mut resk = WGK[10] * f(centr);
    for j in [1, 3, 5, 7, 9, 0, 2, 4, 6, 8] {
        let absc = hlgth * XGK[j];
        resk += WGK[j] * (f(centr - absc) + f(centr + absc));
    }
    resk * hlgth
}

/// `torch.linalg.solve(a, b)` for a small float32 system: Gaussian elimination with partial
/// pivoting (LAPACK's `getrf` + `getrs` order), in float32.
#[allow(clippy::needless_range_loop)] // row/column indices, as in LAPACK
pub(crate) fn solve_f32(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Result<Vec<f32>> {
    let n = b.len();
    for k in 0..n {
        // isamax: the first largest magnitude.
        let mut p = k;
        for i in k + 1..n {
            if a[i][k].abs() > a[p][k].abs() {
                p = i;
            }
        }
        if a[p][k] == 0.0 || !a[p][k].is_finite() {
            return Err(Error::invalid("singular or non-finite system in the solver coefficients"));
        }
        a.swap(k, p);
        b.swap(k, p);
        let inv = 1.0 / a[k][k];
        for i in k + 1..n {
            a[i][k] *= inv;
        }
        for j in k + 1..n {
            for i in k + 1..n {
                a[i][j] -= a[i][k] * a[k][j];
            }
        }
    }
    // getrs: L y = P b (unit lower), then U x = y, column by column as strsm does.
    for k in 0..n {
        for i in k + 1..n {
            b[i] -= b[k] * a[i][k];
        }
    }
    for k in (0..n).rev() {
        b[k] /= a[k][k];
        for i in 0..k {
            b[i] -= b[k] * a[i][k];
        }
    }
    Ok(b)
}
