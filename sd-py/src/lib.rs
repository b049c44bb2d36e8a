//! `sd_py._sd_py`: the native half of the `sd_py` Python package.
//!
//! This module is deliberately thin: it loads sd-core pipelines, runs them with the GIL released
//! and hands raw buffers back. The diffusers-shaped API (argument handling, `torch.Generator`
//! seeds, PIL/numpy outputs, scheduler classes) lives in the Python package beside it
//! (`py_src/sd_py`).
//!
//! Every entry point converts sd-core errors into the matching Python exception (`ValueError`,
//! `FileNotFoundError`, `OSError`, `RuntimeError`) and catches Rust panics, which surface as
//! `RuntimeError` rather than pyo3's `PanicException`.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, DeviceLocation, Tensor};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use sd_core::hub::{removed_repo_mirror, resolve_model, HubOptions};
use sd_core::pipeline::{
    parse_device, parse_dtype, GenerateParams, LoadOptions, OutputType, RunHooks,
    StableDiffusionPipeline, StepControl, StepProgress,
};
use sd_core::schedulers::{
    find_scheduler, scheduler_from_name, scheduler_names as core_scheduler_names, SchedulerConfig,
    SCHEDULERS,
};
use sd_core::Error;

pyo3::create_exception!(
    sd_py,
    GenerationCancelled,
    PyRuntimeError,
    "A generation stopped before its last step because its native step callback asked to cancel (`pipe._interrupt` does not raise it: as in diffusers, it decodes the latents as they are)."
);

// ---- errors and panics ----

/// The Python exception for an sd-core error, carrying its message.
fn to_pyerr(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        Error::Io { .. } | Error::Config { .. } | Error::Weights { .. } | Error::Hub(_) => {
            PyOSError::new_err(msg)
        }
        Error::InvalidArgument(_) | Error::UnknownScheduler { .. } => PyValueError::new_err(msg),
        Error::Cancelled => GenerationCancelled::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
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
type Guarded<T> = std::result::Result<sd_core::Result<T>, String>;

/// Runs `f`, turning a panic into its message (so it can cross `Python::detach`).
fn guard<T>(f: impl FnOnce() -> sd_core::Result<T>) -> Guarded<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

fn unguard<T>(r: Guarded<T>) -> PyResult<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_pyerr(e)),
        Err(msg) => {
            Err(PyRuntimeError::new_err(format!("internal error in sd-core (Rust panic): {msg}")))
        }
    }
}

/// Runs `f` with the GIL released, panics caught.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> sd_core::Result<T> + Send) -> PyResult<T> {
    unguard(py.detach(move || guard(f)))
}

/// Runs `f` with the GIL held, panics caught.
fn attached<T>(f: impl FnOnce() -> sd_core::Result<T>) -> PyResult<T> {
    unguard(guard(f))
}

/// For configs given as arguments (not read from a file): an invalid value is a `ValueError`.
fn config_arg_error(e: PyErr) -> PyErr {
    Python::attach(|py| {
        if e.is_instance_of::<PyOSError>(py) && !e.is_instance_of::<PyFileNotFoundError>(py) {
            PyValueError::new_err(e.value(py).to_string())
        } else {
            e
        }
    })
}

// ---- argument helpers ----

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "other",
    }
}

fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("mps:{gpu_id}"),
    }
}

/// `cpu`, `cuda`, `cuda:N`. Asking for CUDA from a build without it is a `RuntimeError` (the
/// argument is fine, the build is not); an unknown name is a `ValueError`.
fn device_from_name(name: &str) -> PyResult<Device> {
    let name = name.trim();
    let is_cuda = name == "cuda" || name.starts_with("cuda:");
    if is_cuda && !candle_core::utils::cuda_is_available() {
        return Err(PyRuntimeError::new_err(format!(
            "device `{name}` requested, but this build of sd_py has no CUDA support: \
             install a wheel built with `maturin build --features cuda` (see deploy/Dockerfile), or use \"cpu\""
        )));
    }
    attached(|| parse_device(name))
}

fn dtype_from_name(name: &str) -> PyResult<DType> {
    attached(|| parse_dtype(name.trim()))
}

