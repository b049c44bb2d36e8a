//! `bench`: the attention calls of SD 2.1, with sd-core's kernels against the reference path.

use std::time::Duration;

use candle_core::{DType, Device};
use sd_core::attention::cuda as fa;
use sd_core::attention::{attention, AttentionOptions};

use crate::device::time_it;
use crate::kernels::{make_input, Layout};
use crate::sd21::{sd21_unet_attention, AttnShape};
use crate::Summary;

/// Time of one call per shape with the kernels and with the reference path.
fn time_shape(dev: &Device, s: &AttnShape, dtype: DType) -> anyhow::Result<(Duration, Duration)> {
    let q =
        make_input([s.batch, s.heads, s.seq_q, s.head_dim], 1.0, dtype, Layout::Transposed, dev)?;
    let k =
        make_input([s.batch, s.heads, s.seq_k, s.head_dim], 1.0, dtype, Layout::Transposed, dev)?;
    let v =
        make_input([s.batch, s.heads, s.seq_k, s.head_dim], 1.0, dtype, Layout::Transposed, dev)?;
    let opts =
        AttentionOptions { causal: s.causal, upcast: true, ..AttentionOptions::new(s.head_dim) };
    let iters = if s.seq_q * s.seq_k >= 1 << 24 { 5 } else { 20 };
    fa::set_enabled(true);
    let flash = time_it(dev, iters, || {
        attention(&q, &k, &v, opts)?;
        Ok(())
    })?;
    fa::set_enabled(false);
    let reference = time_it(dev, iters.min(5), || {
        attention(&q, &k, &v, opts)?;
        Ok(())
    });
    fa::set_enabled(true);
    Ok((flash, reference?))
}

/// `bench`: the attention calls of an SD 2.1 UNet step at `size` px, the VAE's and CLIP's, timed
/// with the kernels and with the reference path.
pub fn bench_attention(
    dev: &Device,
    size: usize,
    dtype: DType,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    println!(
        "\n== attention at {size} px, {dtype:?}, batch 2 (classifier-free guidance): kernels vs \
         the reference path"
    );
    println!(
        "{:<15} {:>5} {:>6} {:>6} {:>4} {:>3} {:>5} {:>10} {:>8} {:>10} {:>8}",
        "call",
        "heads",
        "seq_q",
        "seq_k",
        "d",
        "c",
        "count",
        "flash ms",
        "TFLOP/s",
        "ref ms",
        "speedup"
    );
    let latent = size / 8;
    let mut shapes = sd21_unet_attention(size, 2);
    shapes.push(AttnShape {
        what: "vae mid",
        batch: 1,
        heads: 1,
        seq_q: latent * latent,
        seq_k: latent * latent,
        head_dim: 512,
        causal: false,
        count: 1,
    });
    shapes.push(AttnShape {
        what: "clip",
        batch: 2,
        heads: 16,
        seq_q: 77,
        seq_k: 77,
        head_dim: 64,
        causal: true,
        count: 23,
    });
    let (mut unet_flash, mut unet_ref) = (Duration::ZERO, Duration::ZERO);
    for s in &shapes {
        let (f, r) = time_shape(dev, s, dtype)?;
        let flops = 4.0 * (s.batch * s.heads * s.seq_q * s.seq_k * s.head_dim) as f64
            / if s.causal { 2.0 } else { 1.0 };
        println!(
            "{:<15} {:>5} {:>6} {:>6} {:>4} {:>3} {:>5} {:>10.3} {:>8.1} {:>10.3} {:>7.1}x",
            s.what,
            s.heads,
            s.seq_q,
            s.seq_k,
            s.head_dim,
            s.causal as u8,
            s.count,
            f.as_secs_f64() * 1e3,
            flops / f.as_secs_f64() / 1e12,
            r.as_secs_f64() * 1e3,
            r.as_secs_f64() / f.as_secs_f64()
        );
        if s.what.starts_with("unet") {
            unet_flash += f * s.count as u32;
            unet_ref += r * s.count as u32;
        }
    }
    let line = format!(
        "bench {dtype:?} {size} px: attention per UNet step (the calls above x count): kernels \
         {:.1} ms, reference {:.1} ms",
        unet_flash.as_secs_f64() * 1e3,
        unet_ref.as_secs_f64() * 1e3
    );
    println!("{line}");
    summary.add(true, line);
    Ok(())
}
