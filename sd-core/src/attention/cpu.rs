//! Fused, tiled attention for the CPU (flash-attention style).
//!
//! [`fused_attention`] computes `softmax(scale * q k^T) v` without ever materialising the
//! `seq_q x seq_k` score matrix. The output is cut into work items of [`BLOCK_Q`] query rows of
//! one (batch, head); rayon spreads the items over the cores. Each item streams the keys and
//! values in blocks of [`BLOCK_K`] rows and keeps, per query row, the running maximum `m` and the
//! running sum `l` of the exponentials (the "online softmax"):
//!
//! ```text
//! S    = (scale * Q_blk) K_blk^T                   (BLOCK_Q x BLOCK_K)
//! m'   = max(m, rowmax(S));  P = exp(S - m');  c = exp(m - m')
//! l    = c * l + rowsum(P);  O = c * O + P V_blk
//! ...  after the last block: O /= l
//! ```
//!
//! Everything is accumulated in f32. Besides the output, the memory used is a copy of the keys
//! and values repacked for the kernel (the size of `k` and `v`) and, per worker thread, one
//! `BLOCK_Q x BLOCK_K` score tile plus a `BLOCK_Q x d` query tile and output accumulator:
//! nothing grows with `seq_q * seq_k`.
//!
//! # Why this tiling
//!
//! * Both block products are written as register-tiled loops: `MR` rows times `NR` columns of
//!   accumulators (4 x 64 with AVX-512: 16 of its 32 vector registers), each step one broadcast
//!   of the left operand per row and one vector load of the right operand per 16 columns. The
//!   compiler turns them into broadcast FMAs. The keys are repacked once per call into
//!   transposed `d x NR` tiles, the values into `NR`-column tiles, so every tile is read
//!   contiguously; for SD's head dims (64: 16 KiB per key tile, `BLOCK_K x 64` values 32 KiB)
//!   the tile being reused by all row groups of the item stays in the L1 cache.
//! * 64 query rows per item give `batch * heads * seq_q / 64` items (1440 for SD 2.1's first
//!   UNet level at 768 px with CFG), plenty to balance over the threads, and each key/value
//!   block loaded is used by 64 queries. 128 keys per block keep the score tile (32 KiB) and the
//!   value block in L1/L2 and measured as fast as 256; 96 query rows with 6 x 64 register tiles
//!   spilled registers and ran at half the speed.
//! * The exponentials (one per score, `seq_q * seq_k` of them) would cost as much as the
//!   products with libm's scalar `expf`, so the softmax uses a polynomial `exp` written as
//!   straight-line code that vectorises, and the scale is folded into the queries.
//! * No `target-feature` flags are needed: the kernel is compiled for AVX-512, AVX2+FMA and the
//!   baseline of the target (NEON on aarch64), and the best version for the running CPU is
//!   picked at run time (`cpu::simd`).
//! * Causal masking skips key blocks that lie entirely after the block's last query and, in
//!   the blocks on the diagonal, limits each row to its visible keys (no `-inf` arithmetic).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::simd::{exp_approx, simd_dispatch, Avx2Fma, Avx512, Baseline, Isa, MulAdd};

/// Query rows per work item.
pub const BLOCK_Q: usize = 64;
/// Key/value rows per inner block (a multiple of every register tile width).
pub const BLOCK_K: usize = 128;

/// Fused attention over `[batch, heads, seq, head_dim]` CPU tensors: `softmax(scale * q k^T) v`,
/// with keys after the query position masked out when `causal` (as in
/// [`reference_attention`](super::reference_attention): query `i` sees keys `0..=i`).
///
/// `q` and `k` share `head_dim`; `v` may have another last dimension. f16/bf16 inputs are
/// converted to f32 and the output converted back to the input dtype; all arithmetic is f32.
/// Non-contiguous inputs are made contiguous first.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let (b, h, _, d) = q.dims4()?;
    let (kb, kh, seq_k, kd) = k.dims4()?;
    let (vb, vh, seq_v, _) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, seq_v) != (b, h, seq_k) {
        candle_core::bail!(
            "attention: incompatible shapes q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if d == 0 {
        // No features: every score is 0 and the output the mean of the values (of the visible
        // ones when causal); not worth a kernel path.
        let opts = super::AttentionOptions { scale, causal, upcast: true, bf16_products: false };
        return super::reference_attention(q, k, v, opts);
    }
    let prep = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.contiguous() };
    let (q32, k32, v32) = (prep(q)?, prep(k)?, prep(v)?);
    let out = q32.apply_op3_no_bwd(&k32, &v32, &FusedAttention { scale: scale as f32, causal })?;
    out.to_dtype(in_dtype)
}

