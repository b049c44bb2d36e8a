//! Loading diffusers model folders: JSON configs, weight files (variants, shards) and tensors.
//!
//! Weights are memory-mapped. The CPU's GEMM layers read f32 weights in place or pack them
//! straight from the map ([`MappedF32`]); everything else is converted to the run dtype tensor by
//! tensor as the models ask for it. Every failure names the file, and for tensors the tensor and
//! the shapes involved.

mod mapped;
mod packed_cache;
pub mod weight_files;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::cpu::bf16::round_to_bf16;
use crate::cpu::Pod;
use crate::{Error, Result};
pub(crate) use mapped::{full_name, mapped_f32, mapped_half};
pub use mapped::{maps_weights, Mapped, MappedF32, MappedHalf};
use packed_cache::PackedCache;
pub use packed_cache::{
    cache_dir as weight_cache_dir, set_default_cache_dir as set_default_weight_cache_dir,
    user_cache_dir as user_weight_cache_dir,
};
pub(crate) use packed_cache::{cached_operands, pack_into_cache, PackedForm};
use weight_files::{choose_weight_files, shard_paths, WeightFiles};

/// sd-rs's folder in the user's cache: `$XDG_CACHE_HOME/sd-rs`, else `~/.cache/sd-rs` (`None`
/// without a home). It holds the model hashes (`model-hashes.json`) and sd-cli's packed weights
/// (`packed/`).
pub(crate) fn sd_rs_cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let cache = var("XDG_CACHE_HOME").or_else(|| Some(var("HOME")?.join(".cache")))?;
    Some(cache.join("sd-rs"))
}

/// Reads and deserializes a JSON config. Unknown keys are ignored by the config structs; a missing
/// required key is an error that names the file and the key.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e))
}

/// The weight files of one component folder (`unet/`, `vae/`, `text_encoder/`), as chosen by
/// [`choose_weight_files`]: the requested variant first, plain files next, and the fp16 variant
/// when it is the only thing present.
pub fn component_weight_paths(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let available: Vec<String> =
        entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect();
    match choose_weight_files(&available, stem, variant) {
        Some(WeightFiles::Single(name)) => Ok(vec![dir.join(name)]),
        Some(WeightFiles::Sharded { index }) => shard_paths(&dir.join(index)),
        None => Err(Error::Weights {
            path: dir.to_path_buf(),
            msg: format!(
                "no `{stem}.safetensors` weights (plain, fp16 variant or sharded) in this folder"
            ),
        }),
    }
}

/// A set of memory-mapped safetensors files that serves tensors by name to a [`VarBuilder`],
/// with errors that name the file and the tensor.
pub struct WeightStore {
    files: Vec<(PathBuf, Arc<MmapedSafetensors>)>,
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
                msg: format!(
                    "not a valid safetensors file (truncated or corrupt?): {}",
                    root_cause(&e)
                ),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, files.len());
            }
            files.push((path.clone(), Arc::new(st)));
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

    /// A builder over these weights. Layers built with it copy their weights out; inside
    /// [`build_component`] f32 weights are read in place instead (see [`MappedF32`]).
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        Arc::new(self).var_builder(dtype, device)
    }

    fn var_builder(self: Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(SharedStore(self)), dtype, device.clone())
    }

    /// Tensor `name`'s file (path and mapping) and stored view.
    fn view(
        &self,
        name: &str,
    ) -> Option<(&Path, &Arc<MmapedSafetensors>, safetensors::tensor::TensorView<'_>)> {
        let (path, st) = &self.files[*self.routing.get(name)?];
        Some((path, st, st.get(name).ok()?))
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
            (true, Ok(view)) => copy_out(&view, dtype),
            _ => None,
        };
        let tensor = fast
            .unwrap_or_else(|| st.load(name, dev).and_then(|t| t.to_dtype(dtype)))
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: tensor `{name}`: {}",
                    display_name(path),
                    root_cause(&e)
                ))
            })?;
        if let Ok(view) = st.get(name) {
            release_pages(view.data());
        }
        Ok((tensor, path))
    }
}

/// The [`SimpleBackend`] of a [`WeightStore`] that [`mapped_f32`] may share while building.
struct SharedStore(Arc<WeightStore>);

impl SimpleBackend for SharedStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (tensor, path) = self.0.load(name, dtype, dev)?;
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
        Ok(self.0.load(name, dtype, dev)?.0)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Builds a model from a component folder, turning loader errors into [`Error::Weights`] that
