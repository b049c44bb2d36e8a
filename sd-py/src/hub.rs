//! Hub options from Python's `from_pretrained` arguments, and single model files over
//! `sd_core::hub`.

use std::path::PathBuf;

use pyo3::prelude::*;
use sd_core::hub::{resolve_model_file, HubOptions};
use sd_core::Error;

use crate::error::detached;

/// The environment's hub options (`HF_HOME`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_TOKEN`, ...)
/// with diffusers' `from_pretrained` arguments on top.
pub fn hub_options(
    revision: Option<String>,
    local_files_only: bool,
    cache_dir: Option<PathBuf>,
    token: Option<String>,
) -> HubOptions {
    let mut hub = HubOptions::from_env();
    hub.revision = revision.filter(|r| !r.is_empty());
    hub.offline |= local_files_only;
    if let Some(dir) = cache_dir {
        hub.cache_dir = dir;
    }
    if token.is_some() {
        hub.token = token;
    }
    hub
}

/// The text of one file of a model (a local folder or a hub id; from a hub only that file is
/// downloaded) and its local path.
#[pyfunction]
#[pyo3(signature = (model, file, revision=None, local_files_only=false, cache_dir=None, token=None))]
pub fn read_model_file(
    py: Python<'_>,
    model: PathBuf,
    file: String,
    revision: Option<String>,
    local_files_only: bool,
    cache_dir: Option<PathBuf>,
    token: Option<String>,
) -> PyResult<(String, PathBuf)> {
    let hub = hub_options(revision, local_files_only, cache_dir, token);
    let model = model.to_string_lossy().into_owned();
    detached(py, move || {
        let path = resolve_model_file(&model, &file, &hub)?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound { path: path.clone() }
            } else {
                Error::Io { path: path.clone(), source: e }
            }
        })?;
        Ok((text, path))
    })
}

/// The local path of one file of a model (a local folder or a hub id; from a hub only that
/// file is downloaded), e.g. a LoRA's `.safetensors`.
#[pyfunction]
#[pyo3(signature = (model, file, revision=None, local_files_only=false, cache_dir=None, token=None))]
pub fn model_file_path(
    py: Python<'_>,
    model: String,
    file: String,
    revision: Option<String>,
    local_files_only: bool,
    cache_dir: Option<PathBuf>,
    token: Option<String>,
) -> PyResult<PathBuf> {
    let hub = hub_options(revision, local_files_only, cache_dir, token);
    detached(py, move || resolve_model_file(&model, &file, &hub))
}
