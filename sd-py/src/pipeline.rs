//! The `_Pipeline` class (a loaded sd-core pipeline; the Python `StableDiffusionPipeline` wraps
//! it) and what its `generate` returns.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Tensor};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use sd_core::hub::variant_for;
use sd_core::pipeline::{
    GenerateOutput, GenerateParams, LoadOptions, RunHooks, StableDiffusionPipeline, StepControl,
    StepProgress,
};

use crate::arrays::{f32_values, to_unit_hwc, Float32Array};
use crate::device::{device_from_name, device_name, dtype_from_name, dtype_name};
use crate::error::{attached, config_arg_error, detached, guard, to_pyerr, unguard};
use crate::hub::hub_options;
use crate::run_args::{Output, OutputChoice, RunArgs};

/// A loaded sd-core pipeline (the Python class `StableDiffusionPipeline` wraps it).
#[pyclass(frozen, name = "_Pipeline", module = "sd_py._sd_py")]
pub struct PyPipeline {
    /// Replaced only while no run holds it (`load_textual_inversion`).
    inner: RwLock<Arc<StableDiffusionPipeline>>,
    /// The variant asked for at load time (`None`: sd-core's default for the dtype).
    variant: Option<String>,
    /// The textual-inversion files loaded, with their `token` argument, so that `reload` loads
    /// them again.
    embeddings: RwLock<Vec<(PathBuf, Option<String>)>>,
    /// The LoRA files loaded (and not unloaded), with their adapter names, for `reload`.
    loras: RwLock<Vec<(PathBuf, String)>>,
}

/// An 8-bit RGB image: `data` holds `height` rows of `width` RGB pixels.
#[pyclass(frozen, get_all, module = "sd_py._sd_py")]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Py<PyBytes>,
}

/// Wall time in seconds of each stage of a run.
#[pyclass(frozen, get_all, module = "sd_py._sd_py")]
pub struct StageTimings {
    pub text_encoder: f64,
    pub denoise: f64,
    pub vae_decode: f64,
}

/// What `_Pipeline.generate` returns: the output asked for (`images` for "pil", `array` for "np",
/// `latents` for "latent"; the others are empty), the seeds used and the stage timings.
#[pyclass(frozen, get_all, module = "sd_py._sd_py")]
pub struct GenerateResult {
    /// "pil": one RGB image per prompt and image.
    pub images: Vec<Py<RgbImage>>,
    /// "np": `[b, h, w, 3]` in [0, 1] (diffusers' `output_type="np"`).
    pub array: Option<Py<Float32Array>>,
    /// "latent": the final latents `[b, c, h/8, w/8]`.
    pub latents: Option<Py<Float32Array>>,
    /// The seed of each image, or the one seed of the batch.
    pub seeds: Vec<u64>,
    pub timings: Py<StageTimings>,
    /// With `metadata=True` and "pil": each image's settings as AUTOMATIC1111's `parameters`
    /// text (what sd-cli writes into its PNGs); else empty.
    pub infotexts: Vec<String>,
}

/// A run's output in Rust values, made while the GIL is released.
struct RunOutput {
    images: Vec<image::RgbImage>,
    /// `(values, shape)` of the "np" array or of the latents, by `Output`.
    values: Option<(Vec<f32>, Vec<usize>)>,
    seeds: Vec<u64>,
    timings: sd_core::pipeline::StageTimings,
    infotexts: Vec<String>,
}

impl RunOutput {
    fn into_py(self, py: Python<'_>, output: Output) -> PyResult<GenerateResult> {
        let images = self
            .images
            .iter()
            .map(|img| {
                let data = PyBytes::new(py, img.as_raw()).unbind();
                Py::new(py, RgbImage { width: img.width(), height: img.height(), data })
            })
            .collect::<PyResult<_>>()?;
        let values = match self.values {
            Some((values, shape)) => Some(Py::new(py, Float32Array::new(py, &values, shape))?),
            None => None,
        };
        let (array, latents) = if output == Output::Np { (values, None) } else { (None, values) };
        let t = self.timings;
        let timings = StageTimings {
            text_encoder: t.text_encoder.as_secs_f64(),
            denoise: t.denoise.as_secs_f64(),
            vae_decode: t.vae_decode.as_secs_f64(),
        };
        Ok(GenerateResult {
            images,
            array,
            latents,
            seeds: self.seeds,
            timings: Py::new(py, timings)?,
            infotexts: self.infotexts,
        })
    }
}