/// name the folder. The layers read f32 weights in place from the mapped files where they can
/// ([`MappedF32`]); packed bf16 weights come from the cache folder `SD_WEIGHT_CACHE` names, if
/// any ([`weight_cache_dir`]).
pub fn build_component<M>(
    dir: &Path,
    store: WeightStore,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<M> {
    build_component_cached(dir, store, dtype, device, weight_cache_dir().as_deref(), build)
}

/// [`build_component`] with the packed-weight cache in `cache_dir`, where the layers pack mapped
/// weights for the bf16 kernels (see [`packed_cache`]).
pub(crate) fn build_component_cached<M>(
    dir: &Path,
    store: WeightStore,
    dtype: DType,
    device: &Device,
    cache_dir: Option<&Path>,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<M> {
    let packs = crate::nn::packs_weight(dtype, device) && maps_weights();
    let cache = cache_dir.filter(|_| packs).and_then(|cache_dir| {
        let files: Vec<PathBuf> = store.files.iter().map(|(path, _)| path.clone()).collect();
        PackedCache::open(cache_dir, dir, &files)
    });
    let store = Arc::new(store);
    let (built, cache) = packed_cache::with_cache(cache, || {
        mapped::building(store.clone(), || build(store.var_builder(dtype, device)))
    });
    if let Some(cache) = cache {
        cache.finish(built.is_ok());
    }
    built.map_err(|e| Error::Weights { path: dir.to_path_buf(), msg: root_cause(&e) })
}

/// A tensor of the mapped file copied or converted into a CPU tensor (f32 or bf16) by all
/// threads; `None` for the cases candle's loader handles (other dtypes and devices). Copying
/// SD 2.1's 5 GB is page faults and memory bandwidth, so it scales with the threads; candle's
/// copy and its scalar conversions run on one.
fn copy_out(
    view: &safetensors::tensor::TensorView,
    dtype: DType,
) -> Option<candle_core::Result<Tensor>> {
    use half::{bf16, f16};
    use safetensors::Dtype as Stored;
    let (bytes, shape) = (view.data(), view.shape());
    Some(match (view.dtype(), dtype) {
        (Stored::F32, DType::F32) => {
            Tensor::from_vec(convert_par(as_values::<f32>(bytes)?, |v| v), shape, &Device::Cpu)
        }
        (Stored::F32, DType::BF16) => Tensor::from_vec(
            convert_par(as_values::<f32>(bytes)?, round_to_bf16),
            shape,
            &Device::Cpu,
        ),
        (Stored::F16, DType::F32) => Tensor::from_vec(
            convert_par(as_values::<f16>(bytes)?, f16::to_f32),
            shape,
            &Device::Cpu,
        ),
        (Stored::F16, DType::BF16) => Tensor::from_vec(
            convert_par(as_values::<f16>(bytes)?, |v| round_to_bf16(v.to_f32())),
            shape,
            &Device::Cpu,
        ),
        (Stored::BF16, DType::F32) => Tensor::from_vec(
            convert_par(as_values::<bf16>(bytes)?, bf16::to_f32),
            shape,
            &Device::Cpu,
        ),
        (Stored::BF16, DType::BF16) => {
            Tensor::from_vec(convert_par(as_values::<bf16>(bytes)?, |v| v), shape, &Device::Cpu)
        }
        _ => return None,
    })
}

/// The stored bytes as values, if they are aligned for `T` (safetensors does not promise it).
fn as_values<T: Pod>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        || !bytes.len().is_multiple_of(size)
    {
        return None;
    }
    // Safety: aligned, a whole number of values, and any bit pattern is a valid `T`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) })
}

/// `src` mapped through `f` into a new vector by all threads. The vector asks for transparent
/// huge pages before it is written, which saves most of the page faults of a 5 GB copy.
fn convert_par<S: Copy + Sync, T: Send>(src: &[S], f: impl Fn(S) -> T + Sync) -> Vec<T> {
    use rayon::prelude::*;
    let mut out: Vec<T> = Vec::with_capacity(src.len());
    advise_huge_pages(out.as_mut_ptr().cast(), src.len() * std::mem::size_of::<T>());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(dst, src)| {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(f(s));
            }
        });
    // Safety: every one of the `src.len()` elements was written above.
    unsafe { out.set_len(src.len()) };
    out
}

fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // Safety: whole huge pages inside an allocation we own; only a hint to the kernel.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
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
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
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
