//! The low-level CPU layer that the layers (`nn`) and the attention build on, depending on
//! neither: SIMD kernels compiled per instruction set (`simd`), the f32 GEMM backends
//! ([`blas`]: Intel MKL or the `gemm` crate), the packed bf16 GEMM ([`packed`]: AMX tiles or
//! AVX512_BF16), f32 to bf16 conversion ([`bf16`]), strided copies on every thread
//! ([`contiguous`]) and per-thread scratch buffers.
//!
//! # bf16 on the CPU
//!
//! Models whose weights are bf16 on the CPU multiply bf16 operands with f32 accumulation
//! ([`multiplies_in_bf16`]), on the packed GEMM, or on MKL's bf16 GEMM when its kernels are
//! switched off ([`bf16_gemms_available`]). On a CPU with neither AMX nor AVX512_BF16, bf16
//! would be emulated and slower than f32, so a pipeline asked for bf16 runs f32 there
//! ([`run_dtype`]).

pub mod bf16;
pub mod blas;
mod copy;
pub mod packed;
mod scratch;
pub(crate) mod simd;

pub use copy::contiguous;
pub(crate) use scratch::{with_scratch, Pod};

use candle_core::{DType, Device, Tensor, WithDType};

use crate::{Error, Result};

/// Whether weights of `dtype` on `device` are multiplied in bf16 with f32 accumulation (and
/// the activations around them kept in f32): bf16 weights on the CPU.
pub fn multiplies_in_bf16(dtype: DType, device: &Device) -> bool {
    device.is_cpu() && dtype == DType::BF16
}

/// Whether bf16 matrix products can run here: on the packed GEMM or on MKL's bf16 GEMM.
pub fn bf16_gemms_available() -> bool {
    packed::available() || blas::mkl().is_ok()
}

/// The dtype a CPU pipeline asked for `dtype` runs in: `dtype`, except bf16 on a CPU without
/// bf16 dot products in hardware (neither AMX nor AVX512_BF16), which runs f32: emulated bf16
/// would be slower than f32 there. `Err` when it cannot run: `SD_CPU_GEMM` names no backend or
/// asks for MKL that could not be loaded, or bf16 with the packed kernels switched off and no MKL.
pub fn run_dtype(dtype: DType) -> Result<DType> {
    blas::check_requested_backend().map_err(Error::invalid)?;
    choose_run_dtype(dtype, !packed::Kernel::supported().is_empty(), bf16_gemms_available())
}

fn choose_run_dtype(dtype: DType, bf16_in_hardware: bool, bf16_gemms: bool) -> Result<DType> {
    match dtype {
        DType::BF16 if !bf16_in_hardware => Ok(DType::F32),
        DType::BF16 if !bf16_gemms => {
            let reason = blas::mkl().err().unwrap_or("unknown");
            Err(Error::invalid(format!(
                "bf16 on the CPU runs its matrix products on AMX tiles or AVX512_BF16, which \
                 SD_CPU_AMX=0 and SD_CPU_AVX512BF16=0 turned off, or on Intel MKL's bf16 GEMM, \
                 which could not be loaded ({reason}); install it with `pip install --user mkl`, \
                 unset those variables, or use f32"
            )))
        }
        _ => Ok(dtype),
    }
}

/// What runs the CPU work of a model in `dtype`, in a few lines: the CPU and threads, the f32
/// GEMM and why, the 3x3 convolutions' algorithm, and for bf16 its kernel and where its packed
/// weights come from. For
/// `sd-cli --verbose` and benchmark records.
pub fn describe(dtype: DType) -> String {
    let mut lines = vec![format!(
        "cpu: {}, {} threads, {}",
        simd::cpu_name(),
        rayon::current_num_threads(),
        simd::Isa::best().describe()
    )];
    let gemm = blas::cpu_gemm();
    lines.push(format!("f32 GEMM: {} ({})", gemm.describe(), blas::cpu_gemm_reason()));
    if dtype == DType::F32 {
        lines.push(crate::nn::winograd::describe(dtype));
    }
    if dtype == DType::BF16 {
        lines.push(match (packed::kernel(), blas::mkl()) {
            (Some(kernel), _) => format!("bf16 GEMM: {}, weights packed at load", kernel.name()),
            (None, Ok(mkl)) => format!("bf16 GEMM: mkl {} (packed kernels off)", mkl.version),
            (None, Err(_)) => "bf16 GEMM: none".to_string(),
        });
        // Winograd needs the packed kernels; MKL's bf16 GEMM runs every convolution by im2col.
        if packed::available() {
            lines.push(crate::nn::winograd::describe(dtype));
            let from_env = std::env::var_os("SD_WEIGHT_CACHE").is_some();
            lines.push(match crate::loading::weight_cache_dir() {
                Some(dir) if crate::loading::maps_weights() => format!(
                    "packed bf16 weights: cached in {} ({})",
                    dir.display(),
                    if from_env { "SD_WEIGHT_CACHE" } else { "default; SD_WEIGHT_CACHE=off: none" }
                ),
                Some(_) => "packed bf16 weights: packed at every load (SD_WEIGHT_CACHE \
                    needs the mapped weights, and SD_MAP_WEIGHTS=0 is set)"
                    .to_string(),
                None if from_env => {
                    "packed bf16 weights: packed at every load (SD_WEIGHT_CACHE is off)".to_string()
                }
                None => "packed bf16 weights: packed at every load (SD_WEIGHT_CACHE=DIR \
                    keeps them on disk)"
                    .to_string(),
            });
        }
    }
    lines.join("\n")
}

/// Runs `f` on the contiguous CPU data of `t`.
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

/// Inputs for the kernel tests.
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

    /// Ok where `a` and `b` have the same shape and the same f32 values, bit for bit; else an
    /// error naming the first difference.
    pub fn same_bits(
        a: &candle_core::Tensor,
        b: &candle_core::Tensor,
        what: &str,
    ) -> candle_core::Result<()> {
        assert_eq!(a.dims(), b.dims(), "{what}");
        let (a, b) = (a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        match a.iter().zip(&b).position(|(x, y)| x.to_bits() != y.to_bits()) {
            None => Ok(()),
            Some(i) => candle_core::bail!("{what}: element {i} is {} against {}", a[i], b[i]),
        }
    }

    /// Whether bf16 weights can be multiplied here (packed kernels or MKL); tests that need it
    /// say so.
    pub fn bf16_gemms() -> bool {
        let ok = super::bf16_gemms_available();
        if !ok {
            eprintln!("skipped: bf16 GEMMs need AMX, AVX512_BF16 or MKL");
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 runs as f32 without bf16 hardware, is refused with its kernels switched off and no
    /// MKL, and runs otherwise; other dtypes pass through.
    #[test]
    fn bf16_runs_where_hardware_multiplies_it() {
        let bf16 = DType::BF16;
        assert_eq!(choose_run_dtype(bf16, false, true).unwrap(), DType::F32);
        assert_eq!(choose_run_dtype(bf16, false, false).unwrap(), DType::F32);
        assert_eq!(choose_run_dtype(bf16, true, true).unwrap(), bf16);
        let err = choose_run_dtype(bf16, true, false).unwrap_err().to_string();
        assert!(err.contains("SD_CPU_AVX512BF16=0") && err.contains("pip install"), "{err}");
        for dtype in [DType::F32, DType::F16] {
            assert_eq!(choose_run_dtype(dtype, false, false).unwrap(), dtype);
        }
    }
}