fn hub_options(
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

/// The weight variant a run in `dtype` loads (sd-core's rule in `from_pretrained`).
fn effective_variant(variant: Option<&str>, dtype: DType) -> Option<String> {
    variant.map(str::to_string).or_else(|| (dtype != DType::F32).then(|| "fp16".to_string()))
}

// ---- the pipeline ----

/// A loaded sd-core pipeline (the Python class `StableDiffusionPipeline` wraps it).
#[pyclass(frozen, name = "_Pipeline", module = "sd_py._sd_py")]
struct PyPipeline {
    inner: Arc<StableDiffusionPipeline>,
    /// The variant asked for at load time (`None`: sd-core's default for the dtype).
    variant: Option<String>,
}

/// What `generate` returns besides the seeds.
enum Produced {
    Images(Vec<image::RgbImage>),
    /// `[b, h, w, 3]` float32 in [0, 1] (diffusers' `output_type="np"`).
    Array {
        data: Vec<f32>,
        shape: [usize; 4],
    },
    Latents,
}

struct RunResult {
    produced: Produced,
    /// Final latents `[b, c, h, w]` (only filled for `output_type="latent"`).
    latents: Option<(Vec<f32>, Vec<usize>)>,
    seeds: Vec<u64>,
    timings: [f64; 3],
}

/// diffusers' `postprocess(output_type="np")`: `[b, 3, h, w]` in [-1, 1] to `[b, h, w, 3]` in
/// [0, 1], computed in float32 (`(x / 2 + 0.5).clamp(0, 1)`).
fn to_unit_hwc(decoded: &Tensor) -> sd_core::Result<(Vec<f32>, [usize; 4])> {
    let (b, c, h, w) = decoded.dims4()?;
    let hwc = decoded.to_dtype(DType::F32)?.permute((0, 2, 3, 1))?.contiguous()?;
    let data = hwc
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    Ok((data, [b, h, w, c]))
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The inverse of [`f32_bytes`] (a trailing partial value is dropped; callers check the length).
fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// What a Python step callback asked for. A plain value: truthy goes on, falsy cancels. A pair
/// `(action, latents)`: action "continue", "finish" (decode the latents now) or "cancel", and
/// `None` or the latents to go on with, as float32 bytes.
fn step_reply(ret: &Bound<'_, PyAny>) -> PyResult<(StepControl, Option<Vec<f32>>)> {
    let Ok(pair) = ret.cast::<PyTuple>() else {
        let control = if ret.is_truthy()? { StepControl::Continue } else { StepControl::Cancel };
        return Ok((control, None));
    };
    let malformed = || {
        PyValueError::new_err(
            "on_step must return a bool or a pair (action, float32 latents bytes or None)",
        )
    };
    let (action, latents): (String, Bound<'_, PyAny>) = pair.extract().map_err(|_| malformed())?;
    let control = match action.as_str() {
        "continue" => StepControl::Continue,
        "finish" => StepControl::Finish,
        "cancel" => StepControl::Cancel,
        other => {
            return Err(PyValueError::new_err(format!(
                "on_step: unknown action `{other}` (expected continue, finish or cancel)"
            )))
        }
    };
    if latents.is_none() {
        return Ok((control, None));
    }
    let bytes = latents.cast::<PyBytes>().map_err(|_| malformed())?.as_bytes();
    if bytes.len() % 4 != 0 {
        return Err(malformed());
    }
    Ok((control, Some(f32_values(bytes))))
}

/// A CPU tensor of `shape` from little-endian float32 bytes.
fn tensor_from_f32_bytes(bytes: &[u8], shape: &[usize]) -> PyResult<Tensor> {
    let count: usize = shape.iter().product();
    if bytes.len() != count * 4 {
        return Err(PyValueError::new_err(format!(
            "{} bytes are not float32 values of shape {shape:?}",
            bytes.len()
        )));
    }
    Tensor::from_vec(f32_values(bytes), shape, &Device::Cpu).map_err(|e| to_pyerr(e.into()))
}

/// Latents handed back by a step callback, in the shape and on the device of the run's.
fn replaced_latents(values: Vec<f32>, latents: &Tensor) -> PyResult<Tensor> {
    if values.len() != latents.elem_count() {
        return Err(PyValueError::new_err(format!(
            "the step callback returned {} latent values, the run has {} (shape {:?})",
            values.len(),
            latents.elem_count(),
            latents.dims()
        )));
    }
    Tensor::from_vec(values, latents.shape(), latents.device()).map_err(|e| to_pyerr(e.into()))
}

#[pymethods]
impl PyPipeline {
    /// Loads a diffusers folder or hub model id.
    #[staticmethod]
    #[pyo3(signature = (model, dtype="float32", device="cpu", variant=None, revision=None, local_files_only=false, cache_dir=None, token=None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        model: PathBuf,
        dtype: &str,
        device: &str,
        variant: Option<String>,
        revision: Option<String>,
        local_files_only: bool,
        cache_dir: Option<PathBuf>,
        token: Option<String>,
    ) -> PyResult<Self> {
        let dtype = dtype_from_name(dtype)?;
        let device = device_from_name(device)?;
        let variant = variant.filter(|v| !v.is_empty());
        let hub = hub_options(revision, local_files_only, cache_dir, token);
        let opts = LoadOptions { device, dtype, variant: variant.clone(), hub };
        let model = model.to_string_lossy().into_owned();
        let inner = detached(py, move || StableDiffusionPipeline::from_pretrained(&model, &opts))?;
        Ok(Self { inner: Arc::new(inner), variant })
    }

    /// The same model loaded again on `device` in `dtype` (from the resolved local folder).
    fn reload(&self, py: Python<'_>, dtype: &str, device: &str) -> PyResult<Self> {
        let dtype = dtype_from_name(dtype)?;
        let device = device_from_name(device)?;
        let folder = self.inner.folder.clone();
        let variant = effective_variant(self.variant.as_deref(), dtype);
        let inner = detached(py, move || {
            StableDiffusionPipeline::from_folder(&folder, dtype, &device, variant.as_deref())
        })?;
        Ok(Self { inner: Arc::new(inner), variant: self.variant.clone() })
    }

    /// The local diffusers folder the weights were read from.
    #[getter]
    fn folder(&self) -> PathBuf {
        self.inner.folder.clone()
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.inner.device())
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.inner.dtype())
    }

    #[getter]
    fn variant(&self) -> Option<String> {
        self.variant.clone()
    }

    #[getter]
    fn default_size(&self) -> usize {
        self.inner.default_size()
    }

    #[getter]
    fn vae_scale_factor(&self) -> usize {
        self.inner.vae_scale_factor()
    }

    /// The scheduler class named by the model's `model_index.json`.
    #[getter]
    fn scheduler_class(&self) -> String {
        self.inner.scheduler_class.clone()
    }

    /// The model's `scheduler/scheduler_config.json`, as JSON.
    #[getter]
    fn scheduler_config(&self) -> String {
        self.inner.scheduler_config.to_json_string()
    }

    /// The tokenizer's maximum sequence length (77 for CLIP).
    #[getter]
    fn max_prompt_tokens(&self) -> usize {
        self.inner.tokenizer.max_length()
    }

    /// The part of `prompt` cut off by the tokenizer's length limit, if any.
    fn truncated_text(&self, prompt: &str) -> PyResult<Option<String>> {
        attached(|| self.inner.tokenizer.truncated_text(prompt))
    }

    /// Runs the pipeline with the GIL released.
    ///
    /// `seeds`: empty (random), one (one generator for the batch) or one per image.
    /// `output`: "pil" (raw RGB bytes per image), "np" (float32 `[b, h, w, 3]` bytes) or
    /// "latent" (float32 latents). `on_step(step_index, timestep)` is called after each step with
    /// the GIL held, with a third argument `(float32 bytes, shape)` of the latents when
    /// `step_latents`. It returns a bool (falsy stops the run with `GenerationCancelled`) or a
    /// pair `(action, latents)`: "continue", "finish" (skip the remaining steps and decode the
    /// latents as they are) or "cancel", and `None` or replacement latents as float32 bytes. An
    /// exception stops the run and is re-raised. `latents`: `(float32 bytes, shape)` of the
    /// initial noise, instead of drawing it from the seeds. `prompt_embeds`,
    /// `negative_prompt_embeds`: `(float32 bytes, shape)` of text embeddings, instead of encoding
    /// the prompts (then empty) or the negative prompts.
    #[pyo3(signature = (prompts, negative_prompts=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=1, seeds=Vec::new(), scheduler=None, scheduler_config=None, output="pil", on_step=None, guidance_rescale=0.0, eta=0.0, step_latents=false, latents=None, prompt_embeds=None, negative_prompt_embeds=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<String>,
        negative_prompts: Option<Vec<String>>,
        height: Option<usize>,
        width: Option<usize>,
        num_inference_steps: usize,
        guidance_scale: f64,
        num_images_per_prompt: usize,
        seeds: Vec<u64>,
        scheduler: Option<String>,
        scheduler_config: Option<String>,
        output: &str,
        on_step: Option<Py<PyAny>>,
        guidance_rescale: f64,
        eta: f64,
        step_latents: bool,
        latents: Option<(Bound<'py, PyBytes>, Vec<usize>)>,
        prompt_embeds: Option<(Bound<'py, PyBytes>, Vec<usize>)>,
        negative_prompt_embeds: Option<(Bound<'py, PyBytes>, Vec<usize>)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let kind = match output {
            "pil" => OutputType::Image,
            "np" | "latent" => OutputType::Latent,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown output `{other}` (expected pil, np or latent)"
                )))
            }
        };
        let want_array = output == "np";
        let want_latents = output == "latent";
        let scheduler_config = match scheduler_config {
            Some(json) => {
                Some(attached(|| SchedulerConfig::from_json_str(&json)).map_err(config_arg_error)?)
            }
            None => None,
        };
        let mut params = GenerateParams::new(String::new());
        params.prompts = prompts;
        params.negative_prompts = negative_prompts;
        params.height = height;
        params.width = width;
        params.num_inference_steps = num_inference_steps;
        params.guidance_scale = guidance_scale;
        params.guidance_rescale = guidance_rescale;
        params.eta = eta;
        params.num_images_per_prompt = num_images_per_prompt;
        params.seeds = seeds;
        params.scheduler = scheduler;
        params.scheduler_config = scheduler_config;
        params.output = kind;
        let tensor = |arg: Option<(Bound<'py, PyBytes>, Vec<usize>)>| match arg {
            Some((bytes, shape)) => tensor_from_f32_bytes(bytes.as_bytes(), &shape).map(Some),
            None => Ok(None),
        };
        params.latents = tensor(latents)?;
        params.prompt_embeds = tensor(prompt_embeds)?;
        params.negative_prompt_embeds = tensor(negative_prompt_embeds)?;

        let pipe = Arc::clone(&self.inner);
        let mut callback_error: Option<PyErr> = None;
        let result = {
            let callback_error = &mut callback_error;
            py.detach(move || {
                guard(|| {
                    let mut step_hook = |p: &StepProgress, latents: &mut Tensor| -> StepControl {
                        let Some(cb) = on_step.as_ref() else {
                            return StepControl::Continue;
                        };
                        Python::attach(|py| {
                            let reply = py.check_signals().and_then(|_| {
                                let ret = if step_latents {
                                    let l = latents.flatten_all().and_then(|l| l.to_vec1::<f32>());
                                    let values = l.map_err(|e| to_pyerr(e.into()))?;
                                    let shape = latents.dims().to_vec();
                                    let arg = (PyBytes::new(py, &f32_bytes(&values)), shape);
                                    cb.call1(py, (p.step - 1, p.timestep, arg))?
                                } else {
                                    cb.call1(py, (p.step - 1, p.timestep))?
                                };
                                let (control, replacement) = step_reply(ret.bind(py))?;
                                if let Some(values) = replacement {
                                    *latents = replaced_latents(values, latents)?;
                                }
                                Ok(control)
                            });
                            reply.unwrap_or_else(|e| {
                                *callback_error = Some(e);
                                StepControl::Cancel
                            })
                        })
                    };
                    let hooks =
                        RunHooks { on_step_end: Some(&mut step_hook), ..Default::default() };
                    let out = pipe.generate_with(&params, hooks)?;
                    let produced = if want_array {
                        let decoded = pipe.decode_latents(&out.latents)?;
                        let (data, shape) = to_unit_hwc(&decoded)?;
                        Produced::Array { data, shape }
                    } else if want_latents {
                        Produced::Latents
                    } else {
                        Produced::Images(out.images)
                    };
                    let latents = if want_latents {
                        let l = out.latents.to_dtype(DType::F32)?;
                        Some((l.flatten_all()?.to_vec1::<f32>()?, l.dims().to_vec()))
                    } else {
                        None
                    };
                    let t = out.timings;
                    Ok(RunResult {
                        produced,
                        latents,
                        seeds: out.seeds,
                        timings: [
                            t.text_encoder.as_secs_f64(),
                            t.denoise.as_secs_f64(),
                            t.vae_decode.as_secs_f64(),
                        ],
                    })
                })
            })
        };
        if let Some(e) = callback_error {
            return Err(e);
        }
        let run = unguard(result)?;

        let out = PyDict::new(py);
        match run.produced {
            Produced::Images(images) => {
                let list = PyList::empty(py);
                for img in &images {
                    list.append((img.width(), img.height(), PyBytes::new(py, img.as_raw())))?;
                }
                out.set_item("images", list)?;
            }
            Produced::Array { data, shape } => {
                out.set_item("array", (PyBytes::new(py, &f32_bytes(&data)), shape.to_vec()))?;
            }
            Produced::Latents => {}
        }
        if let Some((data, shape)) = run.latents {
            out.set_item("latents", (PyBytes::new(py, &f32_bytes(&data)), shape))?;
        }
        out.set_item("seeds", run.seeds)?;
        let timings = PyDict::new(py);
        timings.set_item("text_encoder", run.timings[0])?;
        timings.set_item("denoise", run.timings[1])?;
        timings.set_item("vae_decode", run.timings[2])?;
        out.set_item("timings", timings)?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "_Pipeline(folder={:?}, device={}, dtype={})",
            self.inner.folder.display().to_string(),
            device_name(self.inner.device()),
            dtype_name(self.inner.dtype())
        )
    }
}

