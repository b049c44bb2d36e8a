//! `sd_py._sd_py`: the native half of the `sd_py` Python package.
//!
//! This module is deliberately thin: it loads sd-core pipelines, runs them with the GIL released
//! and hands raw buffers back. The diffusers-shaped API (argument handling, `torch.Generator`
//! seeds, PIL/numpy outputs, scheduler classes) lives in the Python package beside it
//! (`py_src/sd_py`). As in huggingface/tokenizers' bindings, this file only wires the module:
//! `error` (sd-core errors as Python exceptions, the panic guard), `pipeline` (`_Pipeline`, its
//! run result and its stepped runs), `run_args` (a run's arguments), `schedulers`, `hub` (single model files), `arrays` (float32 buffers) and
//! `device` (device and dtype names).

use pyo3::prelude::*;

mod arrays;
mod device;
mod error;
mod hub;
mod pipeline;
mod run_args;
mod schedulers;

/// Native half of `sd_py`: sd-core pipelines and schedulers.
#[pymodule]
fn _sd_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<pipeline::PyPipeline>()?;
    m.add_class::<pipeline::ActiveRun>()?;
    m.add_class::<pipeline::GenerateResult>()?;
    m.add_class::<pipeline::RgbImage>()?;
    m.add_class::<pipeline::StageTimings>()?;
    m.add_class::<arrays::Float32Array>()?;
    m.add("GenerationCancelled", m.py().get_type::<error::GenerationCancelled>())?;
    m.add_function(wrap_pyfunction!(schedulers::scheduler_classes, m)?)?;
    m.add_function(wrap_pyfunction!(schedulers::scheduler_names, m)?)?;
    m.add_function(wrap_pyfunction!(schedulers::scheduler_entry, m)?)?;
    m.add_function(wrap_pyfunction!(schedulers::resolve_scheduler_config, m)?)?;
    m.add_function(wrap_pyfunction!(schedulers::scheduler_schedule, m)?)?;
    m.add_function(wrap_pyfunction!(hub::read_model_file, m)?)?;
    m.add_function(wrap_pyfunction!(hub::model_file_path, m)?)?;
    m.add_function(wrap_pyfunction!(device::cuda_is_available, m)?)?;
    m.add_function(wrap_pyfunction!(device::normalize_dtype, m)?)?;
    m.add_function(wrap_pyfunction!(error::_panic_for_tests, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
