//! Numerics of the CPU attention against an f64 reference computed here with plain loops:
//! every head dim of SD 1.x/2.x (40, 64, 80, 128, 160) and the VAE's single 512-wide head,
//! causal and not, odd sequence lengths, several (batch, head) slices.
//!
//! The error measure is relative to the output's scale: `max |out - ref| / max |ref|` over the
//! checked rows (single elements of an attention output can be arbitrarily close to zero, so an
//! element-wise relative error is meaningless). To keep the f64 loops cheap in debug builds,
//! long outputs are checked on a spread of query rows that always includes the first and last.

use candle_core::{DType, Device, Result, Tensor};
use sd_core::attention::{attention, cpu::fused_attention, reference_attention, AttentionOptions};

/// Deterministic N(0, 1)-ish values (sum of uniforms from a 64-bit LCG).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut uniform = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 40) as f64 / (1u64 << 24) as f64
    };
    (0..n).map(|_| ((0..4).map(|_| uniform()).sum::<f64>() - 2.0) as f32 * 1.73).collect()
}

struct Case {
    b: usize,
    h: usize,
    seq_q: usize,
    seq_k: usize,
    d: usize,
    dv: usize,
    causal: bool,
    /// Multiplies q: larger values make the softmax peakier (exercises the running max).
    q_gain: f32,
}

impl Case {
    fn new(b: usize, h: usize, seq_q: usize, seq_k: usize, d: usize, causal: bool) -> Self {
        Self { b, h, seq_q, seq_k, d, dv: d, causal, q_gain: 1.0 }
    }
}

/// The rows of `0..n` that are checked: all of them for short outputs, else a spread.
fn checked_rows(n: usize) -> Vec<usize> {
    if n <= 80 {
        return (0..n).collect();
    }
    let mut rows: Vec<usize> = (0..n).step_by(n / 37).collect();
    rows.extend([1, 63, 64, 65, n - 2, n - 1].into_iter().filter(|&r| r < n));
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// f64 attention of one query row of one (batch, head) slice.
fn reference_row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    c: &Case,
    bh: usize,
    i: usize,
    scale: f64,
) -> Vec<f64> {
    let qi = &q[(bh * c.seq_q + i) * c.d..][..c.d];
    let keys = if c.causal { (i + 1).min(c.seq_k) } else { c.seq_k };
    let scores: Vec<f64> = (0..keys)
        .map(|j| {
            let kj = &k[(bh * c.seq_k + j) * c.d..][..c.d];
            qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
        })
        .collect();
    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
    let sum: f64 = p.iter().sum();
    let mut out = vec![0f64; c.dv];
    for (j, pj) in p.iter().enumerate() {
        let vj = &v[(bh * c.seq_k + j) * c.dv..][..c.dv];
        for (o, &x) in out.iter_mut().zip(vj) {
            *o += pj / sum * x as f64;
        }
    }
    out
}

