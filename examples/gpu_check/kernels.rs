//! `compile` and `kernels`: sd-core's flash-attention kernels, NVRTC-compiled, against an f32
//! reference computed on the CPU from the same inputs.

use candle_core::{DType, Device, Tensor};
use sd_core::attention::cuda::{self as fa, HalfType, KERNELS};
use sd_core::attention::{attention, reference_attention, AttentionOptions};

use crate::Summary;

/// `compile`: NVRTC-compiles the kernels for each of `archs` through sd-core's own compile path
/// (needs libnvrtc, no GPU).
pub fn compile_kernels(archs: &[String]) -> anyhow::Result<()> {
    for arch in archs {
        for ty in [HalfType::F16, HalfType::Bf16] {
            let (cubin, report) = fa::compile_cubin(arch, ty)?;
            println!(
                "NVRTC {arch} {}: {} bytes of cubin in {:.2} s{}",
                ty.name(),
                cubin.len(),
                report.compile_time.as_secs_f64(),
                if report.log.is_empty() { String::new() } else { format!("\n{}", report.log) }
            );
        }
    }
    Ok(())
}

/// Max |a - b| / max(1, max |b|), in f32 on the CPU; NaN when `a` has a NaN or infinity.
fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if a.iter().any(|x| !x.is_finite()) {
        return Ok(f32::NAN);
    }
    let max_err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let max_ref = b.iter().map(|y| y.abs()).fold(1f32, f32::max);
    Ok(max_err / max_ref)
}

/// How an input tensor is laid out in memory.
#[derive(Clone, Copy)]
pub enum Layout {
    Contiguous,
    /// `[b, seq, h, d]` transposed to `[b, h, seq, d]`, as the models make them.
    Transposed,
    /// A narrow at an offset that is not a multiple of 8 elements (copied by the launcher).
    Offset,
}

/// A random `[b, h, s, d]` input of standard deviation `std` on `dev`, laid out as `layout` says.
pub fn make_input(
    [b, h, s, d]: [usize; 4],
    std: f64,
    dtype: DType,
    layout: Layout,
    dev: &Device,
) -> anyhow::Result<Tensor> {
    // Convert first: to_dtype makes a fresh contiguous tensor.
    let random = |shape: &[usize]| Tensor::randn(0f32, std as f32, shape, dev)?.to_dtype(dtype);
    Ok(match layout {
        Layout::Contiguous => random(&[b, h, s, d])?,
        Layout::Transposed => random(&[b, s, h, d])?.transpose(1, 2)?,
        Layout::Offset => {
            random(&[b * h * s * d + 3])?.narrow(0, 3, b * h * s * d)?.reshape((b, h, s, d))?
        }
    })
}

