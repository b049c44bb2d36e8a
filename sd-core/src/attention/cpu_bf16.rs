//! CPU attention with bf16 products on MKL's AMX GEMM, for models run in bf16 on the CPU.
//!
//! Per (batch, head) and block of query rows: `S = (scale q) k^T` as one bf16 GEMM into f32
//! scores, an exact f32 softmax over the whole key row (no online rescaling: the block's
//! scores, `BLOCK_BYTES` at most, fit in L2), then `O = P v` as a second bf16 GEMM and the
//! division by the row sums. Keys and values are converted to bf16 once per call. The operand
//! rounding is the same as torch's bf16 autocast; scores, softmax and accumulation stay f32.

use candle_core::{DType, Device, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::cpu::{exp_approx, Fused, MulAdd, Unfused};
use crate::nn::blas::{gemm_bf16, to_bf16, to_bf16_par, Operand};

/// Score block budget per task: 2 MiB of f32.
const BLOCK_BYTES: usize = 2 << 20;

/// `softmax(scale q k^T) v` for f32 `[batch, heads, seq, d]` tensors on the CPU.
pub fn bf16_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, h, seq_q, d) = q.dims4()?;
    let (_, _, seq_k, dv) = v.dims4()?;
    if k.dims4()? != (b, h, seq_k, d) || v.dims4()?.0 != b || v.dims4()?.1 != h {
        candle_core::bail!("attention: incompatible shapes q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    }
    let prep = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>() };
    let q = prep(&(q * scale)?)?;
    let k16 = to_bf16_par(&prep(k)?);
    let v16 = to_bf16_par(&prep(v)?);

    let block = (BLOCK_BYTES / 4 / seq_k.max(1)).clamp(16, 512).min(seq_q.max(1));
    let blocks_per_head = seq_q.div_ceil(block);
    let mut out = vec![0f32; b * h * seq_q * dv];
    // Work items (head, first query row); each writes its own rows of `out`.
    let items: Vec<(usize, usize)> = (0..b * h).flat_map(|bh| (0..blocks_per_head).map(move |j| (bh, j * block))).collect();
    let out_ptr = crate::nn::blas::SendPtr(out.as_mut_ptr());
    items.par_iter().for_each(|&(bh, q0)| {
        let rows = block.min(seq_q - q0);
        let q_blk = &q[(bh * seq_q + q0) * d..][..rows * d];
        let k_bh = &k16[bh * seq_k * d..][..seq_k * d];
        let v_bh = &v16[bh * seq_k * dv..][..seq_k * dv];
        let mut q16 = vec![bf16::ZERO; rows * d];
        to_bf16(q_blk, &mut q16);
        let mut scores = vec![0f32; rows * seq_k];
        // Safety: `scores` is this task's own buffer.
        unsafe { gemm_bf16(rows, seq_k, d, Operand::new(&q16, d), Operand::t(k_bh, d), 0.0, scores.as_mut_ptr(), seq_k) };
        let mut probs = vec![bf16::ZERO; rows * seq_k];
        let mut inv_sums = vec![0f32; rows];
        for (r, (row, p)) in scores.chunks_mut(seq_k).zip(probs.chunks_mut(seq_k)).enumerate() {
            // Causal: query q0 + r sees keys 0 ..= q0 + r (seq_q == seq_k for CLIP).
            let visible = if causal { (q0 + r + 1).min(seq_k) } else { seq_k };
            let sum = exp_row(&mut row[..visible]);
            to_bf16(&row[..visible], &mut p[..visible]);
            inv_sums[r] = 1.0 / sum;
        }
        // Safety: rows q0 .. q0 + rows of head bh belong to this item alone.
        let o = unsafe { out_ptr.get().add((bh * seq_q + q0) * dv) };
        unsafe { gemm_bf16(rows, dv, seq_k, Operand::new(&probs, seq_k), Operand::new(v_bh, dv), 0.0, o, dv) };
        for (r, inv) in inv_sums.iter().enumerate() {
            // Safety: as above.
            let row = unsafe { std::slice::from_raw_parts_mut(o.add(r * dv), dv) };
            row.iter_mut().for_each(|x| *x *= inv);
        }
    });
    Tensor::from_vec(out, (b, h, seq_q, dv), &Device::Cpu)
}

/// `row = exp(row - max(row))`; returns the sum.
fn exp_row(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // Safety: the CPU has AVX-512F (and so AVX2 and FMA).
        return unsafe { exp_row_avx512(row) };
    }
    exp_row_with::<Unfused>(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn exp_row_avx512(row: &mut [f32]) -> f32 {
    exp_row_with::<Fused>(row)
}

#[inline(always)]
fn exp_row_with<A: MulAdd>(row: &mut [f32]) -> f32 {
    const LANES: usize = 16;
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            max[i] = max[i].max(c[i]);
        }
    }
    let m = chunks.remainder().iter().fold(max.iter().copied().fold(f32::NEG_INFINITY, f32::max), |a, &b| a.max(b));
    let mut sum = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_approx::<A>(c[i] - m);
            sum[i] += c[i];
        }
    }
    let mut total: f32 = sum.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_approx::<A>(*x - m);
        total += *x;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{reference_attention, AttentionOptions};

    #[test]
    fn close_to_f32_reference() -> Result<()> {
        if !crate::nn::blas::cpu_gemm().supports_bf16() {
            assert!(std::env::var("SD_REQUIRE_MKL").is_err(), "SD_REQUIRE_MKL set but MKL is not loaded");
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(b, h, sq, sk, d, causal) in &[(2, 3, 100, 100, 64, true), (1, 2, 700, 77, 40, false), (1, 1, 33, 1030, 80, false)] {
            let vals = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7919 + seed * 104729) % 2001) as f32 / 1000.0 - 1.0).collect() };
            let q = Tensor::from_vec(vals(b * h * sq * d, 1), (b, h, sq, d), &dev)?;
            let k = Tensor::from_vec(vals(b * h * sk * d, 2), (b, h, sk, d), &dev)?;
            let v = Tensor::from_vec(vals(b * h * sk * d, 3), (b, h, sk, d), &dev)?;
            let opts = AttentionOptions { causal, ..AttentionOptions::new(d) };
            let want = reference_attention(&q, &k, &v, opts)?;
            let got = bf16_attention(&q, &k, &v, opts.scale, causal)?;
            let err = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            // bf16 operands: 8 mantissa bits, values of order 1.
            assert!(err < 2e-2, "({b},{h},{sq},{sk},{d},{causal}): {err}");
        }
        Ok(())
    }
}
