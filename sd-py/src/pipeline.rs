//! The `_Pipeline` class (a loaded sd-core pipeline; the Python `StableDiffusionPipeline` wraps
//! it) and what its `generate` returns.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use sd_core::hub::variant_for;
use sd_core::pipeline::{
    GenerateParams, InitImage, LoadOptions, OutputType, RunHooks, StableDiffusionPipeline,
    StepControl, StepProgress,
};
use sd_core::schedulers::SchedulerConfig;

use crate::arrays::{f32_values, tensor_from_f32_bytes, to_unit_hwc, Float32Array};
use crate::device::{device_from_name, device_name, dtype_from_name, dtype_name};
use crate::error::{attached, config_arg_error, detached, guard, to_pyerr, unguard};
use crate::hub::hub_options;

/// A loaded sd-core pipeline (the Python class `StableDiffusionPipeline` wraps it).
#[pyclass(frozen, name = "_Pipeline", module = "sd_py._sd_py")]
pub struct PyPipeline {
    inner: Arc<StableDiffusionPipeline>,
    /// The variant asked for at load time (`None`: sd-core's default for the dtype).
    variant: Option<String>,
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
        Ok(Self { inner: Arc::new(inner), variant })
    }

    /// The same model loaded again on `device` in `dtype` (from the resolved local folder).
    fn reload(&self, py: Python<'_>, dtype: &str, device: &str) -> PyResult<Self> {
        let dtype = dtype_from_name(dtype)?;
        let device = device_from_name(device)?;
        let folder = self.inner.folder.clone();
        let variant = variant_for(self.variant.as_deref(), dtype);
        let inner = detached(py, move || {
            init_cpu_for(&device)?;
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

    /// The UNet's input channels: 4 for text-to-image models, 9 for inpainting ones.
    #[getter]
    fn unet_in_channels(&self) -> usize {
        self.inner.unet.config().in_channels
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
    /// (default 0.8 without a mask, 1.0 with one, as diffusers). `lora_scale`: the factor of the
    /// active unfused LoRAs (diffusers' `cross_attention_kwargs["scale"]`, default 1).
    #[pyo3(signature = (prompts, negative_prompts=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=1, seeds=Vec::new(), scheduler=None, scheduler_config=None, output="pil", on_step=None, guidance_rescale=0.0, eta=0.0, step_latents=false, latents=None, prompt_embeds=None, negative_prompt_embeds=None, init_images=None, mask=None, strength=None, lora_scale=None))]
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
        lora_scale: Option<f64>,
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
            lora_scale,
        };

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
                    Ok(RunOutput {
                        images: out.images,
                        values,
                        seeds: out.seeds,
                        timings: out.timings,
                    })
                })
            })
        };
        if let Some(e) = callback_error {
            return Err(e);
        }
        unguard(result)?.into_py(py, output)
    }

    /// Loads a `.safetensors` LoRA file as adapter `name`, which becomes the only active one.
    fn load_lora(&self, py: Python<'_>, path: PathBuf, name: String) -> PyResult<()> {
        let pipe = Arc::clone(&self.inner);
        detached(py, move || pipe.load_lora(&path, &name))
    }

    /// Makes these `(name, weight)` adapters the active ones.
    fn set_adapters(&self, adapters: Vec<(String, f64)>) -> PyResult<()> {
        attached(|| self.inner.set_adapters(&adapters))
    }

    /// The active adapters and their weights.
    fn active_adapters(&self) -> Vec<(String, f64)> {
        self.inner.adapters.active()
    }

    /// The loaded adapters, in load order.
    fn adapter_names(&self) -> Vec<String> {
        self.inner.adapters.names()
    }

    /// Fuses the active adapters, at their weights times `scale`, into copies of the weights.
    fn fuse_lora(&self, py: Python<'_>, scale: f64) -> PyResult<()> {
        let pipe = Arc::clone(&self.inner);
        detached(py, move || pipe.fuse_lora(scale))
    }

    /// Runs the original weights again, bit for bit.
    fn unfuse_lora(&self, py: Python<'_>) {
        let pipe = Arc::clone(&self.inner);
        py.detach(move || pipe.unfuse_lora())
    }

    /// Removes the named adapters (all with `None`); fused weights stay until `unfuse_lora`.
    #[pyo3(signature = (names=None))]
    fn unload_lora(&self, py: Python<'_>, names: Option<Vec<String>>) -> PyResult<()> {
        let pipe = Arc::clone(&self.inner);
        detached(py, move || pipe.unload_lora(names.as_deref()))
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
