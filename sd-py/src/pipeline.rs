//! The `_Pipeline` class (a loaded sd-core pipeline; the Python `StableDiffusionPipeline` wraps
//! it) and what its `generate` returns.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Tensor};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use sd_core::hub::variant_for;
use sd_core::pipeline::{
    GenerateParams, InitImage, LoadOptions, OutputType, PromptSyntax, RunHooks,
    StableDiffusionPipeline, StepControl, StepProgress,
};
use sd_core::schedulers::SchedulerConfig;

use crate::arrays::{f32_values, tensor_from_f32_bytes, to_unit_hwc, Float32Array};
use crate::device::{device_from_name, device_name, dtype_from_name, dtype_name};
use crate::error::{attached, config_arg_error, detached, guard, to_pyerr, unguard};
use crate::hub::hub_options;

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

/// The `output` argument of `generate`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Pil,
    Np,
    Latent,
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
    ) -> Self {
        Self { inner: RwLock::new(Arc::new(pipe)), variant, embeddings: RwLock::new(embeddings) }
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
        Ok(Self::new(inner, variant, vec![]))
    }

    /// The same model loaded again on `device` in `dtype` (from the resolved local folder).
    fn reload(&self, py: Python<'_>, dtype: &str, device: &str) -> PyResult<Self> {
        let dtype = dtype_from_name(dtype)?;
        let device = device_from_name(device)?;
        let folder = self.pipe().folder.clone();
        let variant = variant_for(self.variant.as_deref(), dtype);
        let embeddings = self.embeddings.read().expect("not poisoned").clone();
        let loaded = embeddings.clone();
        let inner = detached(py, move || {
            init_cpu_for(&device)?;
            let mut pipe =
                StableDiffusionPipeline::from_folder(&folder, dtype, &device, variant.as_deref())?;
            for (path, token) in &loaded {
                pipe.load_textual_inversion(path, token.as_deref())?;
            }
            Ok(pipe)
        })?;
        Ok(Self::new(inner, self.variant.clone(), embeddings))
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
    /// `seeds`: empty (random), one (one generator for the batch) or one per image.
    /// `output`: "pil" (`GenerateResult.images`), "np" (`.array`, float32 `[b, h, w, 3]`) or
    /// "latent" (`.latents`). `on_step(step_index, timestep)` is called after each step with
    /// the GIL held, with a third argument, the latents as a `Float32Array`, when
    /// `step_latents`. It returns a bool (falsy stops the run with `GenerationCancelled`) or a
    /// pair `(action, latents)`: "continue", "finish" (skip the remaining steps and decode the
    /// latents as they are) or "cancel", and `None` or replacement latents as float32 bytes. An
    /// exception stops the run and is re-raised. `latents`: `(float32 bytes, shape)` of the
    /// initial noise, instead of drawing it from the seeds. `prompt_embeds`,
    /// `negative_prompt_embeds`: `(float32 bytes, shape)` of text embeddings, instead of encoding
    /// the prompts (then empty) or the negative prompts. `init_images`: `(width, height, RGB
    /// bytes)` of one image (or one per prompt) to start from (image-to-image), with `mask`
    /// `(width, height, luma bytes)`, white = repaint, for inpainting; `strength` in (0, 1]
    /// (default 0.8 without a mask, 1.0 with one, as diffusers). `clip_skip`: diffusers'
    /// (for the prompts and the negative prompts); `prompt_syntax`: "plain" or "a1111".
    /// `metadata`: also return each image's settings in A1111's infotext format.
    #[pyo3(signature = (prompts, negative_prompts=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=1, seeds=Vec::new(), scheduler=None, scheduler_config=None, output="pil", on_step=None, guidance_rescale=0.0, eta=0.0, step_latents=false, latents=None, prompt_embeds=None, negative_prompt_embeds=None, init_images=None, mask=None, strength=None, clip_skip=None, prompt_syntax="plain", metadata=false))]
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
        init_images: Option<Vec<(u32, u32, Bound<'py, PyBytes>)>>,
        mask: Option<(u32, u32, Bound<'py, PyBytes>)>,
        strength: Option<f64>,
        clip_skip: Option<usize>,
        prompt_syntax: &str,
        metadata: bool,
    ) -> PyResult<GenerateResult> {
        let output = match output {
            "pil" => Output::Pil,
            "np" => Output::Np,
            "latent" => Output::Latent,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown output `{other}` (expected pil, np or latent)"
                )))
            }
        };
        let scheduler_config = match scheduler_config {
            Some(json) => {
                Some(attached(|| SchedulerConfig::from_json_str(&json)).map_err(config_arg_error)?)
            }
            None => None,
        };
        let tensor = |arg: Option<(Bound<'py, PyBytes>, Vec<usize>)>| match arg {
            Some((bytes, shape)) => tensor_from_f32_bytes(bytes.as_bytes(), &shape).map(Some),
            None => Ok(None),
        };
        let params = GenerateParams {
            prompts,
            negative_prompts,
            prompt_embeds: tensor(prompt_embeds)?,
            negative_prompt_embeds: tensor(negative_prompt_embeds)?,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            guidance_rescale,
            eta,
            num_images_per_prompt,
            seeds,
            scheduler,
            scheduler_config,
            output: if output == Output::Pil { OutputType::Image } else { OutputType::Latent },
            latents: tensor(latents)?,
            init_image: init_image(init_images, mask, strength)?,
            clip_skip,
            prompt_syntax: attached(|| prompt_syntax.parse::<PromptSyntax>())?,
        };

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
                    let values = match output {
                        Output::Pil => None,
                        Output::Np => Some(to_unit_hwc(&pipe.decode_latents(&out.latents)?)?),
                        Output::Latent => {
                            let l = out.latents.to_dtype(DType::F32)?;
                            Some((l.flatten_all()?.to_vec1::<f32>()?, l.dims().to_vec()))
                        }
                    };
                    let infotexts = match metadata && output == Output::Pil {
                        true => (0..out.images.len())
                            .map(|i| {
                                Ok(pipe.generation_info(&params, &out, i)?.to_infotext().to_text())
                            })
                            .collect::<sd_core::Result<Vec<_>>>()?,
                        false => Vec::new(),
                    };
                    Ok(RunOutput {
                        images: out.images,
                        values,
                        seeds: out.seeds,
                        timings: out.timings,
                        infotexts,
                    })
                })
            })
        };
        if let Some(e) = callback_error {
            return Err(e);
        }
        unguard(result)?.into_py(py, output)
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

