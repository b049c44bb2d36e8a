//! `GroupNorm`, optionally fused with the SiLU that follows it in every resnet block.
//!
//! On the CPU one pass per (image, group) computes the statistics (f64 sums) and a second
//! writes `x * scale[c] + shift[c]`, SiLU applied in the same loop with a vectorised `exp`.
//! candle-nn's version goes through four full-size temporaries and a separate SiLU.
//!
//! A 3x3 convolution that reads `silu(norm(x))` can skip the second pass: [`GroupNorm::channel_affine`]
//! gives the per-channel `scale` and `shift`, and the convolution applies them (and the SiLU,
//! with the same [`affine_with`]) as it reads `x`, so no normalised copy of `x` is made.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::param_dtype;
use crate::cpu::simd::{exp_approx, simd_dispatch, MulAdd};
use crate::cpu::with_slice;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

pub fn group_norm(
    num_groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    if num_groups == 0 || !channels.is_multiple_of(num_groups) {
        candle_core::bail!("group norm: {channels} channels do not split into {num_groups} groups");
    }
    let vb = vb.to_dtype(param_dtype(&vb));
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    Ok(GroupNorm { weight, bias, num_groups, eps })
}

impl GroupNorm {
    /// `silu(group_norm(xs))`.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        if self.cpu_kernel_applies(xs) {
            self.forward_cpu(xs, true)
        } else {
            candle_nn::ops::silu(&self.candle_forward(xs)?)
        }
    }

    fn cpu_kernel_applies(&self, xs: &Tensor) -> bool {
        xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && xs.rank() >= 3
    }

    fn candle_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let channels = self.weight.dim(0)?;
        candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            channels,
            self.num_groups,
            self.eps,
        )?
        .forward(xs)
    }

    fn forward_cpu(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let g = self.groups(xs)?;
        let mut out = vec![0f32; g.xs.elem_count()];
        with_slice::<f32, _>(&g.xs, |x| {
            out.par_chunks_mut(g.group_len).zip(x.par_chunks(g.group_len)).enumerate().for_each(
                |(i, (dst, src))| {
                    let group = self.group_affine(&g, i, src);
                    for ((d, s), (scale, shift)) in
                        dst.chunks_mut(g.spatial).zip(src.chunks(g.spatial)).zip(group)
                    {
                        affine(s, d, scale, shift, silu);
                    }
                },
            )
        })?;
        Tensor::from_vec(out, g.xs.dims(), &Device::Cpu)
    }

    /// `xs` made contiguous, with its sizes checked against the norm's, and the norm's
    /// parameters.
    fn groups(&self, xs: &Tensor) -> Result<Groups> {
        let xs = xs.contiguous()?;
        let channels = xs.dim(1)?;
        if channels != self.weight.dim(0)? {
            candle_core::bail!(
                "group norm: input has {channels} channels, the norm {}",
                self.weight.dim(0)?
            );
        }
        let spatial: usize = xs.dims()[2..].iter().product();
        let group_len = channels / self.num_groups * spatial;
        let (gamma, beta) = (self.weight.to_vec1::<f32>()?, self.bias.to_vec1::<f32>()?);
        Ok(Groups { xs, channels, spatial, group_len, gamma, beta })
    }

    /// `(scale, shift)` of each channel of group `i` of `g` (counted over all images), whose
    /// values are `src`: the normalised value of `x` is `x * scale + shift`.
    fn group_affine<'a>(
        &self,
        g: &'a Groups,
        i: usize,
        src: &[f32],
    ) -> impl Iterator<Item = (f32, f32)> + 'a {
        let Groups { channels, gamma, beta, .. } = g;
        let (sum, sum_sq) = moments(src);
        let n = src.len() as f64;
        let mean = sum / n;
        let var = (sum_sq / n - mean * mean).max(0.0);
        let rstd = 1.0 / (var + self.eps).sqrt();
        let per_group = channels / self.num_groups;
        let c0 = (i % self.num_groups) * per_group;
        (c0..c0 + per_group).map(move |c| {
            let scale = (rstd * gamma[c] as f64) as f32;
            let shift = (beta[c] as f64 - mean * rstd * gamma[c] as f64) as f32;
            (scale, shift)
        })
    }

    /// The norm over `xs` (`[batch, channels, ...]`) as one `x * scale + shift` per image and
    /// channel (`[batch * channels]` each), from one read of `xs`: what a convolution needs to
    /// read `silu(self.forward(xs))` straight from `xs` (the same values, bit for bit, as
    /// [`Self::forward_silu`] writes). `None` where the CPU kernel does not run.
    pub(crate) fn channel_affine(&self, xs: &Tensor) -> Result<Option<ChannelAffine>> {
        if !self.cpu_kernel_applies(xs) {
            return Ok(None);
        }
        let g = self.groups(xs)?;
        let pairs: Vec<(f32, f32)> = with_slice::<f32, _>(&g.xs, |x| {
            x.par_chunks(g.group_len)
                .enumerate()
                .flat_map_iter(|(i, src)| self.group_affine(&g, i, src))
                .collect()
        })?;
        let (scale, shift) = pairs.into_iter().unzip();
        Ok(Some(ChannelAffine { scale, shift }))
    }
}

