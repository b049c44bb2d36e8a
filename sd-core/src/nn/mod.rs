//! The layers the models are built from: `Linear`, `Conv2d`, `GroupNorm` (optionally fused
//! with SiLU), plus loaders for candle-nn's `LayerNorm` and `Embedding`.
//!
//! On the CPU with f32 activations the GEMM layers run on [`cpu::blas`] (Intel MKL when it can
//! be loaded, else the `gemm` crate), split over rayon's threads, and convolutions build their
//! im2col matrix one cache-sized block of output pixels at a time instead of all at once.
//! Other devices and dtypes use candle's own ops.
//!
//! # bf16 on the CPU
//!
//! A `VarBuilder` of dtype bf16 on the CPU means *bf16 GEMM operands, f32 everything else*:
//! linear and convolution weights are stored in bf16 and multiplied with f32 accumulation,
//! while activations, biases, norms, softmax and embeddings stay f32 ([`param_dtype`]). This
//! is the CPU counterpart of torch's bf16 autocast, minus its bf16 elementwise ops. On CPUs
//! with AMX or AVX512_BF16 the weights are packed once at load for [`cpu::packed`]'s GEMM
//! (`SD_CPU_AMX=0` / `SD_CPU_AVX512BF16=0` turn its kernels off); elsewhere they stay plain and
//! go through MKL's bf16 GEMM.

mod activations;
mod conv2d;
mod group_norm;
mod linear;
pub mod lora;
mod residual;
pub(crate) mod winograd;

pub use activations::{geglu, gelu_erf};
pub use conv2d::{conv2d, Conv2d, Conv2dConfig};
pub use group_norm::{group_norm, GroupNorm};
pub use linear::{linear, linear_no_bias, Linear};
pub use lora::{collect_layers, LoraLayer};
pub use residual::add_residual;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::cpu;
use crate::cpu::packed::Packed;
use crate::loading::{
    cached_operands, full_name, mapped_f32, mapped_half, MappedF32, MappedHalf, PackedForm,
};

/// The dtype of activations and of the parameters that are not GEMM weights, for a builder.
pub fn param_dtype(vb: &VarBuilder) -> DType {
    activation_dtype(vb.dtype(), vb.device())
}

/// The dtype activations flow in for models whose weights were loaded as `dtype` on `device`.
pub fn activation_dtype(dtype: DType, device: &Device) -> DType {
    if cpu::multiplies_in_bf16(dtype, device) {
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

/// A GEMM layer's weight as the loader hands it over.
#[derive(Debug)]
enum Source {
    /// A tensor, with the loader's name for it (the packed-weight cache's key; `None` for a
    /// weight made in code, such as a fused LoRA).
    Tensor(Tensor, Option<String>),
    /// f32 values read in place from the mapped weight file, for a CPU builder of `dtype` (see
    /// [`MappedF32`]): the layer keeps them as they are, or packs from them and releases them.
    Mapped { values: MappedF32, shape: Shape, dtype: DType },
    /// f16 or bf16 values read in place from the mapped weight file, for a layer that packs them.
    MappedHalf { values: MappedHalf, shape: Shape },
    /// Packed operands read in place from the packed-weight cache, in the form the layer asked
    /// for; `shape` is the weight's.
    Cached { operands: Vec<Packed>, shape: Shape },
}

impl Source {
    /// Weight `name` of `vb`: from the packed-weight cache where the layer packs it (`form`)
    /// and the cache holds it, else mapped where the loader has it so, else `vb.get`.
    fn get(vb: &VarBuilder, shape: impl Into<Shape>, name: &str, form: PackedForm) -> Result<Self> {
        let shape = shape.into();
        let full = full_name(vb, name);
        let packs = packs_weight(vb.dtype(), vb.device());
        if packs {
            if let Some(operands) = cached_operands(&full, form) {
                return Ok(Source::Cached { operands, shape });
            }
        }
        if let Some(values) = mapped_half(vb, shape.clone(), name, packs)? {
            return Ok(Source::MappedHalf { values, shape });
        }
        Ok(match mapped_f32(vb, shape.clone(), name)? {
            Some(values) => Source::Mapped { values, shape, dtype: vb.dtype() },
            None => Source::Tensor(vb.get(shape, name)?, Some(full)),
        })
    }

    /// Whether the layer packs this weight for [`cpu::packed`] (see [`packs_weight`]).
    fn packs(&self) -> bool {
        match self {
            Source::Tensor(t, _) => packs_weight(t.dtype(), t.device()),
            Source::Mapped { dtype, .. } => packs_weight(*dtype, &Device::Cpu),
            Source::MappedHalf { .. } | Source::Cached { .. } => true,
        }
    }

    /// The weight as a tensor of the builder's dtype (mapped values are copied, then released).
    fn into_tensor(self) -> Result<Tensor> {
        match self {
            Source::Tensor(t, _) => Ok(t),
            Source::Mapped { values, shape, dtype } => {
                let t = Tensor::from_slice(&values, shape, &Device::Cpu)?.to_dtype(dtype)?;
                values.release();
                Ok(t)
            }
            Source::MappedHalf { .. } | Source::Cached { .. } => {
                candle_core::bail!("a weight read for packing is not a tensor")
            }
        }
    }
}

/// Whether a layer packs a weight of `dtype` on `device` for [`cpu::packed`] when it is built
/// (and keeps no tensor): bf16 on the CPU, where a packed kernel (AMX tiles, AVX512_BF16) runs.
pub(crate) fn packs_weight(dtype: DType, device: &Device) -> bool {
    cpu::multiplies_in_bf16(dtype, device) && cpu::packed::available()
}

/// Whether the CPU kernels of this module handle `xs` with weights of dtype `weight`.
fn use_cpu_kernels(xs: &Tensor, weight: DType) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32 && matches!(weight, DType::F32 | DType::BF16)
}

/// The number of tasks to cut a GEMM job of even work items into: one per thread. More would
/// balance nothing and cost more, as every GEMM call repacks the operand it shares (the weight).
fn task_count(work_items: usize) -> usize {
    rayon::current_num_threads().min(work_items).max(1)
}