/// A finished run's output as `output` asks for it, made while the GIL is released: the "np"
/// array or the latents, and each image's settings text when `metadata` (with "pil").
fn run_output(
    pipe: &StableDiffusionPipeline,
    params: &GenerateParams,
    out: GenerateOutput,
    output: OutputChoice,
) -> sd_core::Result<RunOutput> {
    let values = match output.kind {
        Output::Pil => None,
        Output::Np => Some(to_unit_hwc(&pipe.decode_latents(&out.latents)?)?),
        Output::Latent => {
            let l = out.latents.to_dtype(DType::F32)?;
            Some((l.flatten_all()?.to_vec1::<f32>()?, l.dims().to_vec()))
        }
    };
    let infotexts = match output.metadata && output.kind == Output::Pil {
        true => (0..out.images.len())
            .map(|i| Ok(pipe.generation_info(params, &out, i)?.to_infotext().to_text()))
            .collect::<sd_core::Result<Vec<_>>>()?,
        false => Vec::new(),
    };
    Ok(RunOutput { images: out.images, values, seeds: out.seeds, timings: out.timings, infotexts })
}

/// A run started by `_Pipeline.start_run`, stepped by `_Pipeline.step_runs` (several at once) and
/// finished by `_Pipeline.complete_run`.
#[pyclass(frozen, name = "_ActiveRun", module = "sd_py._sd_py")]
pub struct ActiveRun {
    /// Taken by `complete_run`.
    run: Mutex<Option<sd_core::pipeline::ActiveRun>>,
    key: (usize, usize, usize, Option<u64>),
    output: OutputChoice,
    /// The pipeline that started it: its runs are stepped only by it.
    pipe: Arc<StableDiffusionPipeline>,
}

impl ActiveRun {
    /// `f(run)`, or `default` once the run is completed.
    fn with<T>(&self, default: T, f: impl FnOnce(&sd_core::pipeline::ActiveRun) -> T) -> T {
        match self.run.lock().as_deref() {
            Ok(Some(run)) => f(run),
            _ => default,
        }
    }
}

#[pymethods]
impl ActiveRun {
    /// Runs with the same key may be stepped together: `(latent height, latent width, text
    /// tokens, LoRA scale bits or None)`.
    #[getter]
    fn batch_key(&self) -> (usize, usize, usize, Option<u64>) {
        self.key
    }

    /// Images of the run.
    #[getter]
    fn images(&self) -> usize {
        self.with(0, |run| run.images())
    }

    #[getter]
    fn steps_done(&self) -> usize {
        self.with(0, |run| run.steps_done())
    }

    #[getter]
    fn total_steps(&self) -> usize {
        self.with(0, |run| run.total_steps())
    }

    /// What `complete_run` returns: "pil", "np" or "latent".
    #[getter]
    fn output(&self) -> &'static str {
        match self.output.kind {
            Output::Pil => "pil",
            Output::Np => "np",
            Output::Latent => "latent",
        }
    }

    /// No step is left (all done, or one failed), or the run was completed.
    #[getter]
    fn finished(&self) -> bool {
        self.with(true, |run| run.is_finished())
    }
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

/// Calls the Python step callback (with the GIL) and applies its reply to the latents.
fn call_on_step(
    py: Python<'_>,
    on_step: &Py<PyAny>,
    step_latents: bool,
    progress: &StepProgress,
    latents: &mut Tensor,
) -> PyResult<StepControl> {
    py.check_signals()?;
    let index = progress.step - 1;
    let ret = if step_latents {
        let arg = Float32Array::of_tensor(py, latents)?;
        on_step.call1(py, (index, progress.timestep, arg))?
    } else {
        on_step.call1(py, (index, progress.timestep))?
    };
    let (control, replacement) = step_reply(ret.bind(py))?;
    if let Some(values) = replacement {
        *latents = replaced_latents(values, latents)?;
    }
    Ok(control)
}

