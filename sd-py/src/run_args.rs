//! The arguments of a run, as `_Pipeline.generate` and `_Pipeline.start_run` take them: one dict
//! (built by `sd_py`'s pipelines), read into sd-core's `GenerateParams`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use sd_core::pipeline::{GenerateParams, InitImage, OutputType, PromptSyntax};
use sd_core::schedulers::SchedulerConfig;

use crate::arrays::tensor_from_f32_bytes;
use crate::error::{attached, config_arg_error};

/// What a run returns (`output`): "pil" images, an "np" array, or the "latent"s.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Pil,
    Np,
    Latent,
}

/// The output of a run and whether its images carry their settings text (`metadata`).
#[derive(Clone, Copy)]
pub struct OutputChoice {
    pub kind: Output,
    pub metadata: bool,
}

/// A run's arguments; sd-core checks every value.
///
/// `seeds`: empty (random), one (one generator for the batch) or one per image. `output`: "pil",
/// "np" (float32 `[b, h, w, 3]`) or "latent". `latents`: `(float32 bytes, shape)` of the initial
/// noise, instead of drawing it from the seeds. `prompt_embeds`, `negative_prompt_embeds`:
/// `(float32 bytes, shape)` of text embeddings, instead of encoding the prompts (then empty) or
/// the negative prompts. `init_images`: `(width, height, RGB bytes)` of one image (or one per
/// prompt) to start from (image-to-image), with `mask` `(width, height, luma bytes)`, white =
/// repaint, for inpainting; `strength` in (0, 1] (default 0.8 without a mask, 1.0 with one, as
/// diffusers). `clip_skip`: diffusers' (for the prompts and the negative prompts);
/// `prompt_syntax`: "plain" or "a1111". `metadata`: also return each image's settings in A1111's
/// infotext format. `lora_scale`: the factor of the active unfused LoRAs (diffusers'
/// `cross_attention_kwargs["scale"]`, default 1).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct RunArgs<'py> {
    prompts: Vec<String>,
    #[pyo3(default)]
    negative_prompts: Option<Vec<String>>,
    #[pyo3(default)]
    height: Option<usize>,
    #[pyo3(default)]
    width: Option<usize>,
    #[pyo3(default = 50)]
    num_inference_steps: usize,
    #[pyo3(default = 7.5)]
    guidance_scale: f64,
    #[pyo3(default = 1)]
    num_images_per_prompt: usize,
    #[pyo3(default)]
    seeds: Vec<u64>,
    #[pyo3(default)]
    scheduler: Option<String>,
    #[pyo3(default)]
    scheduler_config: Option<String>,
    #[pyo3(default = "pil".to_string())]
    output: String,
    #[pyo3(default)]
    guidance_rescale: f64,
    #[pyo3(default)]
    eta: f64,
    #[pyo3(default)]
    latents: Option<(Bound<'py, PyBytes>, Vec<usize>)>,
    #[pyo3(default)]
    prompt_embeds: Option<(Bound<'py, PyBytes>, Vec<usize>)>,
    #[pyo3(default)]
    negative_prompt_embeds: Option<(Bound<'py, PyBytes>, Vec<usize>)>,
    #[pyo3(default)]
    init_images: Option<Vec<(u32, u32, Bound<'py, PyBytes>)>>,
    #[pyo3(default)]
    mask: Option<(u32, u32, Bound<'py, PyBytes>)>,
    #[pyo3(default)]
    strength: Option<f64>,
    #[pyo3(default)]
    clip_skip: Option<usize>,
    #[pyo3(default = "plain".to_string())]
    prompt_syntax: String,
    #[pyo3(default)]
    metadata: bool,
    #[pyo3(default)]
    lora_scale: Option<f64>,
}

/// The keys `RunArgs` reads: any other key is a mistake of the caller, refused rather than
/// silently ignored.
const KEYS: &[&str] = &[
    "prompts",
    "negative_prompts",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "num_images_per_prompt",
    "seeds",
    "scheduler",
    "scheduler_config",
    "output",
    "guidance_rescale",
    "eta",
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "init_images",
    "mask",
    "strength",
    "clip_skip",
    "prompt_syntax",
    "metadata",
    "lora_scale",
];

impl RunArgs<'_> {
    /// The `GenerateParams` and output of the run `args` describes.
    pub fn params_of(args: &Bound<'_, PyDict>) -> PyResult<(GenerateParams, OutputChoice)> {
        for key in args.keys() {
            let key: String = key.extract()?;
            if !KEYS.contains(&key.as_str()) {
                return Err(PyValueError::new_err(format!("unknown run argument `{key}`")));
            }
        }
        args.extract::<RunArgs>()?.into_params()
    }

    fn into_params(self) -> PyResult<(GenerateParams, OutputChoice)> {
        let kind = match self.output.as_str() {
            "pil" => Output::Pil,
            "np" => Output::Np,
            "latent" => Output::Latent,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown output `{other}` (expected pil, np or latent)"
                )))
            }
        };
        let scheduler_config = match self.scheduler_config {
            Some(json) => {
                Some(attached(|| SchedulerConfig::from_json_str(&json)).map_err(config_arg_error)?)
            }
            None => None,
        };
        let tensor = |arg: Option<(Bound<'_, PyBytes>, Vec<usize>)>| match arg {
            Some((bytes, shape)) => tensor_from_f32_bytes(bytes.as_bytes(), &shape).map(Some),
            None => Ok(None),
        };
        let params = GenerateParams {
            prompts: self.prompts,
            negative_prompts: self.negative_prompts,
            prompt_embeds: tensor(self.prompt_embeds)?,
            negative_prompt_embeds: tensor(self.negative_prompt_embeds)?,
            height: self.height,
            width: self.width,
            num_inference_steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
            guidance_rescale: self.guidance_rescale,
            eta: self.eta,
            num_images_per_prompt: self.num_images_per_prompt,
            seeds: self.seeds,
            scheduler: self.scheduler,
            scheduler_config,
            output: if kind == Output::Pil { OutputType::Image } else { OutputType::Latent },
            latents: tensor(self.latents)?,
            init_image: init_image(self.init_images, self.mask, self.strength)?,
            clip_skip: self.clip_skip,
            prompt_syntax: attached(|| self.prompt_syntax.parse::<PromptSyntax>())?,
            lora_scale: self.lora_scale,
        };
        Ok((params, OutputChoice { kind, metadata: self.metadata }))
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
