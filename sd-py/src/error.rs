//! sd-core errors as Python exceptions, and the guard that keeps Rust panics from reaching Python
//! as pyo3's `PanicException` (a `BaseException` that `except Exception` misses).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{
    PyFileNotFoundError, PyFloatingPointError, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use sd_core::Error;

pyo3::create_exception!(
    sd_py,
    GenerationCancelled,
    PyRuntimeError,
    "A generation stopped before its last step because its native step callback asked to cancel (`pipe._interrupt` does not raise it: as in diffusers, it decodes the latents as they are)."
);

/// The Python exception for an sd-core error, carrying its message.
pub fn to_pyerr(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        Error::Io { .. } | Error::Config { .. } | Error::Weights { .. } | Error::Hub(_) => {
            PyOSError::new_err(msg)
        }
        Error::InvalidArgument(_)
        | Error::UnknownScheduler { .. }
        | Error::UnknownLoraKeys { .. } => PyValueError::new_err(msg),
        Error::Cancelled => GenerationCancelled::new_err(msg),
        // Python's exception for NaN or inf where a number was expected.
        Error::NonFinite { .. } => PyFloatingPointError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

/// For configs given as arguments (not read from a file): an invalid value is a `ValueError`.
pub fn config_arg_error(e: PyErr) -> PyErr {
    Python::attach(|py| {
        if e.is_instance_of::<PyOSError>(py) && !e.is_instance_of::<PyFileNotFoundError>(py) {
            PyValueError::new_err(e.value(py).to_string())
        } else {
            e
        }
    })
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// What a guarded call gives back: its result, or the message of the panic that stopped it.
pub type Guarded<T> = std::result::Result<sd_core::Result<T>, String>;

/// Runs `f`, turning a panic into its message (so it can cross `Python::detach`).
pub fn guard<T>(f: impl FnOnce() -> sd_core::Result<T>) -> Guarded<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

pub fn unguard<T>(r: Guarded<T>) -> PyResult<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_pyerr(e)),
        Err(msg) => {
            Err(PyRuntimeError::new_err(format!("internal error in sd-core (Rust panic): {msg}")))
        }
    }
}

/// Runs `f` with the GIL released, panics caught.
pub fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> sd_core::Result<T> + Send,
) -> PyResult<T> {
    unguard(py.detach(move || guard(f)))
}

/// Runs `f` with the GIL held, panics caught.
pub fn attached<T>(f: impl FnOnce() -> sd_core::Result<T>) -> PyResult<T> {
    unguard(guard(f))
}

/// For tests: a Rust panic inside a guarded call must come out as `RuntimeError`.
#[pyfunction]
pub fn _panic_for_tests(py: Python<'_>, message: String) -> PyResult<()> {
    detached(py, move || -> sd_core::Result<()> { panic!("{message}") })
}
