//! f32 to bf16 conversion, rounding to nearest even as `half` and torch do, written with
//! integer ops so it vectorises (`half`'s conversion is a scalar call per element).

use std::mem::MaybeUninit;

use half::bf16;
use rayon::prelude::*;

use super::simd::simd_dispatch;

/// `dst[i] = bf16(src[i])`.
pub fn to_bf16(src: &[f32], dst: &mut [bf16]) {
    // Safety: `MaybeUninit<bf16>` has `bf16`'s layout, and only initialised values are written.
    let dst = unsafe { &mut *(dst as *mut [bf16] as *mut [MaybeUninit<bf16>]) };
    to_bf16_uninit(src, dst)
}

/// One value of [`to_bf16`], for loops that produce bf16 values themselves.
#[inline(always)]
pub fn round_to_bf16(v: f32) -> bf16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    // NaN stays NaN (quiet) instead of rounding into infinity.
    let out = if v.is_nan() { (bits >> 16) | 0x40 } else { rounded };
    bf16::from_bits(out as u16)
}

/// [`to_bf16`] of a whole buffer, split over the threads.
///
/// The buffer is written once, by the threads that convert: a zero fill first would have the
/// calling thread alone fault in its fresh pages (a VAE convolution's input at 512 px is 64-128
/// MB, and first touch of fresh memory is slow on a VM).
pub fn to_bf16_par(src: &[f32]) -> Vec<bf16> {
    let mut dst = Vec::with_capacity(src.len());
    dst.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| to_bf16_uninit(s, d));
    // Safety: the tasks above wrote every element.
    unsafe { dst.set_len(src.len()) };
    dst
}

/// [`to_bf16`] into memory that may not be written yet.
fn to_bf16_uninit(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    simd_dispatch!(to_bf16_with(src: &[f32], dst: &mut [MaybeUninit<bf16>]))
}

/// [`to_bf16_uninit`] compiled for the instruction set `S` (integer ops only, so `S` is not
/// used).
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // `simd_dispatch!` names it
fn to_bf16_with<S>(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(round_to_bf16(v));
    }
}

/// A weight value as a file stores it (f32, f16 or bf16), which the packers round to bf16 (f32
/// and f16 by rounding to nearest even, as `to_dtype(BF16)` would; bf16 as it is).
pub trait WeightValue: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    fn to_bf16(self) -> bf16 {
        round_to_bf16(self.to_f32())
    }

    /// `dst[i] = src[i].to_bf16()`.
    fn to_bf16_slice(src: &[Self], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_bf16();
        }
    }

    /// `src` as f32 values: `src` itself for f32, else converted into `scratch`.
    fn as_f32<'a>(src: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.clear();
        scratch.extend(src.iter().map(|&v| v.to_f32()));
        scratch
    }
}

impl WeightValue for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    fn to_bf16_slice(src: &[f32], dst: &mut [bf16]) {
        to_bf16(src, dst)
    }

    fn as_f32<'a>(src: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
}

/// f16 slices convert with `half`'s vectorised (F16C) slice conversion: one call per element
/// was 10% of a bf16 load from fp16 files.
impl WeightValue for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    fn to_bf16_slice(src: &[half::f16], dst: &mut [bf16]) {
        use half::slice::HalfFloatSliceExt;
        let mut wide = [0f32; 64];
        for (src, dst) in src.chunks(64).zip(dst.chunks_mut(64)) {
            let wide = &mut wide[..src.len()];
            src.convert_to_f32_slice(wide);
            to_bf16(wide, dst);
        }
    }

    fn as_f32<'a>(src: &'a [half::f16], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        scratch.resize(src.len(), 0.0);
        src.convert_to_f32_slice(scratch);
        scratch
    }
}

impl WeightValue for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    fn to_bf16(self) -> bf16 {
        self
    }

    fn to_bf16_slice(src: &[bf16], dst: &mut [bf16]) {
        dst.copy_from_slice(src)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::values;
    use super::*;

    #[test]
    fn bf16_conversion_matches_half() {
        let mut src = values(1000, 9);
        src.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            1.0 + f32::EPSILON,
            3.0039062,
        ]);
        let mut dst = vec![bf16::ZERO; src.len()];
        to_bf16(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert_eq!(d.to_bits(), bf16::from_f32(*s).to_bits(), "{s}");
        }
        to_bf16(&[f32::NAN], &mut dst[..1]);
        assert!(dst[0].is_nan());
        assert_eq!(to_bf16_par(&src), src.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
    }
}