// ---- schedulers ----

/// The diffusers scheduler classes sd-core implements, in registry order (each once).
#[pyfunction]
fn scheduler_classes() -> Vec<&'static str> {
    let mut classes: Vec<&'static str> = Vec::new();
    for entry in SCHEDULERS {
        if !classes.contains(&entry.class_name) {
            classes.push(entry.class_name);
        }
    }
    classes
}

/// Every name sd-core's scheduler lookup accepts (class names and short names).
#[pyfunction]
fn scheduler_names() -> Vec<&'static str> {
    core_scheduler_names()
}

/// What a scheduler name (a class name, a short name like `euler_karras` or an A1111 name like
/// "DPM++ 2M Karras") means: `(class_name, config overrides as JSON)`.
#[pyfunction]
fn scheduler_entry(name: &str) -> PyResult<(&'static str, String)> {
    attached(|| {
        let entry = find_scheduler(name)?;
        let overrides: serde_json::Map<String, serde_json::Value> = entry
            .overrides
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        Ok((entry.class_name, serde_json::Value::Object(overrides).to_string()))
    })
}

/// `class_name.from_config(config)`: the resolved config (every key of the class with its value,
/// diffusers' `scheduler.config`) as JSON. Errors on invalid values, like the constructor.
#[pyfunction]
fn resolve_scheduler_config(class_name: &str, config_json: &str) -> PyResult<String> {
    attached(|| {
        let config = SchedulerConfig::from_json_str(config_json)?;
        let scheduler = scheduler_from_name(class_name, &config)?;
        Ok(scheduler.config().to_json_string())
    })
    .map_err(config_arg_error)
}

