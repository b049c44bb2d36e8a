//! CPU attention with bf16 products, for models run in bf16 on the CPU.
//!
//! Per (batch, head) and block of query rows: `S = q k^T` as one bf16 GEMM into f32 scores,
//! an exact f32 softmax of `scale S` over the whole key row (no online rescaling: the block's
//! scores, `BLOCK_BYTES` at most, fit in L2), then `O = P v` as a second bf16 GEMM and the
//! division by the row sums. The operand rounding is the same as torch's bf16 autocast;
//! scores, softmax and accumulation stay f32.
//!
//! The GEMMs run on our packed bf16 GEMM where the CPU has AMX or AVX512_BF16 (keys and values
//! packed once per call), else on MKL's bf16 GEMM (keys and values converted to bf16 once per
//! call).

use candle_core::{DType, Device, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::bf16::{round_to_bf16, to_bf16, to_bf16_par};
use crate::cpu::blas::{gemm_bf16, Operand};
use crate::cpu::packed;
use crate::cpu::simd::{exp_approx, simd_dispatch, MulAdd};
use crate::cpu::{with_scratch, with_slice};

/// Score block budget per task: 2 MiB of f32.
const BLOCK_BYTES: usize = 2 << 20;

/// `softmax(scale q k^T) v` for f32 `[batch, heads, seq, d]` tensors on the CPU.
pub fn bf16_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    bf16_attention_on(q, k, v, scale, causal, packed::available())
}

