//! GELU (erf form, as torch's default `F.gelu`) and the GEGLU of the UNet's feed-forwards.
//!
//! candle computes `erf` with libm's scalar code, one call per element; here it is a
//! branch-free formula over the vectorised `exp`, compiled for AVX-512/AVX2 and picked at run
//! time, and GEGLU's split, GELU and product are one pass.

use candle_core::{DType, Device, Result, Tensor, D};
use rayon::prelude::*;

use crate::cpu::simd::{exp_approx, simd_dispatch, MulAdd};
use crate::cpu::with_slice;

/// `gelu(x) = x/2 (1 + erf(x / sqrt 2))`.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if !(xs.device().is_cpu() && xs.dtype() == DType::F32) {
        return xs.gelu_erf();
    }
    let xs = xs.contiguous()?;
    let mut out = vec![0f32; xs.elem_count()];
    with_slice::<f32, _>(&xs, |x| {
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(d, s)| gelu_into(s, None, d))
    })?;
    Tensor::from_vec(out, xs.dims(), &Device::Cpu)
}

/// GEGLU: the last dimension holds `[value, gate]`; returns `value * gelu(gate)`.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let inner = projected.dim(D::Minus1)? / 2;
    if !(projected.device().is_cpu() && projected.dtype() == DType::F32) {
        let value = projected.narrow(D::Minus1, 0, inner)?;
        let gate = projected.narrow(D::Minus1, inner, inner)?.gelu_erf()?;
        return value * gate;
    }
    let projected = projected.contiguous()?;
    let mut dims = projected.dims().to_vec();
    *dims.last_mut().expect("dim checked above") = inner;
    let mut out = vec![0f32; projected.elem_count() / 2];
    with_slice::<f32, _>(&projected, |x| {
        out.par_chunks_mut(inner).zip(x.par_chunks(2 * inner)).for_each(|(d, row)| {
            let (value, gate) = row.split_at(inner);
            gelu_into(gate, Some(value), d)
        })
    })?;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

const CHUNK: usize = 1 << 14;

/// `dst = gelu(gate)`, times `value` when given.
fn gelu_into(gate: &[f32], value: Option<&[f32]>, dst: &mut [f32]) {
    simd_dispatch!(gelu_with(gate: &[f32], value: Option<&[f32]>, dst: &mut [f32]))
}

#[inline(always)]
fn gelu_with<A: MulAdd>(gate: &[f32], value: Option<&[f32]>, dst: &mut [f32]) {
    match value {
        Some(value) => {
            for ((d, &g), &v) in dst.iter_mut().zip(gate).zip(value) {
                *d = v * gelu::<A>(g);
            }
        }
        None => {
            for (d, &g) in dst.iter_mut().zip(gate) {
                *d = gelu::<A>(g);
            }
        }
    }
}

#[inline(always)]
fn gelu<A: MulAdd>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<A>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Abramowitz & Stegun 7.1.26: `|error| < 1.5e-7`, branch-free.
#[inline(always)]
fn erf<A: MulAdd>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / A::mul_add(0.327_591_1, a, 1.0);
    let mut p = 1.061_405_4f32;
    p = A::mul_add(p, t, -1.453_152_1);
    p = A::mul_add(p, t, 1.421_413_8);
    p = A::mul_add(p, t, -0.284_496_74);
    p = A::mul_add(p, t, 0.254_829_6);
    let y = 1.0 - p * t * exp_approx::<A>(-a * a);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_and_geglu_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..2 * 3 * 64).map(|i| (i as f32 - 190.0) * 0.047).collect();
        let x = Tensor::from_vec(data, (2, 3, 64), &dev)?;
        let max_diff = |a: Tensor, b: Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max_diff(gelu_erf(&x)?, x.gelu_erf()?)? < 1e-6);
        let want = (x.narrow(2, 0, 32)? * x.narrow(2, 32, 32)?.gelu_erf()?)?;
        let got = geglu(&x)?;
        assert_eq!(got.dims(), &[2, 3, 32]);
        assert!(max_diff(got, want)? < 1e-5);
        Ok(())
    }
}
