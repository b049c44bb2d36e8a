//! float32 arrays between Rust and Python: little-endian bytes plus a shape (numpy's
//! `frombuffer(data, "<f4").reshape(shape)` on the Python side), so no numpy C API is needed.

use candle_core::{DType, Device, Tensor};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::error::to_pyerr;

/// A float32 array handed to Python: `data` (little-endian float32 bytes) of shape `shape`.
#[pyclass(frozen, get_all, module = "sd_py._sd_py")]
pub struct Float32Array {
    pub data: Py<PyBytes>,
    pub shape: Vec<usize>,
}

impl Float32Array {
    pub fn new(py: Python<'_>, values: &[f32], shape: Vec<usize>) -> Self {
        Self { data: PyBytes::new(py, &f32_bytes(values)).unbind(), shape }
    }

    /// The values and shape of a tensor, as float32.
    pub fn of_tensor(py: Python<'_>, tensor: &Tensor) -> PyResult<Self> {
        let values = tensor
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| to_pyerr(e.into()))?;
        Ok(Self::new(py, &values, tensor.dims().to_vec()))
    }
}

#[pymethods]
impl Float32Array {
    fn __repr__(&self) -> String {
        format!("Float32Array(shape={:?})", self.shape)
    }
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The inverse of [`f32_bytes`] (a trailing partial value is dropped; callers check the length).
pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// A CPU tensor of `shape` from little-endian float32 bytes.
pub fn tensor_from_f32_bytes(bytes: &[u8], shape: &[usize]) -> PyResult<Tensor> {
    let count: usize = shape.iter().product();
    if bytes.len() != count * 4 {
        return Err(PyValueError::new_err(format!(
            "{} bytes are not float32 values of shape {shape:?}",
            bytes.len()
        )));
    }
    Tensor::from_vec(f32_values(bytes), shape, &Device::Cpu).map_err(|e| to_pyerr(e.into()))
}

/// diffusers' `postprocess(output_type="np")`: `[b, 3, h, w]` in [-1, 1] to `[b, h, w, 3]` in
/// [0, 1], computed in float32 (`(x / 2 + 0.5).clamp(0, 1)`).
pub fn to_unit_hwc(decoded: &Tensor) -> sd_core::Result<(Vec<f32>, Vec<usize>)> {
    let (b, c, h, w) = decoded.dims4()?;
    let hwc = decoded.to_dtype(DType::F32)?.permute((0, 2, 3, 1))?.contiguous()?;
    let data = hwc
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    Ok((data, vec![b, h, w, c]))
}
