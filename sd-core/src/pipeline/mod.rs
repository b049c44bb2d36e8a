//! `StableDiffusionPipeline`: tokenizer, text encoder, UNet, scheduler and VAE tied together as
//! diffusers' text-to-image, image-to-image and inpainting pipelines do it (classifier-free
//! guidance as one batch of 2, torch-compatible seeds, per-step hooks and cancellation).
//!
//! A run reads like diffusers' `__call__`, one function per step:
//!
//! | step | where |
//! |---|---|
//! | the run, numbered steps ([`StableDiffusionPipeline::generate_with`]) | `text2img.rs`; with an [`InitImage`] `img2img.rs` or `inpaint.rs` |
//! | 1. check inputs | `validate.rs` |
//! | 2.-4. scheduler and timesteps, encode the prompt, prepare latents | `text2img.rs` (`strength`'s timesteps and the VAE encoding in `img2img.rs`) |
//! | edit runs: image and mask preprocessing ([`preprocess_images`], [`preprocess_mask`]) | `preprocess.rs`, `resample.rs` (Pillow's Lanczos) |
//! | 5. denoising loop and guidance ([`rescale_noise_cfg`]) | `denoise.rs` |
//! | step-level batching: runs stepped by the caller, several per UNet call ([`ActiveRun`]) | `step_batch.rs` |
//! | 6. decode ([`StableDiffusionPipeline::decode_latents`]) and postprocess ([`to_rgb_images`]) | `stable_diffusion.rs`, `postprocess.rs` |
//!
//! Loading ([`StableDiffusionPipeline::from_pretrained`]) and the stages on their own are in
//! `stable_diffusion.rs`; a run's arguments and results in `params.rs`; its hooks in `hooks.rs`;
//! device and dtype names in `device.rs`; the settings of an image as A1111's metadata text in
//! `infotext.rs`; the checks that stop a run at NaN or inf in
//! `finite.rs`; the image cap and memory estimate that refuse runs too large in `memory.rs`.

mod denoise;
mod device;
mod finite;
mod hooks;
mod img2img;
mod infotext;
mod inpaint;
mod memory;
mod params;
mod postprocess;
mod preprocess;
mod resample;
mod stable_diffusion;
mod step_batch;
mod text2img;
mod validate;

pub use crate::prompt::PromptSyntax;
pub use denoise::rescale_noise_cfg;
pub use device::{parse_device, parse_dtype};
pub use hooks::{CancelToken, OnStepEnd, RunHooks, StepControl, StepProgress};
pub use memory::{DEFAULT_MAX_IMAGES_PER_RUN, MODEL_CALL_BUDGET};
pub use params::{
    random_seed, GenerateOutput, GenerateParams, InitImage, OutputType, StageTimings,
};
pub use postprocess::to_rgb_images;
pub use preprocess::{preprocess_images, preprocess_mask, to_luma};
pub use stable_diffusion::{LoadOptions, StableDiffusionPipeline};
pub use step_batch::{ActiveRun, BatchKey};
