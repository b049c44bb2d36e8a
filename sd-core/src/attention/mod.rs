//! The one attention entry point of sd-core.
//!
//! Every attention in the models (UNet self and cross attention, the VAE mid-block, the causal
//! CLIP text encoder) calls [`attention`]. It picks an implementation by device and dtype;
//! device-specific kernels plug in here without touching model code:
//!
//! * CPU, f32/f16/bf16: [`cpu::fused_attention`], a tiled flash-attention kernel with online
//!   softmax whose memory does not grow with `seq_q x seq_k` (f16/bf16 are computed in f32).
//! * CPU, models loaded in bf16 (f32 activations): [`cpu_bf16::bf16_attention`], blocked
//!   attention whose two products run on MKL's bf16 GEMM (AMX).
//! * anything else: the reference path, one (batch, head) slice at a time for large problems.
//!
//! [`reference_attention`] is the plain matmul-softmax-matmul path that tests compare against.

pub mod cpu;
pub mod cpu_bf16;
#[cfg(any(feature = "cuda", test))]
pub mod cuda;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Options of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// Multiplies `q k^T` before the softmax; usually `head_dim^-0.5`.
    pub scale: f64,
    /// Mask out keys after the query position (CLIP's text encoder).
    pub causal: bool,
    /// Compute scores and softmax in f32 even for f16/bf16 inputs (SD 2.x's `upcast_attention`:
    /// half-precision scores overflow and give black images).
    pub upcast: bool,
    /// On the CPU, multiply bf16-rounded operands on AMX tiles or MKL's bf16 GEMM (scores,
    /// softmax and sums in f32): set by [`for_model`](Self::for_model) for models loaded in bf16
    /// on the CPU, whose activations are f32.
    pub bf16_products: bool,
}

impl AttentionOptions {
    /// Scale `head_dim^-0.5`, not causal, no upcast.
    pub fn new(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f64).sqrt(),
            causal: false,
            upcast: false,
            bf16_products: false,
        }
    }

    /// [`new`](Self::new) for a model whose weights `vb` loads, with bf16 products where those
    /// weights are multiplied in bf16 ([`crate::cpu::multiplies_in_bf16`]).
    pub fn for_model(head_dim: usize, vb: &VarBuilder) -> Self {
        let bf16_products = crate::cpu::multiplies_in_bf16(vb.dtype(), vb.device());
        Self { bf16_products, ..Self::new(head_dim) }
    }
}

/// Scaled dot-product attention over `[batch, heads, seq, head_dim]` tensors; returns
/// `[batch, heads, seq_q, head_dim]` in the dtype of `q`.
///
/// `k` and `v` have `seq_k` rows; `v`'s last dimension may differ from `head_dim`. On the CPU
/// this is [`cpu::fused_attention`] for all sizes (it is also faster than the reference path on
/// tiny shapes such as CLIP's 77 tokens); f16/bf16 inputs are computed in f32 there, which is
/// at least as precise as `opts.upcast` asks.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: AttentionOptions) -> Result<Tensor> {
    // CUDA, f16/bf16, supported head dim: the NVRTC flash-attention kernels (f32 softmax).
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::try_flash_attention(q, k, v, opts)? {
        return Ok(out);
    }
    let fused_dtype = matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16);
    match q.device() {
        Device::Cpu if opts.bf16_products && crate::cpu::bf16_gemms_available() => {
            cpu_bf16::bf16_attention(q, k, v, opts.scale, opts.causal)
        }
        Device::Cpu if fused_dtype => cpu::fused_attention(q, k, v, opts.scale, opts.causal),
        _ => chunked_attention(q, k, v, opts),
    }
}

/// The reference path: the whole score matrix at once (`q k^T`, scale, mask, softmax, `@ v`).
/// Computes in f32 when `opts.upcast` or the input is f32, else in the input dtype.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: AttentionOptions,
) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let compute = if opts.upcast || in_dtype == DType::F32 { DType::F32 } else { in_dtype };
    let (q, k, v) = (q.to_dtype(compute)?, k.to_dtype(compute)?, v.to_dtype(compute)?);
    let scores = (q.matmul(&k.t()?)? * opts.scale)?;
    let scores = if opts.causal { apply_causal_mask(&scores)? } else { scores };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v)?.to_dtype(in_dtype)
}

/// Processes one (batch, head) slice at a time, so the score matrix in memory is
/// `seq_q x seq_k` for a single head rather than for all of them (at 768 px the first UNet
/// level has 9216 tokens: one head's scores are 340 MB in f32, all of them several GB).
fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: AttentionOptions) -> Result<Tensor> {
    let (b, h, seq_q, d) = q.dims4()?;
    let seq_k = k.dim(2)?;
    // Small problems: one batched matmul is faster than a loop.
    if b * h * seq_q * seq_k <= 1 << 22 {
        return reference_attention(q, k, v, opts);
    }
    let q = q.reshape((b * h, seq_q, d))?;
    let k = k.reshape((b * h, seq_k, d))?;
    let v = v.reshape((b * h, seq_k, v.dim(3)?))?;
    let mut outs = Vec::with_capacity(b * h);
    for i in 0..b * h {
        let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
        outs.push(
            reference_attention(&qi.unsqueeze(0)?, &ki.unsqueeze(0)?, &vi.unsqueeze(0)?, opts)?
                .squeeze(0)?,
        );
    }
    Tensor::cat(&outs, 0)?.reshape((b, h, seq_q, ()))
}

fn apply_causal_mask(scores: &Tensor) -> Result<Tensor> {
    let (seq_q, seq_k) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let mask: Vec<f32> = (0..seq_q)
        .flat_map(|i| (0..seq_k).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (seq_q, seq_k), scores.device())?.to_dtype(scores.dtype())?;
    scores.broadcast_add(&mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_fused_equal_reference() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 2, 2100, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, 2, 1100, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, 2, 1100, 8), &dev)?;
        let opts = AttentionOptions::new(8);
        let r = reference_attention(&q, &k, &v, opts)?;
        for a in [chunked_attention(&q, &k, &v, opts)?, attention(&q, &k, &v, opts)?] {
            let diff = (a - &r)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn causal_mask_hides_future_keys() -> Result<()> {
        let dev = Device::Cpu;
        // With a causal mask the first query can only see the first value.
        let q = Tensor::ones((1, 1, 3, 2), DType::F32, &dev)?;
        let k = Tensor::ones((1, 1, 3, 2), DType::F32, &dev)?;
        let v = Tensor::new(&[[[[1f32, 1.], [5., 5.], [9., 9.]]]], &dev)?;
        let opts = AttentionOptions { causal: true, ..AttentionOptions::new(2) };
        let out = attention(&q, &k, &v, opts)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        assert_eq!(out[0], vec![1., 1.]);
        assert_eq!(out[1], vec![3., 3.]);
        assert_eq!(out[2], vec![5., 5.]);
        Ok(())
    }
}
