//! The schedule building blocks of diffusers' `set_timesteps`: the timestep spacings, the
//! training sigmas and their interpolation, the Karras / exponential / log-linear sigma
//! schedules and the `sigma -> t` mapping back to timesteps.
//!
//! Every function says which numpy / torch computation it reproduces and in which precision:
//! diffusers builds its schedules with numpy float64 over float32 torch tensors.

use super::betas::TrainingSchedule;
use super::config::{InterpolationType, TimestepSpacing};
use super::numeric::{np_arange, np_interp, np_linspace, np_log_f32, np_round, torch_linspace_f32};
use super::state::SigmaRange;

// ---- timestep spacings ----

/// The float32 timesteps of the k-diffusion style schedulers (Euler, Euler ancestral, LMS, Heun,
/// KDPM2): `n` values, descending; linspace spacing keeps numpy's fractional values, the others
/// are the integers DDIM uses.
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
        TimestepSpacing::Leading | TimestepSpacing::Trailing => {
            let ts = discrete_timesteps(spacing, n_train, n, steps_offset);
            ts.into_iter().map(|t| t as f32).collect()
        }
    }
}

/// The integer timesteps of DDIM / DDPM / PNDM (`n` values, descending).
pub(crate) fn discrete_timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => rounded_linspace((n_train - 1) as f64, n),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            // Saturating: a corrupt config's huge offset must not overflow (the timesteps are
            // out of range either way, and refused where they are used).
            (0..n).rev().map(|i| ((i * ratio) as i64).saturating_add(steps_offset)).collect()
        }
        TimestepSpacing::Trailing => trailing(n_train, n_train, n),
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
            let mut t = rounded_linspace(last_timestep as f64 - 1.0, n + 1);
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| ((i * ratio) as i64).saturating_add(steps_offset)).collect()
        }
        TimestepSpacing::Trailing => trailing(last_timestep, n_train, n),
    }
}

/// `np.linspace(0, stop, num).round()[::-1].astype(np.int64)`.
fn rounded_linspace(stop: f64, num: usize) -> Vec<i64> {
    np_linspace(0.0, stop, num).into_iter().rev().map(|t| np_round(t) as i64).collect()
}

/// Trailing spacing: `np.round(np.arange(start, 0, -n_train / n)).astype(np.int64) - 1`.
fn trailing(start: usize, n_train: usize, n: usize) -> Vec<i64> {
    let ratio = n_train as f64 / n as f64;
    np_arange(start as f64, 0.0, -ratio).into_iter().map(|t| np_round(t) as i64 - 1).collect()
}

/// The timesteps of a training schedule of `n_train` steps, descending, as float32 values
/// (`np.linspace(0, n_train - 1, n_train)[::-1]` of the sigma-based classes' `__init__`).
pub(crate) fn training_timesteps(n_train: usize) -> Vec<f64> {
    np_linspace(0.0, n_train.saturating_sub(1) as f64, n_train)
        .into_iter()
        .rev()
        .map(|t| t as f32 as f64)
        .collect()
}

// ---- sigmas ----

/// The alternative sigma schedules of diffusers' `use_karras_sigmas` / `use_exponential_sigmas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigmaSpacing {
    /// Karras et al. (rho = 7).
    Karras,
    /// Log-linear.
    Exponential,
}

impl SigmaSpacing {
    /// The spacing the config flags pick; `None`: the interpolated training sigmas.
    pub fn from_flags(karras: bool, exponential: bool) -> Option<Self> {
        if karras {
            Some(Self::Karras)
        } else if exponential {
            Some(Self::Exponential)
        } else {
            None
        }
    }

    /// `n` sigmas from `sigma_max` down to `sigma_min`, in float64: `_convert_to_karras` or
    /// `_convert_to_exponential` (copied between the sigma-based schedulers in diffusers).
    pub fn sigmas(self, sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
        match self {
            Self::Karras => {
                let rho = 7.0f64;
                let min_inv_rho = sigma_min.powf(1.0 / rho);
                let max_inv_rho = sigma_max.powf(1.0 / rho);
                np_linspace(0.0, 1.0, n)
                    .into_iter()
                    .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
                    .collect()
            }
            Self::Exponential => {
                np_linspace(sigma_max.ln(), sigma_min.ln(), n).into_iter().map(f64::exp).collect()
            }
        }
    }
}

/// The training sigmas `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` (float32, ascending in
/// `t`) and their float32 `np.log`, which the schedules are built from.
pub(crate) struct TrainSigmas {
    pub sigmas: Vec<f32>,
    pub log_sigmas: Vec<f32>,
}

impl TrainSigmas {
    pub fn new(schedule: &TrainingSchedule) -> Self {
        let sigmas = schedule.sigmas();
        let log_sigmas = sigmas.iter().map(|&s| np_log_f32(s)).collect();
        Self { sigmas, log_sigmas }
    }

    /// The smallest training sigma, as float64.
    pub fn min(&self) -> f64 {
        self.sigmas[0] as f64
    }

    /// The largest training sigma, as float64.
    pub fn max(&self) -> f64 {
        self.sigmas[self.sigmas.len() - 1] as f64
    }

    /// `np.interp(timesteps, np.arange(len(sigmas)), sigmas)` in float64.
    pub fn interpolate(&self, timesteps: &[f64]) -> Vec<f64> {
        let xp: Vec<f64> = (0..self.sigmas.len()).map(|i| i as f64).collect();
        let fp: Vec<f64> = self.sigmas.iter().map(|&s| s as f64).collect();
        np_interp(timesteps, &xp, &fp)
    }

