//! Sinusoidal timestep features and the MLP that embeds them (diffusers' `Timesteps` and
//! `TimestepEmbedding`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{linear, Linear};

/// `[batch, dim]` sinusoidal features of the timesteps, computed in f32 as diffusers does.
pub fn timestep_features(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let max_period = 10000f32;
    // f32 throughout, mirroring torch: exp(-ln(max_period) * i / (half - shift)) then t * freq.
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-max_period.ln() * i as f32 / (half as f32 - freq_shift as f32)).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (timesteps.len(), dim), device)
}

#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = candle_nn::ops::silu(&self.linear_1.forward(xs)?)?;
        self.linear_2.forward(&xs)
    }
}

pub(crate) fn to_dtype_of(t: Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t)
    } else {
        t.to_dtype(dtype)
    }
}