fn bf16_attention_on(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    on_packed: bool,
) -> Result<Tensor> {
    let (b, h, seq_q, d) = q.dims4()?;
    let (_, _, seq_k, dv) = v.dims4()?;
    if k.dims4()? != (b, h, seq_k, d) || v.dims4()?.0 != b || v.dims4()?.1 != h {
        candle_core::bail!(
            "attention: incompatible shapes q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (q, k, v) = (
        q.to_dtype(DType::F32)?.contiguous()?,
        k.to_dtype(DType::F32)?.contiguous()?,
        v.to_dtype(DType::F32)?.contiguous()?,
    );
    let k16 = with_slice(&k, to_bf16_par)?;
    let v16 = with_slice(&v, to_bf16_par)?;

    // Whole tile blocks of query rows.
    let block = (BLOCK_BYTES / 4 / seq_k.max(1)).clamp(32, 512).next_multiple_of(packed::BLOCK);
    let shape = BlockShape { seq_k, d, dv, scale: scale as f32, causal };
    let mut out = vec![0f32; b * h * seq_q * dv];
    let packed = on_packed.then(|| PackedHeads::new(&k16, &v16, &shape));
    with_slice(&q, |q: &[f32]| {
        // Heads, and blocks of query rows within a head, in parallel.
        out.par_chunks_mut(seq_q * dv).zip(q.par_chunks(seq_q * d)).enumerate().for_each(
            |(bh, (out_h, q_h))| {
                out_h
                    .par_chunks_mut(block * dv)
                    .zip(q_h.par_chunks(block * d))
                    .enumerate()
                    .for_each(|(j, (o, q_blk))| match &packed {
                        Some(p) => attend_block_packed(
                            &shape,
                            j * block,
                            q_blk,
                            p.keys(bh),
                            p.values(bh),
                            o,
                        ),
                        None => attend_block(
                            &shape,
                            j * block,
                            q_blk,
                            &k16[bh * seq_k * d..][..seq_k * d],
                            &v16[bh * seq_k * dv..][..seq_k * dv],
                            o,
                        ),
                    })
            },
        )
    })?;
    Tensor::from_vec(out, (b, h, seq_q, dv), &Device::Cpu)
}

struct BlockShape {
    seq_k: usize,
    d: usize,
    dv: usize,
    scale: f32,
    causal: bool,
}

/// Output rows `o` for the query rows `q` (the first being row `q0` of the head), on MKL.
fn attend_block(s: &BlockShape, q0: usize, q: &[f32], k: &[bf16], v: &[bf16], o: &mut [f32]) {
    let (seq_k, d, dv) = (s.seq_k, s.d, s.dv);
    let rows = q.len() / d;
    with_scratch(0, rows * d, |q16: &mut [bf16]| {
        with_scratch(1, rows * seq_k, |scores: &mut [f32]| {
            with_scratch(2, rows * seq_k, |probs: &mut [bf16]| {
                to_bf16(q, q16);
                // Safety (both GEMMs): `scores` is this thread's scratch, `o` this block's rows.
                unsafe {
                    gemm_bf16(
                        rows,
                        seq_k,
                        d,
                        Operand::new(q16, d),
                        Operand::t(k, d),
                        0.0,
                        scores.as_mut_ptr(),
                        seq_k,
                    )
                };
                let inv_sums = softmax_rows(s, q0, scores, probs);
                unsafe {
                    gemm_bf16(
                        rows,
                        dv,
                        seq_k,
                        Operand::new(probs, seq_k),
                        Operand::new(v, dv),
                        0.0,
                        o.as_mut_ptr(),
                        dv,
                    )
                };
                scale_rows(o, dv, &inv_sums);
            })
        })
    })
}

/// Keys (as `k^T`) and values of every head, packed as B operands of the packed bf16 GEMM.
struct PackedHeads {
    keys: Vec<bf16>,
    values: Vec<bf16>,
    key_len: usize,
    value_len: usize,
}

impl PackedHeads {
    fn new(k16: &[bf16], v16: &[bf16], s: &BlockShape) -> Self {
        let (key_len, value_len) =
            (packed::packed_len(s.seq_k, s.d), packed::packed_len(s.dv, s.seq_k));
        let heads = k16.len() / (s.seq_k * s.d).max(1);
        let mut keys = vec![bf16::ZERO; heads * key_len + 32];
        let mut values = vec![bf16::ZERO; heads * value_len + 32];
        // Every head's packing is a whole number of 2 KiB blocks, so one aligned start
        // aligns them all.
        packed::aligned(&mut keys, heads * key_len)
            .par_chunks_mut(key_len)
            .zip(k16.par_chunks(s.seq_k * s.d))
            .for_each(|(dst, k)| {
                packed::pack_b_transposed(k, s.seq_k, s.d, dst);
            });
        packed::aligned(&mut values, heads * value_len)
            .par_chunks_mut(value_len)
            .zip(v16.par_chunks(s.seq_k * s.dv))
            .for_each(|(dst, v)| {
                packed::pack_b_rows(s.dv, s.seq_k, dst, |j, row| {
                    row.copy_from_slice(&v[j * s.dv..][..s.dv])
                });
            });
        Self { keys, values, key_len, value_len }
    }

    fn keys(&self, head: usize) -> &[bf16] {
        let skip = self.keys.as_ptr().align_offset(64);
        &self.keys[skip + head * self.key_len..][..self.key_len]
    }

    fn values(&self, head: usize) -> &[bf16] {
        let skip = self.values.as_ptr().align_offset(64);
        &self.values[skip + head * self.value_len..][..self.value_len]
    }
}

/// [`attend_block`] on the packed GEMM, with the head's packed keys and values.
fn attend_block_packed(
    s: &BlockShape,
    q0: usize,
    q: &[f32],
    keys: &[bf16],
    values: &[bf16],
    o: &mut [f32],
) {
    let (seq_k, d, dv) = (s.seq_k, s.d, s.dv);
    let rows = q.len() / d;
    let (q_len, p_len) = (packed::packed_len(rows, d), packed::packed_len(rows, seq_k));
    let padded_k = packed::blocks(seq_k) * packed::BLOCK;
    with_scratch(0, q_len + 32, |q16: &mut [bf16]| {
        with_scratch(1, rows * seq_k, |scores: &mut [f32]| {
            with_scratch(2, padded_k, |probs_row: &mut [bf16]| {
                with_scratch(3, p_len + 32, |packed_probs: &mut [bf16]| {
                    let q16 = packed::aligned(q16, q_len);
                    packed::pack_a_f32(q, rows, d, q16);
                    // Safety (both GEMMs): a packed kernel runs here (the caller checked);
                    // operands packed above; `scores` is this thread's scratch, `o` this
                    // block's rows.
                    unsafe {
                        packed::gemm(
                            q16,
                            rows,
                            keys,
                            seq_k,
                            d,
                            packed::Bias::None,
                            scores.as_mut_ptr(),
                            seq_k,
                        )
                    };
                    // Each row's numerators go straight into the packed layout through one
                    // row buffer that stays in L1 (rows past `rows` pad the last block).
                    let packed_probs = packed::aligned(packed_probs, p_len);
                    probs_row.fill(bf16::ZERO);
                    let mut inv_sums = Vec::with_capacity(rows);
                    for r in 0..packed::blocks(rows) * packed::BLOCK {
                        if r < rows {
                            let row = &scores[r * seq_k..][..seq_k];
                            inv_sums.push(softmax_row(s, q0 + r, row, &mut probs_row[..seq_k]));
                        } else if r == rows {
                            probs_row.fill(bf16::ZERO);
                        }
                        packed::write_a_row(packed_probs, seq_k, r, probs_row);
                    }
                    unsafe {
                        packed::gemm(
                            packed_probs,
                            rows,
                            values,
                            dv,
                            seq_k,
                            packed::Bias::None,
                            o.as_mut_ptr(),
                            dv,
                        )
                    };
                    scale_rows(o, dv, &inv_sums);
                })
            })
        })
    })
}

/// The softmax numerators of each row of `scores` into `probs`, and the inverse of each row's
/// sum.
fn softmax_rows(s: &BlockShape, q0: usize, scores: &[f32], probs: &mut [bf16]) -> Vec<f32> {
    let rows = scores.chunks(s.seq_k).zip(probs.chunks_mut(s.seq_k));
    rows.enumerate().map(|(r, (row, p))| softmax_row(s, q0 + r, row, p)).collect()
}

/// The softmax numerators of query row `query`'s scores `row` into `p` (0 past the causal
/// limit), and the inverse of their sum.
fn softmax_row(s: &BlockShape, query: usize, row: &[f32], p: &mut [bf16]) -> f32 {
    // Causal: query i sees keys 0 ..= i (seq_q == seq_k for CLIP).
    let visible = if s.causal { (query + 1).min(s.seq_k) } else { s.seq_k };
    p[visible..].fill(bf16::ZERO);
    1.0 / softmax_numerators(&row[..visible], s.scale, &mut p[..visible])
}

fn scale_rows(o: &mut [f32], dv: usize, inv_sums: &[f32]) {
    for (row, inv) in o.chunks_mut(dv).zip(inv_sums) {
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// `probs = bf16(exp(scale (row - max(row))))` (`scale > 0`); returns the sum of the
/// exponentials before rounding.
fn softmax_numerators(row: &[f32], scale: f32, probs: &mut [bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd::Isa::best().has_avx512_bf16() {
        // Safety: the CPU has AVX-512 F and BF16.
        return unsafe { avx512_bf16::softmax_numerators(row, scale, probs) };
    }
    simd_dispatch!(softmax_numerators_with(row: &[f32], scale: f32, probs: &mut [bf16]) -> f32)
}

/// [`softmax_numerators`] where the CPU converts to bf16 itself (`VCVTNEPS2BF16`, which rounds
/// to nearest even as [`round_to_bf16`] does): the integer rounding and the narrowing store it
/// replaces were a third of the loop on Zen 4. The same operations in the same order as
/// [`softmax_numerators_with`] and [`exp_approx`], so the numerators are bit for bit the same.
#[cfg(target_arch = "x86_64")]
mod avx512_bf16 {
    use std::arch::x86_64::*;

    use half::bf16;

    use crate::cpu::bf16::round_to_bf16;
    use crate::cpu::simd::{exp_approx, Avx512};

    /// # Safety
    /// The CPU has AVX-512 F and BF16.
    #[target_feature(enable = "avx512f,avx512bf16,fma")]
    pub(super) unsafe fn softmax_numerators(row: &[f32], scale: f32, probs: &mut [bf16]) -> f32 {
        const LANES: usize = 16;
        let whole = row.len() / LANES * LANES;
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..whole).step_by(LANES) {
            // The max of (row, running max) takes the running max where the score is NaN, as
            // the plain compare of the portable loop does.
            max = _mm512_max_ps(_mm512_loadu_ps(row.as_ptr().add(i)), max);
        }
        let mut lanes = [0f32; LANES];
        _mm512_storeu_ps(lanes.as_mut_ptr(), max);
        let m = row[whole..]
            .iter()
            .fold(lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max), |a, &b| a.max(b));
        let (m16, scale16) = (_mm512_set1_ps(m), _mm512_set1_ps(scale));
        let mut sum = _mm512_setzero_ps();
        for i in (0..whole).step_by(LANES) {
            let x =
                _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row.as_ptr().add(i)), m16), scale16);
            let e = exp(x);
            sum = _mm512_add_ps(sum, e);
            let e16: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(probs.as_mut_ptr().add(i).cast(), e16);
        }
        _mm512_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total: f32 = lanes.iter().sum();
        for (&x, p) in row[whole..].iter().zip(&mut probs[whole..]) {
            let e = exp_approx::<Avx512>((x - m) * scale);
            total += e;
            *p = round_to_bf16(e);
        }
        total
    }

    /// [`exp_approx`] on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn exp(x: __m512) -> __m512 {
        const ROUND: f32 = 12_582_912.0;
        let c = _mm512_set1_ps;
        // `max(-87, x)`: x where x is NaN, like the portable clamps.
        let x = _mm512_min_ps(c(88.0), _mm512_max_ps(c(-87.0), x));
        let t = _mm512_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(ROUND));
        let n = _mm512_sub_ps(t, c(ROUND));
        let minus_n = _mm512_sub_ps(c(0.0), n);
        let r = _mm512_fmadd_ps(
            minus_n,
            c(-2.121_944_4e-4),
            _mm512_fmadd_ps(minus_n, c(0.693_359_4), x),
        );
        let mut p = c(1.987_569_1e-4);
        for coefficient in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, c(coefficient));
        }
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), c(1.0));
        // e 2^n in one instruction: exact, as the product with 2^n built in the exponent bits
        // is, since the result stays a normal number (x >= -87).
        _mm512_scalef_ps(e, n)
    }
}

