//! Devices and dtypes: the names users type.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// Parses the dtype names users type: f32/float32, f16/float16/fp16/half, bf16/bfloat16.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_ascii_lowercase().trim_start_matches("torch.") {
        "f32" | "float32" | "fp32" | "float" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => {
            Err(Error::invalid(format!("unknown dtype `{other}` (expected f32, f16 or bf16)")))
        }
    }
}

/// Parses `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| Error::invalid(format!("bad device `{name}`")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::invalid(format!("device `{name}` requested but this build has no CUDA support (build with `--features cuda`)")));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => {
            Err(Error::invalid(format!("unknown device `{other}` (expected cpu, cuda or cuda:N)")))
        }
    }
}
