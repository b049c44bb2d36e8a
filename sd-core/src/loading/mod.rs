//! Loading diffusers model folders: JSON configs, weight files (variants, shards) and tensors.
//!
//! Weights are memory-mapped and converted to the run dtype tensor by tensor as the models ask
//! for them. Every failure names the file, and for tensors the tensor and the shapes involved.

pub mod weight_files;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};
use weight_files::{choose_weight_files, shard_paths, WeightFiles};

/// Reads and deserializes a JSON config. Unknown keys are ignored by the config structs; a missing
/// required key is an error that names the file and the key.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e))
}

/// The weight files of one component folder (`unet/`, `vae/`, `text_encoder/`), as chosen by
/// [`choose_weight_files`]: the requested variant first, plain files next, and the fp16 variant
/// when it is the only thing present.
pub fn component_weight_paths(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let available: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    match choose_weight_files(&available, stem, variant) {
        Some(WeightFiles::Single(name)) => Ok(vec![dir.join(name)]),
        Some(WeightFiles::Sharded { index }) => shard_paths(&dir.join(index)),
        None => Err(Error::Weights {
            path: dir.to_path_buf(),
            msg: format!("no `{stem}.safetensors` weights (plain, fp16 variant or sharded) in this folder"),
        }),
    }
}

/// A set of memory-mapped safetensors files that serves tensors by name to a [`VarBuilder`],
/// with errors that name the file and the tensor.
pub struct WeightStore {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
}

impl WeightStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for path in paths {
            if !path.exists() {
                return Err(Error::NotFound { path: path.clone() });
            }
            // SAFETY: the mapping is read-only; like every mmap-based loader (safetensors,
            // candle) we rely on the file not being truncated by another process while loaded.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::Weights {
                path: path.clone(),
                msg: format!("not a valid safetensors file (truncated or corrupt?): {}", root_cause(&e)),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, files.len());
            }
            files.push((path.clone(), st));
        }
        Ok(Self { files, routing })
    }

    /// Opens the weights of a component folder (see [`component_weight_paths`]).
    pub fn open_component(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Self> {
        Self::open(&component_weight_paths(dir, stem, variant)?)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// The names of every tensor in the store.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn file_names(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|(p, _)| display_name(p)).collect();
        names.join(", ")
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<(Tensor, &Path)> {
        let Some(&idx) = self.routing.get(name) else {
            candle_core::bail!("tensor `{name}` is missing from {}", self.file_names())
        };
        let (path, st) = &self.files[idx];
        let fast = match (dev.is_cpu(), st.get(name)) {
            (true, Ok(view)) => copy_f32_out(&view, dtype),
            _ => None,
        };
        let tensor = fast
            .unwrap_or_else(|| st.load(name, dev).and_then(|t| t.to_dtype(dtype)))
            .map_err(|e| candle_core::Error::Msg(format!("{}: tensor `{name}`: {}", display_name(path), root_cause(&e))))?;
        if let Ok(view) = st.get(name) {
            release_pages(view.data());
        }
        Ok((tensor, path))
    }
}

impl SimpleBackend for WeightStore {
    fn get(&self, shape: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (tensor, path) = self.load(name, dtype, dev)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?}",
                display_name(path),
                tensor.dims(),
                shape.dims()
            )
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Ok(self.load(name, dtype, dev)?.0)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// Builds a model from a component folder, turning loader errors into [`Error::Weights`] that
/// name the folder.
pub fn build_component<M>(
    dir: &Path,
    store: WeightStore,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<M> {
    build(store.into_var_builder(dtype, device))
        .map_err(|e| Error::Weights { path: dir.to_path_buf(), msg: root_cause(&e) })
}

/// An f32 tensor of the mapped file copied (to f32) or converted (to bf16) into a CPU tensor by
/// all threads; `None` for other dtypes, which take candle's path. Copying SD 2.1's 5 GB
/// is page faults and memory bandwidth, so it scales with the threads; candle's copy and its
/// scalar f32 -> bf16 conversion run on one.
fn copy_f32_out(view: &safetensors::tensor::TensorView, dtype: DType) -> Option<candle_core::Result<Tensor>> {
    use rayon::prelude::*;
    let bytes = view.data();
    let aligned = bytes.as_ptr() as usize % std::mem::align_of::<f32>() == 0 && bytes.len() % 4 == 0;
    if view.dtype() != safetensors::Dtype::F32 || !aligned || !matches!(dtype, DType::F32 | DType::BF16) {
        return None;
    }
    // Safety: aligned and a whole number of f32s (checked above); every bit pattern is an f32.
    let values: &[f32] = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / 4) };
    let shape = view.shape().to_vec();
    Some(match dtype {
        DType::BF16 => Tensor::from_vec(crate::nn::blas::to_bf16_par(values), shape, &Device::Cpu),
        _ => Tensor::from_vec(values.par_iter().copied().collect::<Vec<f32>>(), shape, &Device::Cpu),
    })
}

/// Drops the mapped file pages of a tensor that has been copied out, so that loading a model
/// costs its weights once in memory, not twice (copies plus mapped file) until the whole
/// component is loaded. The mapping is read-only and backed by the file: touching the range
/// again faults the same bytes back in.
fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // Safety: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let start = (bytes.as_ptr() as usize).next_multiple_of(page);
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // Safety: whole pages inside a read-only file mapping we hold; see above.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}

fn display_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// candle wraps errors in backtraces and paths; keep the message a user can act on.
fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        candle_core::Error::Context { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}