#[inline(always)]
fn softmax_numerators_with<A: MulAdd>(row: &[f32], scale: f32, probs: &mut [bf16]) -> f32 {
    const LANES: usize = 16;
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            // A plain compare (one instruction): `f32::max`'s NaN rule costs two more, and a
            // NaN score poisons the row either way.
            max[i] = if c[i] > max[i] { c[i] } else { max[i] };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(max.iter().copied().fold(f32::NEG_INFINITY, f32::max), |a, &b| a.max(b));
    let mut sum = [0f32; LANES];
    let mut out = probs.chunks_exact_mut(LANES);
    let mut chunks = row.chunks_exact(LANES);
    for (c, p) in (&mut chunks).zip(&mut out) {
        for i in 0..LANES {
            let e = exp_approx::<A>((c[i] - m) * scale);
            sum[i] += e;
            p[i] = round_to_bf16(e);
        }
    }
    let mut total: f32 = sum.iter().sum();
    for (&x, p) in chunks.remainder().iter().zip(out.into_remainder()) {
        let e = exp_approx::<A>((x - m) * scale);
        total += e;
        *p = round_to_bf16(e);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{reference_attention, AttentionOptions};

    /// The AVX512_BF16 numerators are bit for bit the portable ones, tails and NaN included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_numerators_match_portable() {
        if !crate::cpu::simd::Isa::best().has_avx512_bf16() {
            return;
        }
        for len in [1, 15, 16, 77, 4096, 4099] {
            let mut row: Vec<f32> =
                (0..len).map(|i| ((i * 7919) % 2001) as f32 / 20.0 - 50.0).collect();
            if len > 40 {
                // A spread past exp's clamp at -87, and a NaN.
                row[3] = -1.0e4;
                row[len - 2] = f32::NAN;
            }
            for scale in [0.125, 1.0] {
                let (mut ours, mut portable) = (vec![bf16::ZERO; len], vec![bf16::ZERO; len]);
                // Safety: checked above.
                let sum = unsafe { avx512_bf16::softmax_numerators(&row, scale, &mut ours) };
                let want =
                    softmax_numerators_with::<crate::cpu::simd::Avx512>(&row, scale, &mut portable);
                let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&ours), bits(&portable), "len {len}, scale {scale}");
                assert_eq!(sum.to_bits(), want.to_bits(), "len {len}, scale {scale}");
            }
        }
    }

    /// Both GEMM paths (MKL, the packed kernel) where this machine has them.
    #[test]
    fn close_to_f32_reference() -> Result<()> {
        let mkl = crate::cpu::blas::mkl().is_ok();
        if !mkl {
            assert!(
                std::env::var("SD_REQUIRE_MKL").is_err(),
                "SD_REQUIRE_MKL set but MKL is not loaded"
            );
        }
        let paths: Vec<bool> = [(false, mkl), (true, packed::available())]
            .into_iter()
            .filter(|p| p.1)
            .map(|p| p.0)
            .collect();
        let dev = Device::Cpu;
        for &(b, h, sq, sk, d, causal) in
            &[(2, 3, 100, 100, 64, true), (1, 2, 700, 77, 40, false), (1, 1, 33, 1030, 80, false)]
        {
            let vals = |n: usize, seed: usize| -> Vec<f32> {
                (0..n).map(|i| ((i * 7919 + seed * 104729) % 2001) as f32 / 1000.0 - 1.0).collect()
            };
            let q = Tensor::from_vec(vals(b * h * sq * d, 1), (b, h, sq, d), &dev)?;
            let k = Tensor::from_vec(vals(b * h * sk * d, 2), (b, h, sk, d), &dev)?;
            let v = Tensor::from_vec(vals(b * h * sk * d, 3), (b, h, sk, d), &dev)?;
            let opts = AttentionOptions { causal, ..AttentionOptions::new(d) };
            let want = reference_attention(&q, &k, &v, opts)?;
            for &on_packed in &paths {
                let got = bf16_attention_on(&q, &k, &v, opts.scale, causal, on_packed)?;
                let err = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                // bf16 operands: 8 mantissa bits, values of order 1.
                assert!(err < 2e-2, "({b},{h},{sq},{sk},{d},{causal}) packed {on_packed}: {err}");
            }
        }
        Ok(())
    }
}
