//! What the multistep solvers (DPM-Solver, DEIS, UniPC) share: the model-output history and the
//! float32 `alpha_t` / `sigma_t` / `lambda_t` of a sigma.

use candle_core::Tensor;

use super::common::{div, mul};
use super::config::PredictionType;
use crate::{Error, Result};

/// The `__init__` checks DPM-Solver, DEIS and UniPC share (diffusers copies them between the
/// three): [`check_sigma_config!`](super::common::check_sigma_config), and neither
/// thresholding, flow sigmas nor dynamic shifting. `$c` is the typed config.
macro_rules! check_multistep_config {
    ($r:expr, $c:expr) => {{
        use $crate::schedulers::common::{check_sigma_config, reject_flag};
        let (r, c) = (&*$r, $c);
        check_sigma_config!(r, c);
        reject_flag(r, "thresholding", c.thresholding, "dynamic thresholding")?;
        reject_flag(r, "use_flow_sigmas", c.use_flow_sigmas, "flow sigmas")?;
        reject_flag(r, "use_dynamic_shifting", c.use_dynamic_shifting, "dynamic shifting")?;
    }};
}
pub(crate) use check_multistep_config;

/// `_sigma_to_alpha_sigma_t` (copied from `DPMSolverMultistepScheduler` into DEIS and UniPC) in
/// float32: `alpha_t = 1 / (sigma ** 2 + 1) ** 0.5` and `sigma_t = sigma * alpha_t`.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda_t = torch.log(alpha_t) - torch.log(sigma_t)` in float32.
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// diffusers' `model_outputs` list of `solver_order` slots (the latest converted model output
/// last) and its `lower_order_nums` warm-up counter.
#[derive(Debug, Clone)]
pub(crate) struct MultistepHistory {
    class: &'static str,
    outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl MultistepHistory {
    /// An empty history of `order` slots.
    pub fn new(class: &'static str, order: usize) -> Self {
        Self { class, outputs: vec![None; order], lower_order_nums: 0 }
    }

    /// `model_outputs[i] = model_outputs[i + 1]` for all slots, then the new output last.
    pub fn push(&mut self, model_output: Tensor) {
        self.outputs.rotate_left(1);
        let last = self.outputs.len() - 1;
        self.outputs[last] = Some(model_output);
    }

    /// `model_outputs[-1 - k]`: the latest output (`k = 0`) or the one `k` steps before.
    pub fn get(&self, k: usize) -> Result<&Tensor> {
        let n = self.outputs.len();
        n.checked_sub(1 + k)
            .and_then(|i| self.outputs[i].as_ref())
            .ok_or_else(|| Error::invalid(format!("{}: missing previous model output", self.class)))
    }

    /// How many steps have run, up to the solver order (lower orders are used until enough
    /// outputs are there).
    pub fn lower_order_nums(&self) -> usize {
        self.lower_order_nums
    }

    /// Counts a finished step (up to `order`).
    pub fn count_step(&mut self, order: usize) {
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
    }
}

/// The data prediction `x_0` of `convert_model_output` (diffusers copies it from
/// `DPMSolverMultistepScheduler` into DEIS and UniPC), from the model output at a sigma with
/// `alpha_sigma` `(alpha_t, sigma_t)`, in f32.
pub(crate) fn predicted_x0(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    (alpha_t, sigma_t): (f32, f32),
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?,
    })
}

/// The noise prediction of `convert_model_output` for the noise-predicting solvers (DPM-Solver
/// without `++`, UniPC with `predict_x0=False`), in f32.
pub(crate) fn predicted_noise(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    (alpha_t, sigma_t): (f32, f32),
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => model_output.clone(),
        PredictionType::Sample => div(&(sample - mul(model_output, alpha_t)?)?, sigma_t)?,
        PredictionType::VPrediction => (mul(model_output, alpha_t)? + mul(sample, sigma_t)?)?,
    })
}