/// The candle op: gives the kernel the contiguous f32 slices of the three tensors, no copies.
struct FusedAttention {
    scale: f32,
    causal: bool,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "sd-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
            let CpuStorage::F32(data) = s else {
                candle_core::bail!("fused attention: expected f32 storage")
            };
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("fused attention: expected contiguous input")
            };
            Ok(&data[start..end])
        }
        let (b, h, seq_q, d) = ql.shape().dims4()?;
        let seq_k = kl.shape().dims()[2];
        let dv = vl.shape().dims()[3];
        let dims = Dims { bh: b * h, seq_q, seq_k, d, dv };
        let out = run(
            Isa::best(),
            slice(qs, ql)?,
            slice(ks, kl)?,
            slice(vs, vl)?,
            dims,
            self.scale,
            self.causal,
        );
        Ok((CpuStorage::F32(out), Shape::from((b, h, seq_q, dv))))
    }
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    bh: usize,
    seq_q: usize,
    seq_k: usize,
    d: usize,
    dv: usize,
}

/// The attention for `dims` with the kernel compiled for `isa`.
fn run(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    let Dims { bh, seq_q, seq_k, d, dv } = dims;
    let mut out = vec![0f32; bh * seq_q * dv];
    if out.is_empty() {
        return out;
    }
    if seq_k == 0 {
        // Attention over no keys: zeros, as the reference path's `probs @ v` gives.
        return out;
    }
    let packed = simd_dispatch!(isa => pack(k: &[f32], v: &[f32], dims: Dims) -> Packed);
    let dv_pad = packed.dv_pad;
    let ctx = &Ctx { q, packed, dims, scale, causal };
    // Work items: (batch*head, query block), each owning its rows of the output.
    let mut items: Vec<(usize, usize, &mut [f32])> =
        Vec::with_capacity(bh * seq_q.div_ceil(BLOCK_Q));
    for (i, head) in out.chunks_mut(seq_q * dv).enumerate() {
        for (j, rows) in head.chunks_mut(BLOCK_Q * dv).enumerate() {
            items.push((i, j * BLOCK_Q, rows));
        }
    }
    // The instruction set is chosen in each task: closures do not inherit target features.
    items.into_par_iter().for_each_init(
        || Scratch {
            q: vec![0f32; BLOCK_Q * d],
            s: vec![0f32; BLOCK_Q * BLOCK_K],
            o: vec![0f32; BLOCK_Q * dv_pad],
        },
        |scratch, (i, q0, out)| {
            simd_dispatch!(isa => work_item(
                ctx: &Ctx,
                i: usize,
                q0: usize,
                out: &mut [f32],
                scratch: &mut Scratch
            ))
        },
    );
    out
}

/// The register tile of the kernel compiled for each instruction set: `MR` rows by `NR`
/// columns of accumulators.
trait RegisterTile: MulAdd {
    const NR: usize;
}

/// Rows of a register tile.
const MR: usize = 4;

/// 32 vector registers of 16 lanes: 4 x 64 tiles use 16 accumulators.
impl RegisterTile for Avx512 {
    const NR: usize = 64;
}

/// 16 vector registers of 8 lanes: 4 x 16 tiles use 8 accumulators.
impl RegisterTile for Avx2Fma {
    const NR: usize = 16;
}

/// NEON on aarch64, SSE on baseline x86-64.
impl RegisterTile for Baseline {
    const NR: usize = 16;
}