/// An image from `(width, height, bytes)`, checking the byte count.
fn image_from_bytes<P: image::Pixel<Subpixel = u8>>(
    what: &str,
    (width, height, data): (u32, u32, Bound<'_, PyBytes>),
) -> PyResult<image::ImageBuffer<P, Vec<u8>>> {
    let bytes = data.as_bytes().to_vec();
    let len = bytes.len();
    image::ImageBuffer::from_raw(width, height, bytes).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{what}: {len} bytes do not hold a {width}x{height} image of {} channel(s)",
            P::CHANNEL_COUNT
        ))
    })
}

/// The `InitImage` of `generate`'s edit arguments (`None`: text-to-image).
fn init_image(
    images: Option<Vec<(u32, u32, Bound<'_, PyBytes>)>>,
    mask: Option<(u32, u32, Bound<'_, PyBytes>)>,
    strength: Option<f64>,
) -> PyResult<Option<InitImage>> {
    let Some(images) = images else {
        if mask.is_some() || strength.is_some() {
            return Err(PyValueError::new_err("mask and strength need init_images"));
        }
        return Ok(None);
    };
    let images = images
        .into_iter()
        .map(|img| image_from_bytes::<image::Rgb<u8>>("init image", img))
        .collect::<PyResult<Vec<_>>>()?;
    let mask = mask.map(|m| image_from_bytes::<image::Luma<u8>>("mask", m)).transpose()?;
    let default_strength = if mask.is_some() { 1.0 } else { 0.8 };
    Ok(Some(InitImage { images, mask, strength: strength.unwrap_or(default_strength) }))
}

/// sd-core's CPU setup (rayon pool, allocator settings) before a CPU pipeline is loaded.
fn init_cpu_for(device: &candle_core::Device) -> sd_core::Result<()> {
    if device.is_cpu() {
        sd_core::runtime::init_cpu(None)?;
    }
    Ok(())
}