/// `kernels`: NVRTC for the device, then every kernel against an f32 reference on the CPU; a
/// summary line per element type.
pub fn check_kernels(dev: &Device, summary: &mut Summary) -> anyhow::Result<()> {
    println!("\n== flash-attention kernels vs an f32 reference on the CPU");
    let Device::Cuda(cuda) = dev else { unreachable!() };
    for ty in [HalfType::F16, HalfType::Bf16] {
        let report = fa::prepare(cuda, ty)?;
        println!(
            "NVRTC {} {}: compiled in {:.2} s, cubin {} KiB{}",
            report.arch,
            ty.name(),
            report.compile_time.as_secs_f64(),
            report.cubin_bytes / 1024,
            if report.log.is_empty() { String::new() } else { format!("\n{}", report.log) }
        );
        summary.add(
            true,
            format!(
                "NVRTC {} {}: compiled in {:.2} s, {} KiB of cubin",
                report.arch,
                ty.name(),
                report.compile_time.as_secs_f64(),
                report.cubin_bytes / 1024
            ),
        );
    }
    // (b, h, seq_q, seq_k, d, causal, std, layout)
    let mut cases = vec![
        (1, 16, 77, 77, 64, true, 1.0, Layout::Transposed), // CLIP text encoder
        (2, 5, 1024, 77, 64, false, 1.0, Layout::Transposed), // UNet cross attention
        (2, 5, 1024, 1024, 64, false, 1.0, Layout::Contiguous),
        (1, 3, 333, 129, 40, false, 1.0, Layout::Transposed),
        (2, 8, 1024, 77, 40, false, 1.0, Layout::Contiguous),
        (1, 2, 257, 300, 80, false, 1.0, Layout::Offset),
        (1, 2, 200, 200, 128, true, 1.0, Layout::Contiguous),
        (1, 2, 150, 190, 160, false, 1.0, Layout::Transposed),
        (1, 1, 1024, 1024, 512, false, 1.0, Layout::Contiguous), // VAE mid-block (32x32 latents)
        (1, 1, 300, 300, 512, true, 1.0, Layout::Offset),
        (1, 2, 100, 1, 64, false, 1.0, Layout::Contiguous),
        (1, 1, 1, 100, 64, true, 1.0, Layout::Contiguous),
        // Large scores (|q.k| ~ 1e5): half-precision scores would overflow.
        (2, 5, 512, 512, 64, false, 20.0, Layout::Contiguous),
    ];
    for spec in KERNELS {
        if !cases.iter().any(|c| c.4 == spec.head_dim) {
            cases.push((1, 2, 100, 100, spec.head_dim, false, 1.0, Layout::Contiguous));
        }
    }
    for dtype in [DType::F16, DType::BF16] {
        let tol = if dtype == DType::F16 { 4e-3 } else { 3e-2 };
        let (mut passed, mut worst) = (0, 0f32);
        for &(b, h, sq, sk, d, causal, std, layout) in &cases {
            let q = make_input([b, h, sq, d], std, dtype, layout, dev)?;
            let k = make_input([b, h, sk, d], std, dtype, layout, dev)?;
            let v = make_input([b, h, sk, d], 1.0, dtype, layout, dev)?;
            let opts = AttentionOptions { causal, upcast: true, ..AttentionOptions::new(d) };
            let out = fa::flash_attention(&q, &k, &v, opts)?;
            let cpu = |t: &Tensor| -> anyhow::Result<Tensor> {
                Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
            };
            let reference = reference_attention(&cpu(&q)?, &cpu(&k)?, &cpu(&v)?, opts)?;
            let err = rel_err(&out, &reference)?;
            let pass = err <= tol; // false for NaN
            passed += pass as usize;
            worst = if err > worst || err.is_nan() { err } else { worst }; // keeps a NaN
            println!(
                "{} {:?} b={b} h={h:<2} seq_q={sq:<5} seq_k={sk:<5} d={d:<3} causal={} \
                 std={std:<3} layout={:<10} err {err:.2e} (tol {tol:.0e})",
                if pass { "ok  " } else { "FAIL" },
                dtype,
                causal as u8,
                match layout {
                    Layout::Contiguous => "contiguous",
                    Layout::Transposed => "transposed",
                    Layout::Offset => "offset",
                }
            );
        }
        summary.add(
            passed == cases.len(),
            format!(
                "kernels {dtype:?}: {passed}/{} cases within {tol:.0e} of the f32 CPU reference \
                 (worst {worst:.2e})",
                cases.len()
            ),
        );
    }
    // The dispatch: attention() on CUDA f16 takes the kernel (same numbers as calling it).
    let q = make_input([2, 5, 256, 64], 1.0, DType::F16, Layout::Transposed, dev)?;
    let opts = AttentionOptions { upcast: true, ..AttentionOptions::new(64) };
    let via_dispatch = attention(&q, &q, &q, opts)?;
    let direct = fa::flash_attention(&q, &q, &q, opts)?;
    let same = rel_err(&via_dispatch, &direct)? == 0.0;
    summary.add(same, "attention() dispatches f16 CUDA tensors to the kernels".to_string());
    Ok(())
}