/// Keys and values repacked once per call (memory `O(seq_k * d)`, like the inputs) so that the
/// register tiles read them contiguously:
/// * keys transposed in tiles of `NR` keys: `[bh][key tile][d][NR]`,
/// * values in tiles of `NR` columns: `[bh][column tile][seq_k_pad][NR]`,
///
/// zero-padded to `seq_k_pad` keys (a multiple of 16) and `dv_pad` columns.
struct Packed {
    k: Vec<f32>,
    v: Vec<f32>,
    k_head: usize,
    v_head: usize,
    seq_k_pad: usize,
    dv_pad: usize,
}

/// Tile widths are multiples of 16 columns.
const COL_ALIGN: usize = 16;

fn pack<S: RegisterTile>(k: &[f32], v: &[f32], dims: Dims) -> Packed {
    let Dims { bh, seq_k, d, dv, .. } = dims;
    let seq_k_pad = seq_k.next_multiple_of(COL_ALIGN);
    let dv_pad = dv.next_multiple_of(COL_ALIGN);
    let k_tiles = seq_k_pad.div_ceil(S::NR);
    let v_tiles = dv_pad.div_ceil(S::NR);
    let (k_head, v_head) = (k_tiles * d * S::NR, v_tiles * seq_k_pad * S::NR);
    let mut kp = vec![0f32; bh * k_head];
    let mut vp = vec![0f32; bh * v_head];
    kp.par_chunks_mut(k_head).zip(vp.par_chunks_mut(v_head)).enumerate().for_each(
        |(i, (kp, vp))| {
            let k = &k[i * seq_k * d..][..seq_k * d];
            for (j, key) in k.chunks_exact(d).enumerate() {
                let tile = &mut kp[(j / S::NR) * d * S::NR..][..d * S::NR];
                for (dd, &x) in key.iter().enumerate() {
                    tile[dd * S::NR + j % S::NR] = x;
                }
            }
            let v = &v[i * seq_k * dv..][..seq_k * dv];
            for (j, row) in v.chunks_exact(dv).enumerate() {
                for (t, cols) in row.chunks(S::NR).enumerate() {
                    vp[(t * seq_k_pad + j) * S::NR..][..cols.len()].copy_from_slice(cols);
                }
            }
        },
    );
    Packed { k: kp, v: vp, k_head, v_head, seq_k_pad, dv_pad }
}

/// Everything a work item reads.
struct Ctx<'a> {
    q: &'a [f32],
    packed: Packed,
    dims: Dims,
    scale: f32,
    causal: bool,
}

/// The scratch memory of one worker thread.
struct Scratch {
    /// The item's queries, rows padded to the register tile height.
    q: Vec<f32>,
    /// The `BLOCK_Q x BLOCK_K` score / probability tile.
    s: Vec<f32>,
    /// The output accumulator, `BLOCK_Q x dv_pad`.
    o: Vec<f32>,
}

