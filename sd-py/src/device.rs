//! Device and dtype names as Python passes and reads them.

use candle_core::{DType, Device, DeviceLocation};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use sd_core::pipeline::{parse_device, parse_dtype};

use crate::error::attached;

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "other",
    }
}

pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("mps:{gpu_id}"),
    }
}

/// `cpu`, `cuda`, `cuda:N`. Asking for CUDA from a build without it, or where the CUDA build finds
/// no device or driver, is a `RuntimeError` (the argument is fine, the machine is not); an unknown
/// name is a `ValueError`.
pub fn device_from_name(name: &str) -> PyResult<Device> {
    let name = name.trim();
    let is_cuda = name == "cuda" || name.starts_with("cuda:");
    if is_cuda && !candle_core::utils::cuda_is_available() {
        return Err(PyRuntimeError::new_err(format!(
            "device `{name}` requested, but this build of sd_py has no CUDA support: \
             install a wheel built with `maturin build --features cuda` (see deploy/Dockerfile), or use \"cpu\""
        )));
    }
    match parse_device(name) {
        // Opening the device failed (cuInit or the context): CUDA_ERROR_NO_DEVICE, a stub or
        // missing driver, an ordinal past the last GPU.
        Err(sd_core::Error::Candle(e)) => Err(PyRuntimeError::new_err(format!(
            "device `{name}` requested, but no usable CUDA device or driver was found ({}); \
             check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or use \"cpu\"",
            without_backtrace(&e)
        ))),
        parsed => attached(|| parsed),
    }
}

/// The error without the backtrace candle attaches under `RUST_BACKTRACE=1` (dozens of lines of
/// frames in a one-line Python message).
fn without_backtrace(e: &candle_core::Error) -> &candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(inner),
        e => e,
    }
}

pub fn dtype_from_name(name: &str) -> PyResult<DType> {
    attached(|| parse_dtype(name.trim()))
}

/// Whether this build has CUDA support (says nothing about a GPU being present).
#[pyfunction]
pub fn cuda_is_available() -> bool {
    candle_core::utils::cuda_is_available()
}

/// Normalizes a dtype name ("fp16", "torch.float16", ...) to "float32", "float16" or "bfloat16";
/// `ValueError` for anything else.
#[pyfunction]
pub fn normalize_dtype(name: &str) -> PyResult<&'static str> {
    Ok(dtype_name(dtype_from_name(name)?))
}