/// `(timesteps, init_noise_sigma, order)` of the scheduler after `set_timesteps(steps)` (or, with
/// `steps=None`, as constructed: no timesteps).
#[pyfunction]
#[pyo3(signature = (class_name, config_json, num_inference_steps=None))]
fn scheduler_schedule(
    class_name: &str,
    config_json: &str,
    num_inference_steps: Option<usize>,
) -> PyResult<(Vec<f64>, f64, usize)> {
    attached(|| {
        let config = SchedulerConfig::from_json_str(config_json)?;
        let mut scheduler = scheduler_from_name(class_name, &config)?;
        if let Some(n) = num_inference_steps {
            scheduler.set_timesteps(n)?;
        }
        Ok((scheduler.timesteps().to_vec(), scheduler.init_noise_sigma(), scheduler.order()))
    })
    .map_err(config_arg_error)
}

/// huggingface_hub's repo id rule: `name` or `org/name`.
fn is_valid_repo_id(id: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    let parts: Vec<&str> = id.split('/').collect();
    id.len() <= 96
        && !id.contains("--")
        && !id.contains("..")
        && parts.len() <= 2
        && parts.iter().all(|p| part_ok(p))
}

/// One file of a model: from a local folder, or from the hub (only that file is downloaded,
/// into the standard Hugging Face cache; offline mode reads the cache only).
fn model_file(id_or_path: &str, file: &str, hub: &HubOptions) -> sd_core::Result<PathBuf> {
    let path = Path::new(id_or_path);
    if path.is_dir() {
        let p = path.join(file);
        return if p.is_file() { Ok(p) } else { Err(Error::NotFound { path: p }) };
    }
    if path.exists() || !is_valid_repo_id(id_or_path) || removed_repo_mirror(id_or_path).is_some() {
        // Not a repo id (a missing folder, a file), or a removed repo: sd-core's resolver gives
        // the error (or the cached snapshot) without touching the network.
        let folder = resolve_model(id_or_path, hub)?;
        return model_file(&folder.to_string_lossy(), file, hub);
    }
    let rev = hub.revision.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| "main".to_string());
    let repo =
        hf_hub::Repo::with_revision(id_or_path.to_string(), hf_hub::RepoType::Model, rev.clone());
    let cache = hf_hub::Cache::new(hub.cache_dir.clone());
    if let Some(p) = cache.repo(repo.clone()).get(file) {
        return Ok(p);
    }
    if hub.offline {
        return Err(Error::Hub(format!(
            "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True) and `{file}` of {id_or_path} (revision {rev}) \
             is not in the cache {}",
            hub.cache_dir.display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_progress(false)
        .with_retries(2)
        .with_user_agent("sd-rs", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| Error::Hub(format!("{id_or_path}: {e}")))?;
    api.repo(repo).get(file).map_err(|e| {
        Error::Hub(format!(
            "{id_or_path} (revision {rev}): cannot fetch `{file}` from {}: {e}",
            hub.endpoint
        ))
    })
}

/// The text of one file of a model (a local folder or a hub id); see `model_file`.
#[pyfunction]
#[pyo3(signature = (model, file, revision=None, local_files_only=false, cache_dir=None, token=None))]
fn read_model_file(
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
        let path = model_file(&model, &file, &hub)?;
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

// ---- misc ----

/// Whether this build has CUDA support (says nothing about a GPU being present).
#[pyfunction]
fn cuda_is_available() -> bool {
    candle_core::utils::cuda_is_available()
}

/// Normalizes a dtype name ("fp16", "torch.float16", ...) to "float32", "float16" or "bfloat16";
/// `ValueError` for anything else.
#[pyfunction]
fn normalize_dtype(name: &str) -> PyResult<&'static str> {
    Ok(dtype_name(dtype_from_name(name)?))
}

/// For tests: a Rust panic inside a guarded call must come out as `RuntimeError`.
#[pyfunction]
fn _panic_for_tests(py: Python<'_>, message: String) -> PyResult<()> {
    detached(py, move || -> sd_core::Result<()> { panic!("{message}") })
}

/// Native half of `sd_py`: sd-core pipelines and schedulers.
#[pymodule]
fn _sd_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPipeline>()?;
    m.add("GenerationCancelled", m.py().get_type::<GenerationCancelled>())?;
    m.add_function(wrap_pyfunction!(scheduler_classes, m)?)?;
    m.add_function(wrap_pyfunction!(scheduler_names, m)?)?;
    m.add_function(wrap_pyfunction!(scheduler_entry, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_scheduler_config, m)?)?;
    m.add_function(wrap_pyfunction!(scheduler_schedule, m)?)?;
    m.add_function(wrap_pyfunction!(read_model_file, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_is_available, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_dtype, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