impl PyPipeline {
    fn new(
        pipe: StableDiffusionPipeline,
        variant: Option<String>,
        embeddings: Vec<(PathBuf, Option<String>)>,
        loras: Vec<(PathBuf, String)>,
    ) -> Self {
        Self {
            inner: RwLock::new(Arc::new(pipe)),
            variant,
            embeddings: RwLock::new(embeddings),
            loras: RwLock::new(loras),
        }
    }

    /// The loaded pipeline, shared with the runs in progress.
    fn pipe(&self) -> Arc<StableDiffusionPipeline> {
        Arc::clone(&self.inner.read().expect("not poisoned"))
    }
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
        let inner = detached(py, move || {
            init_cpu_for(&opts.device)?;
            StableDiffusionPipeline::from_pretrained(&model, &opts)
        })?;
        Ok(Self::new(inner, variant, vec![], vec![]))
    }

    /// The same model loaded again on `device` in `dtype` (from the resolved local folder), with
    /// the same textual inversions and LoRAs (active adapters, weights and fusing too).
    fn reload(&self, py: Python<'_>, dtype: &str, device: &str) -> PyResult<Self> {
        let dtype = dtype_from_name(dtype)?;
        let device = device_from_name(device)?;
        let folder = self.pipe().folder.clone();
        let variant = variant_for(self.variant.as_deref(), dtype);
        let embeddings = self.embeddings.read().expect("not poisoned").clone();
        let loaded = embeddings.clone();
        let loras = self.loras.read().expect("not poisoned").clone();
        let lora_files = loras.clone();
        let old = self.pipe();
        let (active, fused) = (old.adapters.active(), old.adapters.fused_scale());
        let inner = detached(py, move || {
            init_cpu_for(&device)?;
            let mut pipe =
                StableDiffusionPipeline::from_folder(&folder, dtype, &device, variant.as_deref())?;
            for (path, token) in &loaded {
                pipe.load_textual_inversion(path, token.as_deref())?;
            }
            for (path, name) in &lora_files {
                pipe.load_lora(path, name)?;
            }
            if !lora_files.is_empty() {
                pipe.set_adapters(&active)?;
            }
            if let Some(scale) = fused {
                pipe.fuse_lora(scale)?;
            }
            Ok(pipe)
        })?;
        Ok(Self::new(inner, self.variant.clone(), embeddings, loras))
    }

    /// diffusers' `load_textual_inversion` for a `.safetensors` file; returns the tokens added.
    /// Refused while a run of this pipeline is in progress.
    #[pyo3(signature = (path, token=None))]
    fn load_textual_inversion(
        &self,
        path: PathBuf,
        token: Option<String>,
    ) -> PyResult<Vec<String>> {
        let mut inner = self.inner.write().expect("not poisoned");
        let pipe = Arc::get_mut(&mut inner).ok_or_else(|| {
            PyValueError::new_err("load_textual_inversion: the pipeline is generating; load before")
        })?;
        let tokens = attached(|| pipe.load_textual_inversion(&path, token.as_deref()))?;
        self.embeddings.write().expect("not poisoned").push((path, token));
        Ok(tokens)
    }

    /// The local diffusers folder the weights were read from.
    #[getter]
    fn folder(&self) -> PathBuf {
        self.pipe().folder.clone()
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.pipe().device())
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.pipe().dtype())
    }

    #[getter]
    fn variant(&self) -> Option<String> {
        self.variant.clone()
    }

    #[getter]
    fn default_size(&self) -> usize {
        self.pipe().default_size()
    }

    #[getter]
    fn vae_scale_factor(&self) -> usize {
        self.pipe().vae_scale_factor()
    }

    /// The scheduler class named by the model's `model_index.json`.
    #[getter]
    fn scheduler_class(&self) -> String {
        self.pipe().scheduler_class.clone()
    }

    /// The model's `scheduler/scheduler_config.json`, as JSON.
    #[getter]
    fn scheduler_config(&self) -> String {
        self.pipe().scheduler_config.to_json_string()
    }

    /// The UNet's input channels: 4 for text-to-image models, 9 for inpainting ones.
    #[getter]
    fn unet_in_channels(&self) -> usize {
        self.pipe().unet.config().in_channels
    }

    /// The tokenizer's maximum sequence length (77 for CLIP).
    #[getter]
    fn max_prompt_tokens(&self) -> usize {
        self.pipe().tokenizer.max_length()
    }

    /// The part of `prompt` cut off by the tokenizer's length limit, if any.
    fn truncated_text(&self, prompt: &str) -> PyResult<Option<String>> {
        let pipe = self.pipe();
        attached(|| pipe.tokenizer.truncated_text(&pipe.expand_multi_vector_tokens(prompt)?))
    }

    /// Runs the pipeline with the GIL released; sd-core checks every value.
    ///
    /// `args`: the run's arguments as a dict ([`RunArgs`]). `on_step(step_index, timestep)` is
    /// called after each step with the GIL held, with a third argument, the latents as a
    /// `Float32Array`, when `step_latents`. It returns a bool (falsy stops the run with
    /// `GenerationCancelled`) or a pair `(action, latents)`: "continue", "finish" (skip the
    /// remaining steps and decode the latents as they are) or "cancel", and `None` or
    /// replacement latents as float32 bytes. An exception stops the run and is re-raised.
    #[pyo3(signature = (args, on_step=None, step_latents=false))]
    fn generate(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyDict>,
        on_step: Option<Py<PyAny>>,
        step_latents: bool,
    ) -> PyResult<GenerateResult> {
        let (params, output) = RunArgs::params_of(args)?;
        let pipe = self.pipe();
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
                            call_on_step(py, cb, step_latents, p, latents).unwrap_or_else(|e| {
                                *callback_error = Some(e);
                                StepControl::Cancel
                            })
                        })
                    };
                    let hooks =
                        RunHooks { on_step_end: Some(&mut step_hook), ..Default::default() };
                    let out = pipe.generate_with(&params, hooks)?;
                    run_output(&pipe, &params, out, output)
                })
            })
        };
        if let Some(e) = callback_error {
            return Err(e);
        }
        unguard(result)?.into_py(py, output.kind)
    }

    /// Starts a run for step-level batching (text-to-image or image-to-image): checks `args` (as
    /// `generate` takes them), encodes the prompt and prepares the latents, with the GIL
    /// released. Step it with `step_runs`, then `complete_run` it.
    fn start_run(&self, py: Python<'_>, args: &Bound<'_, PyDict>) -> PyResult<ActiveRun> {
        let (params, output) = RunArgs::params_of(args)?;
        let pipe = self.pipe();
        let run = detached(py, {
            let pipe = Arc::clone(&pipe);
            move || pipe.start_run(&params)
        })?;
        let key = run.batch_key().map_err(to_pyerr)?;
        Ok(ActiveRun {
            run: Mutex::new(Some(run)),
            key: (key.latent_size.0, key.latent_size.1, key.context_tokens, key.lora_scale_bits),
            output,
            pipe,
        })
    }

    /// One denoising step of each of `runs`, stacked into as few UNet calls as memory allows,
    /// with the GIL released. The runs must have been started by this pipeline, share a
    /// `batch_key` and have a step left. A run whose own step fails (non-finite values) finishes,
    /// and `complete_run` raises its error; an error raised here failed the whole step.
    fn step_runs(&self, py: Python<'_>, runs: Vec<Py<ActiveRun>>) -> PyResult<()> {
        let pipe = self.pipe();
        let handles: Vec<&ActiveRun> = runs.iter().map(|r| r.get()).collect();
        if handles.iter().any(|r| !Arc::ptr_eq(&r.pipe, &pipe)) {
            return Err(PyValueError::new_err(
                "step_runs: a run was started by another pipeline (or before a reload)",
            ));
        }
        let mut guards = Vec::with_capacity(handles.len());
        for (i, handle) in handles.iter().enumerate() {
            let guard = handle.run.try_lock().map_err(|_| {
                PyValueError::new_err(format!("step_runs: run {i} is being stepped elsewhere"))
            })?;
            if guard.is_none() {
                return Err(PyValueError::new_err(format!("step_runs: run {i} was completed")));
            }
            guards.push(guard);
        }
        let mut active: Vec<&mut sd_core::pipeline::ActiveRun> =
            guards.iter_mut().map(|g| g.as_mut().expect("checked above")).collect();
        let result = py.detach(|| guard(|| pipe.step_runs(&mut active)));
        unguard(result)
    }

    /// Decodes a run (the remaining steps are skipped if any are left, as diffusers' interrupt)
    /// and returns what `generate` would have; raises the error of a run whose step failed. A run
    /// completes once.
    fn complete_run(&self, py: Python<'_>, run: Py<ActiveRun>) -> PyResult<GenerateResult> {
        let handle = run.get();
        let taken = handle.run.lock().map_err(|_| PyValueError::new_err("run poisoned"))?.take();
        let Some(active) = taken else {
            return Err(PyValueError::new_err("complete_run: the run was completed already"));
        };
        let (pipe, output) = (Arc::clone(&handle.pipe), handle.output);
        let result = py.detach(move || {
            guard(|| {
                let params = active.params().clone();
                let out = pipe.complete_run(active)?;
                run_output(&pipe, &params, out, output)
            })
        });
        unguard(result)?.into_py(py, output.kind)
    }

    /// Loads a `.safetensors` LoRA file as adapter `name`, which becomes the only active one.
    fn load_lora(&self, py: Python<'_>, path: PathBuf, name: String) -> PyResult<()> {
        let pipe = self.pipe();
        let (file, adapter) = (path.clone(), name.clone());
        // A file that is not a LoRA we read (pickle, not safetensors, no LoRA layers) is a bad
        // argument here, as in diffusers: ValueError, not the OSError of a model's weights.
        detached(py, move || pipe.load_lora(&file, &adapter)).map_err(config_arg_error)?;
        self.loras.write().expect("not poisoned").push((path, name));
        Ok(())
    }

    /// Makes these `(name, weight)` adapters the active ones.
    fn set_adapters(&self, adapters: Vec<(String, f64)>) -> PyResult<()> {
        attached(|| self.pipe().set_adapters(&adapters))
    }

    /// The active adapters and their weights.
    fn active_adapters(&self) -> Vec<(String, f64)> {
        self.pipe().adapters.active()
    }

    /// The loaded adapters, in load order.
    fn adapter_names(&self) -> Vec<String> {
        self.pipe().adapters.names()
    }

    /// Fuses the active adapters, at their weights times `scale`, into copies of the weights.
    fn fuse_lora(&self, py: Python<'_>, scale: f64) -> PyResult<()> {
        let pipe = self.pipe();
        detached(py, move || pipe.fuse_lora(scale))
    }

    /// Runs the original weights again, bit for bit.
    fn unfuse_lora(&self, py: Python<'_>) {
        let pipe = self.pipe();
        py.detach(move || pipe.unfuse_lora())
    }

    /// Removes the named adapters (all with `None`); fused weights stay until `unfuse_lora`.
    #[pyo3(signature = (names=None))]
    fn unload_lora(&self, py: Python<'_>, names: Option<Vec<String>>) -> PyResult<()> {
        let pipe = self.pipe();
        let unloaded = names.clone();
        detached(py, move || pipe.unload_lora(unloaded.as_deref()))?;
        let gone = |name: &String| names.as_ref().is_none_or(|names| names.contains(name));
        self.loras.write().expect("not poisoned").retain(|(_, name)| !gone(name));
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "_Pipeline(folder={:?}, device={}, dtype={})",
            self.pipe().folder.display().to_string(),
            device_name(self.pipe().device()),
            dtype_name(self.pipe().dtype())
        )
    }
}

/// sd-core's CPU setup (rayon pool, allocator settings) before a CPU pipeline is loaded.
fn init_cpu_for(device: &candle_core::Device) -> sd_core::Result<()> {
    if device.is_cpu() {
        sd_core::runtime::init_cpu(None)?;
    }
    Ok(())
}
