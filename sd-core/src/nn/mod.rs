//! The layers the models are built from: `Linear`, `Conv2d`, `GroupNorm` (optionally fused
//! with SiLU), plus loaders for candle-nn's `LayerNorm` and `Embedding`.
//!
//! On the CPU with f32 activations the GEMM layers run on [`blas`] (Intel MKL when it can be
//! loaded, else the `gemm` crate), split over rayon's threads, and convolutions build their
//! im2col matrix one cache-sized block of output pixels at a time instead of all at once.
//! Other devices and dtypes use candle's own ops.
//!
//! # bf16 on the CPU
//!
//! A `VarBuilder` of dtype bf16 on the CPU means *bf16 GEMM operands, f32 everything else*:
//! linear and convolution weights are stored in bf16 and multiplied with f32 accumulation,
//! while activations, biases, norms, softmax and embeddings stay f32 ([`param_dtype`]). This
//! is the CPU counterpart of torch's bf16 autocast, minus its bf16 elementwise ops. On CPUs
//! with AMX the weights are packed once at load for [`amx`]'s tile GEMM (`SD_CPU_AMX=0` turns
//! it off); elsewhere they stay plain and go through MKL's bf16 GEMM.

mod activations;
pub mod amx;
pub mod blas;
mod conv2d;
mod group_norm;
mod linear;
mod scratch;

pub(crate) use scratch::{with_scratch, Pod};

pub use activations::{geglu, gelu_erf};
pub use conv2d::{conv2d, Conv2d, Conv2dConfig};
pub use group_norm::{group_norm, GroupNorm};
pub use linear::{linear, linear_no_bias, Linear};

use candle_core::{DType, Device, Result, Tensor, WithDType};
use candle_nn::VarBuilder;

/// The dtype of activations and of the parameters that are not GEMM weights, for a builder.
pub fn param_dtype(vb: &VarBuilder) -> DType {
    activation_dtype(vb.dtype(), vb.device())
}

/// The dtype activations flow in for models whose weights were loaded as `dtype` on `device`.
pub fn activation_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

/// candle-nn's `LayerNorm`, with its parameters in [`param_dtype`].
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<candle_nn::LayerNorm> {
    let dtype = param_dtype(&vb);
    candle_nn::layer_norm(size, eps, vb.to_dtype(dtype))
}

/// candle-nn's `Embedding`, with its table in [`param_dtype`].
pub fn embedding(count: usize, dim: usize, vb: VarBuilder) -> Result<candle_nn::Embedding> {
    let dtype = param_dtype(&vb);
    candle_nn::embedding(count, dim, vb.to_dtype(dtype))
}

/// Whether a layer packs this weight for the AMX tiles when it is built (and keeps no tensor):
/// bf16 on the CPU, where the CPU has AMX.
fn packs_for_tiles(weight: &Tensor) -> bool {
    weight.device().is_cpu() && weight.dtype() == DType::BF16 && amx::available()
}

/// Whether the CPU kernels of this module handle `xs` with weights of dtype `weight`.
fn use_cpu_kernels(xs: &Tensor, weight: DType) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32 && matches!(weight, DType::F32 | DType::BF16)
}

/// Runs `f` on the contiguous CPU data of `t`.
pub(crate) fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

/// The number of tasks to cut a GEMM job of even work items into: one per thread. More would
/// balance nothing and cost more, as every GEMM call repacks the operand it shares (the weight).
fn task_count(work_items: usize) -> usize {
    rayon::current_num_threads().min(work_items).max(1)
}

/// Inputs for the layer tests.
#[cfg(test)]
pub(crate) mod test_values {
    /// `n` deterministic values in [-1, 1), spread over 2000 steps.
    pub fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 9) % 2000) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// Whether bf16 weights can be multiplied here (MKL or AMX); tests that need it say so.
    pub fn bf16_gemms() -> bool {
        let ok = super::blas::cpu_gemm().supports_bf16() || super::amx::available();
        if !ok {
            eprintln!("skipped: bf16 GEMMs need MKL or AMX");
        }
        ok
    }
}
