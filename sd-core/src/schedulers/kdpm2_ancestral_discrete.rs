//! `KDPM2AncestralDiscreteScheduler` of diffusers 0.42 ("DPM2 a"): DPM-Solver-2 steps to the
//! ancestral `sigma_down`, with fresh noise of scale `sigma_up` (drawn from the run's generators)
//! added on each step's second evaluation. Timesteps interleave `t` and the interpolated midpoints
//! (`[t0, ti0, t1, ti1, ...]`), as in diffusers.

use candle_core::Tensor;

use super::common::mul;
use super::config::SchedulerConfig;
use super::kdpm2_discrete::{interleave_repeat, log_midpoint, Dpm2State, KDPM2DiscreteConfig};
use super::state::{scheduler_api, scheduler_state, Parametrization, SchedulerClass};
use crate::rng::Generators;
use crate::{Error, Result};

const CLASS: &str = "KDPM2AncestralDiscreteScheduler";

/// The `__init__` arguments of diffusers' `KDPM2AncestralDiscreteScheduler`: the same as
/// `KDPM2DiscreteScheduler`'s.
pub type KDPM2AncestralDiscreteConfig = KDPM2DiscreteConfig;

/// diffusers' `KDPM2AncestralDiscreteScheduler`: `2n - 1` timesteps for `n` steps.
#[derive(Debug, Clone)]
pub struct KDPM2AncestralDiscreteScheduler {
    dpm2: Dpm2State,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
}

scheduler_api!(KDPM2AncestralDiscreteScheduler, KDPM2AncestralDiscreteConfig, typed_config);

impl KDPM2AncestralDiscreteScheduler {
    /// `KDPM2AncestralDiscreteScheduler.from_config(config)`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let dpm2 = Dpm2State::new(Self::load_state(config)?);
        Self { dpm2, sigmas_up: vec![], sigmas_down: vec![] }.with_training_timesteps()
    }
}

impl SchedulerClass for KDPM2AncestralDiscreteScheduler {
    scheduler_state!(CLASS, Parametrization::KDiffusion, dpm2.state: KDPM2DiscreteConfig);

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let base = self.dpm2.base(num_inference_steps);
        let s = &base.sigmas;
        let n1 = s.len();
        let next: Vec<f32> = (0..n1).map(|k| if k + 1 < n1 { s[k + 1] } else { 0.0 }).collect();
        let up: Vec<f32> = (0..n1)
            .map(|k| {
                let (s2, n2) = (s[k] * s[k], next[k] * next[k]);
                (n2 * (s2 - n2) / s2).sqrt()
            })
            .collect();
        let mut down: Vec<f32> =
            (0..n1).map(|k| (next[k] * next[k] - up[k] * up[k]).sqrt()).collect();
        down[n1 - 1] = 0.0;
        let mut interpol: Vec<f32> = (0..n1).map(|k| log_midpoint(s[k], down[k])).collect();
        for v in interpol.iter_mut().skip(n1.saturating_sub(2)) {
            *v = 0.0;
        }
        let ti = |k: usize| base.interpol_timestep(interpol[k - 1]);
        self.dpm2.set_schedule(&base, &interpol, ti, num_inference_steps);
        self.sigmas_up = interleave_repeat(&up);
        self.sigmas_down = interleave_repeat(&down);
        Ok(())
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        self.dpm2.scale_model_input(sample, timestep, 1)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generators: &mut Generators,
    ) -> Result<Tensor> {
        let d = &mut self.dpm2;
        let i = d.state.step_index(timestep)?;
        let first_order = d.first_sample.is_none();
        let (sigma, sigma_interpol, sigma_up, sigma_down) = if first_order {
            let down = if i == 0 { self.sigmas_down.len() - 1 } else { i - 1 };
            let sigma = d.state.sigma(i)?;
            (sigma, d.sigmas_interpol[i], self.sigmas_up[i], self.sigmas_down[down])
        } else {
            let j = i
                .checked_sub(1)
                .ok_or_else(|| Error::invalid(format!("{CLASS}: second-order step at index 0")))?;
            (d.state.sigmas[j], d.sigmas_interpol[j], self.sigmas_up[j], self.sigmas_down[j])
        };
        let (mut prev, pred_original) =
            d.update(model_output, sample, sigma, sigma_interpol, sigma_down)?;
        if !first_order {
            let noise = generators.randn(model_output.dims(), model_output.device())?;
            prev = (prev + mul(&noise, sigma_up)?)?;
        }
        d.state.finish_step(i, Some(pred_original));
        Ok(prev)
    }

    fn order(&self) -> usize {
        2
    }
}
