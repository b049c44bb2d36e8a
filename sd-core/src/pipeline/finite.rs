//! The finite checks of a run: NaN or inf in the text embeddings, in the latents after a step or
//! in the decoded image stop the run with [`Error::NonFinite`], saying where, instead of ending
//! as a black image.

use candle_core::{DType, Tensor};

use super::StableDiffusionPipeline;
use crate::{Error, Result};

/// Above this guidance scale a non-finite step is blamed on it (diffusers' values are 1 to 20).
const HUGE_GUIDANCE_SCALE: f64 = 1e3;

/// Whether every value of `t` is finite, in one reduction: NaN and inf propagate through a sum.
/// Only a sum that is not finite (finite values of absurd magnitude can overflow it) is followed
/// by a look at each value.
pub(super) fn is_all_finite(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(DType::F32)?;
    if t.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Ok(true);
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()))
}

/// `Err(InvalidArgument)` naming `argument` when a caller-given tensor holds NaN or inf.
pub(super) fn check_given_finite(argument: &str, t: &Tensor) -> Result<()> {
    if is_all_finite(t)? {
        Ok(())
    } else {
        Err(Error::invalid(format!("{argument} contain NaN or infinite values")))
    }
}

impl StableDiffusionPipeline {
    /// The text encoder's output `embeds` for `what` ("prompts", "negative prompts"), checked.
    pub(super) fn checked_text_embeddings(&self, embeds: Tensor, what: &str) -> Result<Tensor> {
        self.ensure_finite(
            &embeds,
            || format!("in the text encoder's output for the {what}"),
            None,
        )?;
        Ok(embeds)
    }

    /// Checks the latents after the 1-based `step` of `steps`, run with `guidance_scale`.
    pub(super) fn check_step_finite(
        &self,
        latents: &Tensor,
        step: usize,
        steps: usize,
        guidance_scale: f64,
    ) -> Result<()> {
        let hint = (guidance_scale.abs() > HUGE_GUIDANCE_SCALE).then(|| {
            format!(
                "guidance_scale {guidance_scale:e} is far too large (typical values are 1 to 20)"
            )
        });
        self.ensure_finite(latents, || format!("after step {step} of {steps} of the UNet"), hint)
    }

    /// Checks the VAE's decoded output.
    pub(super) fn check_decoded_finite(&self, decoded: &Tensor) -> Result<()> {
        let hint = self
            .is_half_precision()
            .then(|| "the VAE overflows in half precision: run it in f32 (--dtype f32)".into());
        self.ensure_finite(decoded, || "in the VAE decode".into(), hint)
    }

    /// `Err(NonFinite)` at `stage` unless `t` is all finite; without a `hint` of the caller's,
    /// half-precision runs are told to try f32.
    fn ensure_finite(
        &self,
        t: &Tensor,
        stage: impl FnOnce() -> String,
        hint: Option<String>,
    ) -> Result<()> {
        if is_all_finite(t)? {
            return Ok(());
        }
        let hint =
            hint.or_else(|| self.is_half_precision().then(|| "run in f32 (--dtype f32)".into()));
        Err(Error::NonFinite { stage: stage(), hint })
    }

    fn is_half_precision(&self) -> bool {
        matches!(self.dtype(), DType::F16 | DType::BF16)
    }
}