/// One work item: query rows `q0..q0 + rows` of batch*head `i`, written to `out` (`rows x dv`).
#[inline(always)]
fn work_item<S: RegisterTile>(
    c: &Ctx,
    i: usize,
    q0: usize,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    const {
        assert!(
            BLOCK_K.is_multiple_of(S::NR)
                && BLOCK_Q.is_multiple_of(MR)
                && S::NR.is_multiple_of(COL_ALIGN)
        )
    };
    let Dims { seq_q, seq_k, d, dv, .. } = c.dims;
    let Packed { seq_k_pad, dv_pad, .. } = c.packed;
    let rows = out.len() / dv;
    let rows_pad = rows.next_multiple_of(MR);
    let qp = &mut scratch.q[..rows_pad * d];
    // The scale is applied to the queries (rows * d products) rather than to the scores.
    for (y, &x) in qp.iter_mut().zip(&c.q[(i * seq_q + q0) * d..][..rows * d]) {
        *y = x * c.scale;
    }
    qp[rows * d..].fill(0.0);
    let qp = &*qp;
    let o = &mut scratch.o[..rows_pad * dv_pad];
    o.fill(0.0);
    let s = &mut scratch.s[..rows_pad * BLOCK_K];
    let kp = &c.packed.k[i * c.packed.k_head..][..c.packed.k_head];
    let vp = &c.packed.v[i * c.packed.v_head..][..c.packed.v_head];
    // Causal: the last query of the block sees keys 0..=q0+rows-1.
    let keys = if c.causal { seq_k.min(q0 + rows) } else { seq_k };

    let mut m = [f32::NEG_INFINITY; BLOCK_Q];
    let mut l = [0f32; BLOCK_Q];
    for j0 in (0..keys).step_by(BLOCK_K) {
        let bk = BLOCK_K.min(keys - j0);
        let bk_pad = bk.next_multiple_of(COL_ALIGN).min(seq_k_pad - j0);
        // s = q k_blk^T, one tile of NR keys at a time (its d x NR block stays in L1 while
        // all row groups use it).
        for col in (0..bk_pad).step_by(S::NR) {
            let w = S::NR.min(bk_pad - col);
            let b = &kp[(j0 + col) / S::NR * d * S::NR..][..d * S::NR];
            for r in (0..rows_pad).step_by(MR) {
                tile::<MR, S>(
                    w,
                    d,
                    &qp[r * d..],
                    d,
                    b,
                    S::NR,
                    &mut s[r * BLOCK_K + col..],
                    BLOCK_K,
                    false,
                );
            }
        }
        // Online softmax on the rows of the tile.
        for r in 0..rows_pad {
            let row = &mut s[r * BLOCK_K..][..bk_pad];
            let valid = if r >= rows {
                0
            } else if c.causal {
                bk.min((q0 + r + 1).saturating_sub(j0))
            } else {
                bk
            };
            if valid == 0 {
                row.fill(0.0);
                continue;
            }
            let m_new = m[r].max(row_max(&row[..valid]));
            let sum = exp_sub_sum::<S>(&mut row[..valid], m_new);
            row[valid..].fill(0.0);
            if m_new > m[r] && m[r] != f32::NEG_INFINITY {
                let corr = (m[r] - m_new).exp();
                l[r] *= corr;
                o[r * dv_pad..][..dv_pad].iter_mut().for_each(|x| *x *= corr);
            }
            l[r] += sum;
            m[r] = m_new;
        }
        // o += p v_blk, one NR-column tile of the values at a time.
        for col in (0..dv_pad).step_by(S::NR) {
            let w = S::NR.min(dv_pad - col);
            let b = &vp[(col / S::NR * seq_k_pad + j0) * S::NR..][..bk_pad * S::NR];
            for r in (0..rows_pad).step_by(MR) {
                tile::<MR, S>(
                    w,
                    bk_pad,
                    &s[r * BLOCK_K..],
                    BLOCK_K,
                    b,
                    S::NR,
                    &mut o[r * dv_pad + col..],
                    dv_pad,
                    true,
                );
            }
        }
    }
    for r in 0..rows {
        let inv = 1.0 / l[r];
        for (y, &x) in out[r * dv..][..dv].iter_mut().zip(&o[r * dv_pad..][..dv]) {
            *y = x * inv;
        }
    }
}

/// `c[MR x w] (+)= a[MR x kc] b[kc x w]` for a tile width `w` (a multiple of 16, at most
/// `S::NR`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const MR: usize, S: RegisterTile>(
    w: usize,
    kc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    match w {
        64 if S::NR >= 64 => micro::<MR, 64, S>(kc, a, lda, b, ldb, c, ldc, accumulate),
        48 if S::NR >= 48 => micro::<MR, 48, S>(kc, a, lda, b, ldb, c, ldc, accumulate),
        32 if S::NR >= 32 => micro::<MR, 32, S>(kc, a, lda, b, ldb, c, ldc, accumulate),
        _ => {
            for col in (0..w).step_by(16) {
                micro::<MR, 16, S>(kc, a, lda, &b[col..], ldb, &mut c[col..], ldc, accumulate)
            }
        }
    }
}

/// The register tile: `MR x W` accumulators, each step one broadcast of `a` per row times one
/// row of `b` (the compiler keeps `acc` in vector registers and emits FMAs).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn micro<const MR: usize, const W: usize, A: MulAdd>(
    kc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(
        kc > 0
            && a.len() >= (MR - 1) * lda + kc
            && b.len() >= (kc - 1) * ldb + W
            && c.len() >= (MR - 1) * ldc + W
    );
    let mut acc = [[0f32; W]; MR];
    for kk in 0..kc {
        // SAFETY: bounds checked by the assert above.
        let brow: &[f32; W] = unsafe { &*(b.as_ptr().add(kk * ldb) as *const [f32; W]) };
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = unsafe { *a.get_unchecked(r * lda + kk) };
            for (y, &bv) in acc.iter_mut().zip(brow) {
                *y = A::mul_add(x, bv, *y);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let crow = &mut c[r * ldc..][..W];
        if accumulate {
            crow.iter_mut().zip(acc).for_each(|(y, &x)| *y += x);
        } else {
            crow.copy_from_slice(acc);
        }
    }
}

