//! The low-level CPU layer that the layers (`nn`) and the attention build on, depending on
//! neither: SIMD kernels compiled per instruction set (`simd`), the GEMM backends ([`blas`]:
//! Intel MKL or the `gemm` crate; [`amx`]: bf16 on AMX tiles), f32 to bf16 conversion
//! ([`bf16`]) and per-thread scratch buffers.
//!
//! # bf16 on the CPU
//!
//! Models whose weights are bf16 on the CPU multiply bf16 operands with f32 accumulation
//! ([`multiplies_in_bf16`]); that needs AMX tiles or MKL's bf16 GEMM
//! ([`bf16_gemms_available`]), which [`check_dtype_supported`] checks before a model loads.

pub mod amx;
pub mod bf16;
pub mod blas;
mod scratch;
pub(crate) mod simd;

pub(crate) use scratch::{with_scratch, Pod};

use candle_core::{DType, Device, Tensor, WithDType};

use crate::{Error, Result};

/// Whether weights of `dtype` on `device` are multiplied in bf16 with f32 accumulation (and
/// the activations around them kept in f32): bf16 weights on the CPU.
pub fn multiplies_in_bf16(dtype: DType, device: &Device) -> bool {
    device.is_cpu() && dtype == DType::BF16
}

/// Whether bf16 matrix products can run here: on AMX tiles or on MKL's bf16 GEMM.
pub fn bf16_gemms_available() -> bool {
    amx::available() || blas::cpu_gemm().supports_bf16()
}

/// `Err` when models of `dtype` cannot run on the CPU: bf16 without AMX or MKL, or any dtype
/// when `SD_CPU_GEMM` names no backend or asks for MKL that could not be loaded.
pub fn check_dtype_supported(dtype: DType) -> Result<()> {
    blas::check_requested_backend().map_err(Error::invalid)?;
    if dtype == DType::BF16 && !bf16_gemms_available() {
        let reason = blas::mkl_unavailable_reason().unwrap_or("unknown");
        return Err(Error::invalid(format!(
            "bf16 on the CPU runs its matrix products on AMX tiles, which this CPU lacks (or SD_CPU_AMX=0 turned off), \
             or on Intel MKL's bf16 GEMM, which could not be loaded ({reason}); install it with `pip install --user mkl` or use f32"
        )));
    }
    Ok(())
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

    /// Whether bf16 weights can be multiplied here (MKL or AMX); tests that need it say so.
    pub fn bf16_gemms() -> bool {
        let ok = super::bf16_gemms_available();
        if !ok {
            eprintln!("skipped: bf16 GEMMs need MKL or AMX");
        }
        ok
    }
}