/// An input of [`GroupNorm::forward_cpu`] or [`GroupNorm::channel_affine`], ready for the
/// per-group loops: see [`GroupNorm::groups`].
struct Groups {
    xs: Tensor,
    channels: usize,
    /// Values per channel and image.
    spatial: usize,
    /// Values per group and image: one task of the per-group loops.
    group_len: usize,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// A group norm as an affine map per image and channel (`[batch * channels]`): see
/// [`GroupNorm::channel_affine`].
#[derive(Debug, Clone)]
pub(crate) struct ChannelAffine {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.cpu_kernel_applies(xs) {
            self.forward_cpu(xs, false)
        } else {
            self.candle_forward(xs)
        }
    }
}

/// `(sum x, sum x^2)`: f32 lanes over blocks of 256 values (so the loop vectorises), blocks
/// summed in f64.
fn moments(src: &[f32]) -> (f64, f64) {
    const LANES: usize = 16;
    let (mut sum, mut sum_sq) = (0f64, 0f64);
    for block in src.chunks(256) {
        let (mut s, mut q) = ([0f32; LANES], [0f32; LANES]);
        let mut lanes = block.chunks_exact(LANES);
        for c in &mut lanes {
            for i in 0..LANES {
                s[i] += c[i];
                q[i] += c[i] * c[i];
            }
        }
        for &v in lanes.remainder() {
            s[0] += v;
            q[0] += v * v;
        }
        sum += s.iter().map(|&v| v as f64).sum::<f64>();
        sum_sq += q.iter().map(|&v| v as f64).sum::<f64>();
    }
    (sum, sum_sq)
}

/// `dst = src * scale + shift`, then SiLU if asked, with the best instruction set available.
fn affine(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, silu: bool) {
    simd_dispatch!(affine_with(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, silu: bool))
}

/// [`affine`] on instruction set `A` (for kernels that are dispatched already).
#[inline(always)]
pub(crate) fn affine_with<A: MulAdd>(
    src: &[f32],
    dst: &mut [f32],
    scale: f32,
    shift: f32,
    silu: bool,
) {
    if silu {
        for (d, &s) in dst.iter_mut().zip(src) {
            let y = A::mul_add(s, scale, shift);
            // silu(y) = y / (1 + e^-y); exp_approx clamps its argument, so no inf/NaN.
            *d = y / (1.0 + exp_approx::<A>(-y));
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = A::mul_add(s, scale, shift);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candle_group_norm_and_silu() -> Result<()> {
        let dev = Device::Cpu;
        let (b, c, h, w, groups) = (2, 12, 5, 7, 4);
        let data: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * 7919 % 1013) as f32 / 101.3 - 5.0) * 3.0 + 2.0)
            .collect();
        let x = Tensor::from_vec(data, (b, c, h, w), &dev)?;
        let gamma =
            Tensor::from_vec((0..c).map(|i| 0.5 + i as f32 * 0.1).collect::<Vec<_>>(), c, &dev)?;
        let beta =
            Tensor::from_vec((0..c).map(|i| i as f32 * 0.05 - 0.3).collect::<Vec<_>>(), c, &dev)?;
        let ours =
            GroupNorm { weight: gamma.clone(), bias: beta.clone(), num_groups: groups, eps: 1e-6 };
        let theirs = candle_nn::GroupNorm::new(gamma, beta, c, groups, 1e-6)?;
        let max_diff = |a: Tensor, b: Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max_diff(ours.forward(&x)?, theirs.forward(&x)?)? < 1e-5);
        assert!(
            max_diff(ours.forward_silu(&x)?, candle_nn::ops::silu(&theirs.forward(&x)?)?)? < 1e-5
        );
        Ok(())
    }
}