/// Lanes of the explicit accumulators below: enough for one AVX-512 register, and a multiple
/// of the AVX2/NEON widths. Floating-point reductions are only vectorised when written this way.
const LANES: usize = 16;

/// The largest element of a non-empty row.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let mx = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let a = tree_reduce(acc, |a, b| if a > b { a } else { b });
    if a > mx {
        a
    } else {
        mx
    }
}

/// Reduces the lanes pairwise (halves, then quarters, ...), which the compiler turns into a
/// few vector operations instead of a chain of scalar ones.
#[inline(always)]
fn tree_reduce(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] = f(acc[i], acc[i + w]);
        }
        w /= 2;
    }
    acc[0]
}

/// `row[j] = exp(row[j] - m)` in place; returns the sum of the new values.
#[inline(always)]
fn exp_sub_sum<A: MulAdd>(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp_approx::<A>(*x - m);
            *a += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_approx::<A>(*x - m);
        sum += *x;
    }
    sum + tree_reduce(acc, |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// f64 attention, `[bh, seq, d]` slices.
    fn naive(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32, causal: bool) -> Vec<f64> {
        let Dims { bh, seq_q, seq_k, d, dv } = dims;
        let mut out = vec![0f64; bh * seq_q * dv];
        for h in 0..bh {
            for i in 0..seq_q {
                let keys = if causal { (i + 1).min(seq_k) } else { seq_k };
                let qi = &q[(h * seq_q + i) * d..][..d];
                let s: Vec<f64> = (0..keys)
                    .map(|j| {
                        let kj = &k[(h * seq_k + j) * d..][..d];
                        qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = p.iter().sum();
                for (j, pj) in p.iter().enumerate() {
                    for c in 0..dv {
                        out[(h * seq_q + i) * dv + c] +=
                            pj / sum * v[(h * seq_k + j) * dv + c] as f64;
                    }
                }
            }
        }
        out
    }

    /// Every compiled version of the kernel this CPU can run (the dispatch only ever runs the
    /// best one), on shapes with partial tiles everywhere.
    #[test]
    fn every_instruction_set_matches_f64() {
        for (seq_q, seq_k, d, dv) in
            [(70, 300, 40, 40), (129, 77, 80, 24), (3, 1, 8, 8), (65, 200, 160, 72)]
        {
            let dims = Dims { bh: 3, seq_q, seq_k, d, dv };
            let q = values(3 * seq_q * d, 1);
            let k = values(3 * seq_k * d, 2);
            let v = values(3 * seq_k * dv, 3);
            let scale = 1.0 / (d as f32).sqrt();
            for causal in [false, true] {
                let want = naive(&q, &k, &v, dims, scale, causal);
                let max_ref = want.iter().fold(0f64, |a, x| a.max(x.abs()));
                for isa in Isa::all() {
                    let got = run(isa, &q, &k, &v, dims, scale, causal);
                    let err =
                        got.iter().zip(&want).fold(0f64, |a, (&g, w)| a.max((g as f64 - w).abs()));
                    assert!(
                        err / max_ref < 1e-5,
                        "{isa:?} {dims:?} causal {causal}: relative error {:.2e}",
                        err / max_ref
                    );
                }
            }
        }
    }

    #[test]
    fn row_helpers() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let mx = row_max(&row);
        assert_eq!(mx, row.iter().cloned().fold(f32::MIN, f32::max));
        let want: f64 = row.iter().map(|&x| ((x - mx) as f64).exp()).sum();
        let got = exp_sub_sum::<Baseline>(&mut row, mx);
        assert!(((got as f64) - want).abs() < 1e-5 * want);
    }
}
