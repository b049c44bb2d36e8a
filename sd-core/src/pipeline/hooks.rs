//! Per-run hooks: one step callback ([`RunHooks::on_step_end`], diffusers'
//! `callback_on_step_end`) and a [`CancelToken`] for other threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;

/// Reported after every denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    /// Time since the denoising loop started.
    pub elapsed: Duration,
}

/// Cancels a run from another thread; checked before every step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a run does after [`RunHooks::on_step_end`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepControl {
    /// Go on with the next step.
    Continue,
    /// Skip the remaining steps and decode the latents as they are now: diffusers' `interrupt`.
    Finish,
    /// Stop the run with [`Error::Cancelled`](crate::Error::Cancelled).
    Cancel,
}

/// The step callback of [`RunHooks::on_step_end`].
pub type OnStepEnd<'a> = dyn FnMut(&StepProgress, &mut Tensor) -> StepControl + 'a;

/// Optional per-run hooks.
#[derive(Default)]
pub struct RunHooks<'a> {
    /// diffusers' `callback_on_step_end`: called after each step with its progress and the
    /// latents `[batch, C, h/8, w/8]` (f32) as the scheduler left them. It may replace them with
    /// a tensor of the same shape, which the next step (or the decoder) then takes; what it
    /// returns decides whether the run goes on (progress bars return
    /// [`StepControl::Continue`]).
    pub on_step_end: Option<&'a mut OnStepEnd<'a>>,
    /// Checked before every step: once cancelled, the run stops with
    /// [`Error::Cancelled`](crate::Error::Cancelled).
    pub cancel: Option<CancelToken>,
}

impl RunHooks<'_> {
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(CancelToken::is_cancelled)
    }
}
