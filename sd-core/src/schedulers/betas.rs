//! The training noise schedule shared by the diffusers schedulers: betas, alphas, the cumulative
//! products and zero-terminal-SNR rescaling, all in float32 as diffusers computes them with torch.

use super::config::BetaSchedule;
use super::numeric::{torch_cumprod_f32, torch_linspace_f32};
use crate::{Error, Result};

/// The training betas (float32) of a scheduler config, each in (0, 1): others make the alphas'
/// square roots NaN (diffusers does not check, and its run ends as a black image).
///
/// `trained_betas` wins over `schedule` when given (diffusers' order). `Sigmoid` is computed with
/// the libm `exp`, so it may differ from torch's vectorised sigmoid in the last bit.
pub fn betas(
    schedule: BetaSchedule,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
    trained_betas: Option<&[f64]>,
) -> Result<Vec<f32>> {
    let betas =
        unchecked_betas(schedule, beta_start, beta_end, num_train_timesteps, trained_betas)?;
    match betas.iter().position(|&b| !(b > 0.0 && b < 1.0)) {
        None => Ok(betas),
        Some(i) if trained_betas.is_some() => Err(Error::invalid(format!(
            "trained_betas[{i}] is {}; betas must be in (0, 1)",
            betas[i]
        ))),
        Some(i) => Err(Error::invalid(format!(
            "beta_start {beta_start} and beta_end {beta_end} give beta {} at timestep {i}; betas \
             must be in (0, 1)",
            betas[i]
        ))),
    }
}

/// The most training timesteps a scheduler config may declare.
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

fn unchecked_betas(
    schedule: BetaSchedule,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
    trained_betas: Option<&[f64]>,
) -> Result<Vec<f32>> {
    if let Some(tb) = trained_betas {
        if tb.len() != num_train_timesteps {
            return Err(Error::invalid(format!(
                "trained_betas has {} values but num_train_timesteps is {num_train_timesteps}",
                tb.len()
            )));
        }
        return Ok(tb.iter().map(|&b| b as f32).collect());
    }
    if num_train_timesteps == 0 {
        return Err(Error::invalid("num_train_timesteps must be at least 1"));
    }
    // The schedule holds a few values per timestep: 10^12 aborted the process out of memory.
    if num_train_timesteps > MAX_TRAIN_TIMESTEPS {
        return Err(Error::invalid(format!(
            "num_train_timesteps {num_train_timesteps} is over the supported maximum of \
             {MAX_TRAIN_TIMESTEPS} (models are trained with 1000)"
        )));
    }
    Ok(match schedule {
        BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, num_train_timesteps),
        BetaSchedule::ScaledLinear => {
            torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar_cosine(num_train_timesteps, 0.999),
        BetaSchedule::Sigmoid => {
            let scale = (beta_end - beta_start) as f32;
            let start = beta_start as f32;
            torch_linspace_f32(-6.0, 6.0, num_train_timesteps)
                .into_iter()
                .map(|x| (1.0 / (1.0 + (-x).exp())) * scale + start)
                .collect()
        }
    })
}

/// diffusers' `betas_for_alpha_bar(n, max_beta, "cosine")`: computed in f64 (Python floats), then
/// rounded to float32 by `torch.tensor(..., dtype=torch.float32)`.
pub fn betas_for_alpha_bar_cosine(num_diffusion_timesteps: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    let n = num_diffusion_timesteps as f64;
    (0..num_diffusion_timesteps)
        .map(|i| {
            let t1 = i as f64 / n;
            let t2 = (i + 1) as f64 / n;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr(betas)` in float32 torch arithmetic (Algorithm 1 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    let cumprod = torch_cumprod_f32(&alphas);
    let mut sqrt: Vec<f32> = cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    for v in &mut sqrt {
        *v -= last;
    }
    for v in &mut sqrt {
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// `alphas_cumprod = torch.cumprod(1.0 - betas, 0)` in float32.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    torch_cumprod_f32(&alphas)
}

/// The float32 training schedule of a scheduler: betas and `alphas_cumprod`.
#[derive(Debug, Clone)]
pub struct TrainingSchedule {
    /// One beta per training timestep.
    pub betas: Vec<f32>,
    /// `cumprod(1 - betas)`, accumulated in f64 and rounded to f32 like torch.
    pub alphas_cumprod: Vec<f32>,
}

impl TrainingSchedule {
    /// Betas from the config keys, optionally rescaled to zero terminal SNR, and their
    /// cumulative alpha products.
    pub fn new(
        schedule: BetaSchedule,
        beta_start: f64,
        beta_end: f64,
        num_train_timesteps: usize,
        trained_betas: Option<&[f64]>,
        rescale_betas_zero_snr: bool,
    ) -> Result<Self> {
        let mut betas = betas(schedule, beta_start, beta_end, num_train_timesteps, trained_betas)?;
        if rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = alphas_cumprod(&betas);
        Ok(Self { betas, alphas_cumprod })
    }

    /// `alphas_cumprod[-1] = 2**-24` after zero-terminal-SNR rescaling, as the sigma-based
    /// schedulers do: close to zero but not zero, so the largest sigma stays finite.
    pub(crate) fn keep_terminal_sigma_finite(&mut self) {
        if let Some(last) = self.alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }

    /// `final_alpha_cumprod` of DDIM, PNDM and LCM: 1 with `set_alpha_to_one`, else the first
    /// `alphas_cumprod`.
    pub(crate) fn final_alpha_cumprod(&self, set_alpha_to_one: bool) -> f32 {
        if set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32 (not flipped).
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }
}