/// Runs [`attention`] on the case's inputs (in `dtype`) and returns the relative error against
/// f64.
fn relative_error(c: &Case, dtype: DType) -> f64 {
    let dev = Device::Cpu;
    let (bh, seed) = (c.b * c.h, (c.seq_q * 1_000_003 + c.seq_k * 7919 + c.d) as u64);
    let q: Vec<f32> = values(bh * c.seq_q * c.d, seed).iter().map(|x| x * c.q_gain).collect();
    let k = values(bh * c.seq_k * c.d, seed + 1);
    let v = values(bh * c.seq_k * c.dv, seed + 2);
    let tensor = |data: &[f32], seq: usize, d: usize| -> Tensor {
        Tensor::from_slice(data, (c.b, c.h, seq, d), &dev).unwrap().to_dtype(dtype).unwrap()
    };
    let (qt, kt, vt) =
        (tensor(&q, c.seq_q, c.d), tensor(&k, c.seq_k, c.d), tensor(&v, c.seq_k, c.dv));
    // The reference sees the values the kernel sees (rounded to f16 for f16 runs).
    let back = |t: &Tensor| {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (q, k, v) = (back(&qt), back(&kt), back(&vt));

    let opts = AttentionOptions { causal: c.causal, ..AttentionOptions::new(c.d) };
    let out = attention(&qt, &kt, &vt, opts).unwrap();
    assert_eq!(out.dims(), &[c.b, c.h, c.seq_q, c.dv]);
    assert_eq!(out.dtype(), dtype);
    let out = back(&out);

    let (mut max_err, mut max_ref) = (0f64, 0f64);
    for bh in 0..bh {
        for i in checked_rows(c.seq_q) {
            let want = reference_row(&q, &k, &v, c, bh, i, opts.scale);
            let got = &out[(bh * c.seq_q + i) * c.dv..][..c.dv];
            for (&g, w) in got.iter().zip(want) {
                assert!(g.is_finite(), "non-finite output");
                max_err = max_err.max((g as f64 - w).abs());
                max_ref = max_ref.max(w.abs());
            }
        }
    }
    max_err / max_ref
}

const SHAPES: [(usize, usize); 8] =
    [(77, 77), (1, 1), (1, 77), (33, 77), (33, 1), (1, 1025), (1000, 1025), (1000, 77)];

fn check_head_dim(d: usize, b: usize, h: usize) {
    let mut worst = 0f64;
    for (seq_q, seq_k) in SHAPES {
        for causal in [false, true] {
            // Debug builds are slow: the largest shapes run on two (batch, head) slices only.
            let (b, h) = if seq_q * seq_k > 100_000 { (1, 2) } else { (b, h) };
            let c = Case::new(b, h, seq_q, seq_k, d, causal);
            let err = relative_error(&c, DType::F32);
            assert!(
                err < 1e-5,
                "d {d} seq_q {seq_q} seq_k {seq_k} causal {causal}: relative error {err:.2e}"
            );
            worst = worst.max(err);
        }
    }
    eprintln!("head dim {d}: worst relative error {worst:.2e}");
}

#[test]
fn head_dim_40() {
    check_head_dim(40, 2, 3);
}

#[test]
fn head_dim_64() {
    check_head_dim(64, 2, 3);
}

#[test]
fn head_dim_80() {
    check_head_dim(80, 2, 3);
}

#[test]
fn head_dim_128() {
    check_head_dim(128, 2, 3);
}

#[test]
fn head_dim_160() {
    check_head_dim(160, 2, 3);
}

/// The VAE mid-block: one 512-wide head (two batch entries to cover batch*heads > 1).
#[test]
fn vae_head_dim_512() {
    check_head_dim(512, 2, 1);
}

/// CLIP's text encoder: causal self attention over 77 tokens, 16 heads of 64 (SD 2.x).
#[test]
fn clip_causal() {
    let c = Case::new(2, 16, 77, 77, 64, true);
    let err = relative_error(&c, DType::F32);
    assert!(err < 1e-5, "relative error {err:.2e}");
}

/// Large scores: the running maximum changes from block to block many times.
#[test]
fn peaky_softmax() {
    for causal in [false, true] {
        let c = Case { q_gain: 8.0, ..Case::new(1, 2, 300, 1025, 64, causal) };
        let err = relative_error(&c, DType::F32);
        assert!(err < 1e-5, "causal {causal}: relative error {err:.2e}");
    }
}

/// Values may have another width than queries and keys.
#[test]
fn value_dim_differs() {
    let c = Case { dv: 24, ..Case::new(1, 2, 70, 300, 40, false) };
    let err = relative_error(&c, DType::F32);
    assert!(err < 1e-5, "relative error {err:.2e}");
}

/// f16 in, f16 out, computed in f32: the error is the output's f16 rounding.
#[test]
fn f16_inputs() {
    for causal in [false, true] {
        let c = Case::new(1, 2, 333, 300, 64, causal);
        let err = relative_error(&c, DType::F16);
        assert!(err < 1e-3, "causal {causal}: relative error {err:.2e}");
        let err = relative_error(&c, DType::BF16);
        assert!(err < 8e-3, "bf16 causal {causal}: relative error {err:.2e}");
    }
}

/// Strided views (heads split by a transpose, as the models produce them) are accepted.
#[test]
fn non_contiguous_inputs() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::from_vec(values(2 * 100 * 4 * 40, 5), (2, 100, 4, 40), &dev)?;
    let y = Tensor::from_vec(values(2 * 77 * 4 * 40, 6), (2, 77, 4, 40), &dev)?;
    let (q, k) = (x.transpose(1, 2)?, y.transpose(1, 2)?);
    let v = (&k * 0.5)?;
    assert!(!q.is_contiguous());
    let opts = AttentionOptions::new(40);
    let a = attention(&q, &k, &v, opts)?;
    let r = reference_attention(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, opts)?;
    let diff = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "max diff {diff}");
    Ok(())
}

/// `attention` on the CPU is the fused kernel (same bits).
#[test]
fn cpu_dispatch_is_fused() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::from_vec(values(2 * 5 * 129 * 64, 7), (2, 5, 129, 64), &dev)?;
    let opts = AttentionOptions { causal: true, ..AttentionOptions::new(64) };
    let a = attention(&q, &q, &q, opts)?.flatten_all()?.to_vec1::<f32>()?;
    let f = fused_attention(&q, &q, &q, opts.scale, true)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, f);
    Ok(())
}

/// Degenerate sizes: no keys gives zeros (candle's softmax, and so the reference path, panics
/// on an empty last dimension), no queries an empty output.
#[test]
fn empty_sequences() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::ones((1, 2, 5, 8), DType::F32, &dev)?;
    let k = Tensor::zeros((1, 2, 0, 8), DType::F32, &dev)?;
    for causal in [false, true] {
        let opts = AttentionOptions { causal, ..AttentionOptions::new(8) };
        let a = attention(&q, &k, &k, opts)?;
        assert_eq!(a.dims(), &[1, 2, 5, 8]);
        assert!(a.flatten_all()?.to_vec1::<f32>()?.iter().all(|&x| x == 0.0));
        let none = q.narrow(2, 0, 0)?;
        assert_eq!(attention(&none, &q, &q, opts)?.dims(), &[1, 2, 0, 8]);
    }
    Ok(())
}

#[test]
fn bad_shapes_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 2, 10, 8), DType::F32, &dev)?;
    let k = Tensor::zeros((1, 2, 12, 16), DType::F32, &dev)?;
    assert!(attention(&q, &k, &k, AttentionOptions::new(8)).is_err());
    let v = Tensor::zeros((1, 2, 11, 8), DType::F32, &dev)?;
    assert!(attention(&q, &q, &v, AttentionOptions::new(8)).is_err());
    Ok(())
}
