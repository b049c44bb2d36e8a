//! What a run takes and gives back: [`GenerateParams`] in, [`GenerateOutput`] out.

use std::time::Duration;

use candle_core::Tensor;

use crate::prompt::PromptSyntax;
use crate::schedulers::SchedulerConfig;

/// What to return from a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputType {
    /// Decode with the VAE and return RGB images (and the final latents).
    #[default]
    Image,
    /// Skip the VAE; return only the final latents.
    Latent,
}

/// The image (and mask) an edit run starts from: image-to-image without a mask (diffusers'
/// `StableDiffusionImg2ImgPipeline`), inpainting with one (`StableDiffusionInpaintPipeline`).
#[derive(Debug, Clone)]
pub struct InitImage {
    /// One image for all prompts, or one per prompt. They are resized (Lanczos, as Pillow) to
    /// the run's size, which defaults to the first image's, rounded down to a multiple of 8.
    pub images: Vec<image::RgbImage>,
    /// Inpainting: the pixels to repaint are white (binarised at half), the others are kept. Its
    /// size must be that of the first image. Make a luma mask from RGB with
    /// [`to_luma`](super::to_luma), Pillow's conversion, as diffusers does.
    pub mask: Option<image::GrayImage>,
    /// How much of the schedule to run, in (0, 1]: the run starts `strength` of the way from
    /// the end of the schedule, from the image's latents noised to that level (1 starts from
    /// pure noise when inpainting).
    pub strength: f64,
}

impl InitImage {
    /// Image-to-image from one image, with diffusers' default strength 0.8.
    pub fn new(image: image::RgbImage) -> Self {
        Self { images: vec![image], mask: None, strength: 0.8 }
    }

    /// Inpainting of the white region of `mask`, with diffusers' default strength 1.0.
    pub fn with_mask(image: image::RgbImage, mask: image::GrayImage) -> Self {
        Self { images: vec![image], mask: Some(mask), strength: 1.0 }
    }
}

/// The inputs of one run; defaults match diffusers' `__call__`. With an
/// [`init_image`](Self::init_image) the run is image-to-image or inpainting.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// The prompts; empty when `prompt_embeds` are given instead.
    pub prompts: Vec<String>,
    /// One negative prompt per prompt, or a single one for all; `None` means "".
    pub negative_prompts: Option<Vec<String>>,
    /// diffusers' `prompt_embeds`: text embeddings `[prompts, tokens, hidden]` used instead of
    /// encoding `prompts` (which must then be empty), e.g. from a prompt-weighting library.
    pub prompt_embeds: Option<Tensor>,
    /// diffusers' `negative_prompt_embeds`, shaped as the prompt embeddings: used with guidance
    /// instead of encoding the negative prompts (which must then be `None`).
    pub negative_prompt_embeds: Option<Tensor>,
    /// Defaults to the UNet's `sample_size` times the VAE scale factor, or with an init image to
    /// its size rounded down to a multiple of 8.
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_inference_steps: usize,
    /// Classifier-free guidance is used when this is above 1.
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` ("Common Diffusion Noise Schedules and Sample Steps are
    /// Flawed", section 3.4): with guidance and a value above 0, the guided prediction is rescaled
    /// toward the text prediction's standard deviation (`rescale_noise_cfg`). Default 0 (off).
    pub guidance_rescale: f64,
    /// DDIM's `eta` (0 = deterministic DDIM, 1 = DDPM-like noise drawn from the run's generator).
    /// Non-zero values need a scheduler with an `eta` step option.
    pub eta: f64,
    pub num_images_per_prompt: usize,
    /// One seed for the whole batch (one torch generator) or one per image, as diffusers takes a
    /// generator or a list of generators. Empty: a random seed is drawn (see [`GenerateOutput::seeds`]).
    pub seeds: Vec<u64>,
    /// A scheduler name (class name, short or A1111 name); `None` uses the model's own class.
    pub scheduler: Option<String>,
    /// Overrides the model's `scheduler_config.json` (diffusers' `X.from_config(...)`).
    pub scheduler_config: Option<SchedulerConfig>,
    pub output: OutputType,
    /// diffusers' `latents`: the initial noise `[batch, C, h/8, w/8]`, used instead of drawing it
    /// from the seeds, and scaled by the scheduler's `init_noise_sigma` as diffusers does. The
    /// seeds still drive the noise of stochastic schedulers' steps.
    pub latents: Option<Tensor>,
    /// The image (and mask) to start from; `None` is text-to-image.
    pub init_image: Option<InitImage>,
    /// diffusers' `clip_skip`: encode with the output of the text encoder's layer `n - k` (then
    /// its final layer norm), for the prompts and the negative prompts (diffusers 0.42 skips for
    /// the prompts only). `None` or 0: the last layer. Must be below the number of layers.
    pub clip_skip: Option<usize>,
    /// How prompts are read: plain (diffusers) or A1111's weights and long prompts (ours).
    pub prompt_syntax: PromptSyntax,
}

impl GenerateParams {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompts: vec![prompt.into()],
            negative_prompts: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            height: None,
            width: None,
            num_inference_steps: 50,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            eta: 0.0,
            num_images_per_prompt: 1,
            seeds: vec![],
            scheduler: None,
            scheduler_config: None,
            output: OutputType::Image,
            latents: None,
            init_image: None,
            clip_skip: None,
            prompt_syntax: PromptSyntax::Plain,
        }
    }
}

/// Wall time of each stage of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimings {
    pub text_encoder: Duration,
    pub denoise: Duration,
    pub vae_decode: Duration,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// `batch = prompts x num_images_per_prompt` RGB images, prompt-major (empty for latents).
    pub images: Vec<image::RgbImage>,
    /// Final latents `[batch, C, h/8, w/8]` in f32, before the VAE scaling.
    pub latents: Tensor,
    /// The seeds used, so any run can be repeated.
    pub seeds: Vec<u64>,
    pub timings: StageTimings,
}

/// A seed from the OS clock and address-space randomness; printed by callers so a run can be
/// repeated.
pub fn random_seed() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Keep seeds in torch's accepted range and easy to type.
    h.finish() >> 1
}