    /// Euler's `interpolation_type="log_linear"`: `torch.linspace(log(sigma_max),
    /// log(sigma_min), n).exp()` in float32, with numpy's float32 logs.
    pub fn log_linear(&self, n: usize) -> Vec<f64> {
        let (start, end) = (self.log_sigmas[self.log_sigmas.len() - 1], self.log_sigmas[0]);
        torch_linspace_f32(start as f64, end as f64, n)
            .into_iter()
            .map(|l| l.exp() as f64)
            .collect()
    }

    /// `_sigma_to_t(sigma, log_sigmas)` (copied from `EulerDiscreteScheduler` into the other
    /// sigma-based classes) with a float64 `sigma` and the float32 log training sigmas, in numpy's
    /// mixed precision: the (fractional) training timestep of `sigma`, interpolating in log
    /// space.
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigmas = &self.log_sigmas;
        if log_sigmas.len() < 2 {
            return 0.0; // one training timestep: every sigma is at it
        }
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
    pub fn sigma_to_t_f32(&self, sigma: f32) -> f32 {
        let log_sigmas = &self.log_sigmas;
        if log_sigmas.len() < 2 {
            return 0.0;
        }
        let log_sigma =
            if sigma.is_nan() { f32::NAN } else { np_log_f32(sigma.max(1e-10f64 as f32)) };
        let last_ge = log_sigmas.iter().rposition(|&l| log_sigma - l >= 0.0).unwrap_or(0);
        let low_idx = last_ge.min(log_sigmas.len() - 2);
        let high_idx = low_idx + 1;
        let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
        let w = (low - log_sigma) / (low - high);
        let w = if w.is_nan() { w } else { w.clamp(0.0, 1.0) };
        (1.0 - w) * low_idx as f32 + w * high_idx as f32
    }

    /// The integer timesteps of converted sigmas: `_sigma_to_t`, rounded (`np.round`) when
    /// `round`, then truncated by `astype(np.int64)`.
    pub fn int_timesteps(&self, sigmas: &[f64], round: bool) -> Vec<i64> {
        sigmas
            .iter()
            .map(|&s| {
                let t = self.sigma_to_t(s);
                (if round { np_round(t) } else { t }) as i64
            })
            .collect()
    }

    /// The sigmas (float64, without the final one) and timesteps (float64, not yet rounded) of
    /// the k-diffusion schedulers for the `n` `timesteps`: the sigmas `interpolation` gives, as
    /// they are or respaced to `n` sigmas between `range` (default: the ends of the interpolated
    /// sigmas) with their timesteps from `_sigma_to_t`.
    pub fn k_schedule(
        &self,
        timesteps: Vec<f64>,
        interpolation: InterpolationType,
        spacing: Option<SigmaSpacing>,
        range: SigmaRange,
    ) -> (Vec<f64>, Vec<f64>) {
        let n = timesteps.len();
        let sigmas = match interpolation {
            InterpolationType::Linear => self.interpolate(&timesteps),
            InterpolationType::LogLinear => self.log_linear(n + 1),
        };
        let Some(spacing) = spacing else {
            return (sigmas, timesteps);
        };
        let sigma_min = range.min.unwrap_or(sigmas[sigmas.len() - 1]);
        let sigma_max = range.max.unwrap_or(sigmas[0]);
        let converted = spacing.sigmas(sigma_min, sigma_max, n);
        let timesteps = converted.iter().map(|&s| self.sigma_to_t(s)).collect();
        (converted, timesteps)
    }

    /// The schedule of the multistep solvers (diffusers copies this branch between DPM-Solver,
    /// DEIS and UniPC): the integer timesteps `timesteps` with their interpolated sigmas, or,
    /// with a `spacing`, `n` sigmas respaced between `range` (default: the training sigmas'
    /// ends) with their `_sigma_to_t` timesteps, rounded for Karras sigmas when `round_karras`
    /// and truncated for exponential ones.
    pub fn multistep_schedule(
        &self,
        timesteps: &[i64],
        spacing: Option<SigmaSpacing>,
        n: usize,
        range: SigmaRange,
        round_karras: bool,
    ) -> MultistepSchedule {
        let Some(spacing) = spacing else {
            let timesteps: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
            let sigmas = self.interpolate(&timesteps);
            return MultistepSchedule {
                timesteps,
                sigmas: sigmas.iter().map(|&s| s as f32).collect(),
                sigma_min: self.sigmas[0],
            };
        };
        let sigma_min = range.min.unwrap_or(self.min());
        let sigma_max = range.max.unwrap_or(self.max());
        let sigmas = spacing.sigmas(sigma_min, sigma_max, n);
        let round = round_karras && spacing == SigmaSpacing::Karras;
        MultistepSchedule::respaced(&sigmas, &self.int_timesteps(&sigmas, round))
    }
}

/// A multistep solver's schedule without its final sigma.
pub(crate) struct MultistepSchedule {
    /// Integer timesteps.
    pub timesteps: Vec<f64>,
    /// Float32 sigmas.
    pub sigmas: Vec<f32>,
    /// The smallest sigma of the schedule: the last respaced sigma, else the smallest training
    /// sigma (DEIS and UniPC end with it).
    pub sigma_min: f32,
}

impl MultistepSchedule {
    /// Respaced (float64) sigmas and their integer timesteps.
    pub fn respaced(sigmas: &[f64], timesteps: &[i64]) -> Self {
        Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
            sigma_min: sigmas[sigmas.len() - 1] as f32,
        }
    }
}
