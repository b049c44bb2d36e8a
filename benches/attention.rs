//! Attention on the CPU at SD 2.1's shapes: the fused kernel (`sd_core::attention::cpu`, what
//! `attention()` runs on the CPU) against the reference path (`reference_attention`: candle
//! matmul, softmax, matmul over the whole score matrix).
//!
//! candle-nn 0.11.1's fused `candle_nn::ops::sdpa` has no CPU implementation (its `cpu_fwd`
//! bails with "SDPA has no cpu impl"; it is Metal-only), so the naive candle
//! matmul-softmax-matmul, i.e. `reference_attention`, is the candle baseline.
//!
//! Where the reference's score matrices for all heads would not fit comfortably in memory
//! (UNet self attention at 768 px: 2 x 5 x 9216^2 f32 = 3.4 GB per copy, and the reference
//! holds two copies at once, 6.8 GB, on a 24 GB box shared with builds), it runs one (batch, head) slice at a time
//! (`reference/per-head`), which is what `attention()` did before the fused kernel.
//!
//! Before timing, each implementation runs once with the process' peak RSS reset
//! (`/proc/self/clear_refs`, Linux), and the growth of `VmHWM` over the RSS before the call is
//! printed: that is the call's peak memory, output included, measured, not computed. glibc
//! serves allocations below its (adaptive) mmap threshold from heap memory that may already be
//! resident, which then does not show; for exact numbers run with
//! `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536`. With `--list` only these probes run.
//!
//! `cargo bench -p sd-core --bench attention [-- FILTER]`, e.g. `-- self_768`.

use std::time::Duration;

use candle_core::{Device, Result, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use sd_core::attention::{cpu::fused_attention, reference_attention, AttentionOptions};

struct Shape {
    name: &'static str,
    b: usize,
    h: usize,
    seq_q: usize,
    seq_k: usize,
    d: usize,
    causal: bool,
    /// Run the reference one (batch, head) slice at a time.
    per_head_reference: bool,
}

const fn shape(
    name: &'static str,
    b: usize,
    h: usize,
    seq_q: usize,
    seq_k: usize,
    d: usize,
) -> Shape {
    Shape { name, b, h, seq_q, seq_k, d, causal: false, per_head_reference: false }
}

const SHAPES: [Shape; 8] = [
    // UNet level 1 with CFG: batch 2, 5 heads of 64 (320 channels); 64^2 / 96^2 latent tokens.
    shape("unet_self_512", 2, 5, 4096, 4096, 64),
    Shape { per_head_reference: true, ..shape("unet_self_768", 2, 5, 9216, 9216, 64) },
    // Cross attention on the 77 text tokens.
    shape("unet_cross_512", 2, 5, 4096, 77, 64),
    shape("unet_cross_768", 2, 5, 9216, 77, 64),
    // VAE mid-block: one head of 512 channels over the 64^2 / 96^2 latent.
    shape("vae_mid_512", 1, 1, 4096, 4096, 512),
    shape("vae_mid_768", 1, 1, 9216, 9216, 512),
    // CLIP ViT-H text encoder: causal, 16 heads of 64, 77 tokens (one prompt; CFG: two).
    Shape { causal: true, ..shape("clip_causal_b1", 1, 16, 77, 77, 64) },
    Shape { causal: true, ..shape("clip_causal_b2", 2, 16, 77, 77, 64) },
];

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak memory of one call above the RSS before it, in bytes (None off Linux).
fn peak_bytes(f: impl FnOnce() -> Result<Tensor>) -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    let before = status_kb("VmRSS:")?;
    let out = f().unwrap();
    let peak = status_kb("VmHWM:")?;
    drop(out);
    Some(peak.saturating_sub(before) * 1024)
}

fn per_head_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: AttentionOptions,
) -> Result<Tensor> {
    let (b, h, seq_q, d) = q.dims4()?;
    let seq_k = k.dim(2)?;
    let (q, k, v) = (
        q.reshape((b * h, 1, seq_q, d))?,
        k.reshape((b * h, 1, seq_k, d))?,
        v.reshape((b * h, 1, seq_k, d))?,
    );
    let outs = (0..b * h)
        .map(|i| {
            reference_attention(&q.narrow(0, i, 1)?, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?, opts)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, 0)?.reshape((b, h, seq_q, d))
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    for s in &SHAPES {
        let ref_name = if s.per_head_reference { "reference/per-head" } else { "reference" };
        // Criterion filters by substring of the benchmark id; skip the setup and the memory
        // probes of what it would not run.
        let wanted = |id: &str| filter.is_empty() || filter.iter().any(|f| id.contains(f.as_str()));
        let (fused_id, ref_id) = (format!("{}/fused", s.name), format!("{}/{}", s.name, ref_name));
        if !wanted(&fused_id) && !wanted(&ref_id) {
            continue;
        }
        let q = Tensor::randn(0f32, 1., (s.b, s.h, s.seq_q, s.d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (s.b, s.h, s.seq_k, s.d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (s.b, s.h, s.seq_k, s.d), &dev).unwrap();
        let opts = AttentionOptions { causal: s.causal, ..AttentionOptions::new(s.d) };
        let fused = || fused_attention(&q, &k, &v, opts.scale, opts.causal);
        let reference = || {
            if s.per_head_reference {
                per_head_reference(&q, &k, &v, opts)
            } else {
                reference_attention(&q, &k, &v, opts)
            }
        };

        let mb =
            |b: Option<u64>| b.map_or("n/a".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6));
        let output = (s.b * s.h * s.seq_q * s.d * 4) as f64 / 1e6;
        let probe = |id: &str, f: &dyn Fn() -> Result<Tensor>| {
            if wanted(id) {
                mb(peak_bytes(f))
            } else {
                "-".into()
            }
        };
        eprintln!(
            "{}: peak memory above baseline: fused {}, {} {} (output alone {:.1} MB, one f32 score matrix {:.1} MB)",
            s.name,
            probe(&fused_id, &fused),
            ref_name,
            probe(&ref_id, &reference),
            output,
            (s.b * s.h * s.seq_q * s.seq_k * 4) as f64 / 1e6,
        );

        let mut g = c.benchmark_group(s.name);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        g.sampling_mode(SamplingMode::Flat);
        g.bench_function(BenchmarkId::from_parameter("fused"), |bench| {
            bench.iter(|| fused().unwrap())
        });
        g.bench_function(BenchmarkId::from_parameter(ref_name), |bench| {
            bench.iter(|| reference().unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
