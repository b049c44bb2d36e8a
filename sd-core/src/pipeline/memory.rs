//! Refuses runs too large to fit before anything is allocated: a cap on the images of one run
//! and a rough estimate of the memory the run needs, compared with what the machine has free.

use super::StableDiffusionPipeline;
use crate::{Error, Result};

/// The default of `SD_MAX_IMAGES_PER_RUN`, the most images (prompts x images per prompt) one
/// run may make.
pub const DEFAULT_MAX_IMAGES_PER_RUN: usize = 1024;

/// Live f32 feature maps of one UNet sample, in units of its largest feature map
/// (`block_out_channels[0] x h/8 x w/8`): a resnet's inputs and intermediates plus the skip
/// connections kept for the up blocks. The CPU attention is tiled, so no score matrix counts.
const UNET_MAPS_PER_SAMPLE: f64 = 16.0;
/// The same for one VAE decode, in units of its full-resolution map (`block_out_channels[0] x
/// H x W`).
const VAE_MAPS_PER_IMAGE: f64 = 4.0;
/// The activation bytes one UNet or VAE call may take before a batch is split
/// ([`StableDiffusionPipeline::model_batch`]): 8 GiB, 7 images of 768 px per VAE decode.
pub const MODEL_CALL_BUDGET: f64 = 8.0 * GIB;
const GIB: f64 = (1u64 << 30) as f64;

impl StableDiffusionPipeline {
    /// Checks the image count of a run against `SD_MAX_IMAGES_PER_RUN` and its estimated memory
    /// ([`Self::estimate_run_bytes`]) against the free memory (CPU only: `/proc/meminfo`'s
    /// `MemAvailable`; elsewhere only the cap applies). Returns the batch size.
    pub(super) fn check_run_size(
        &self,
        prompts: usize,
        per_prompt: usize,
        size: (usize, usize),
    ) -> Result<usize> {
        // u128: 10^9 images per prompt times many prompts must not overflow.
        let images = prompts as u128 * per_prompt as u128;
        let cap = max_images_per_run()?;
        if images > cap as u128 {
            return Err(Error::invalid(format!(
                "{images} images ({prompts} prompts x {per_prompt} per prompt) exceed the limit of {cap} images per run (set SD_MAX_IMAGES_PER_RUN to change it)"
            )));
        }
        // Below the cap the product fits in a usize.
        let batch = prompts * per_prompt;
        if let Some(available) = self.available_memory() {
            let needed = self.estimate_run_bytes(batch, size);
            if needed > available as f64 {
                return Err(Error::invalid(format!(
                    "{batch} images of {}x{} need an estimated {:.1} GiB, more than the {:.1} GiB of memory available",
                    size.1,
                    size.0,
                    needed / GIB,
                    available as f64 / GIB
                )));
            }
        }
        Ok(batch)
    }

    /// A rough, deliberately generous estimate of a run's peak memory in bytes (f32 throughout):
    /// for the whole batch the latents (with the noise prediction and scheduler state, 4
    /// copies), the text embeddings of the guidance batch and the decoded images (f32 and u8),
    /// plus the activations of one UNet or VAE call at the sub-batch size ([`Self::model_batch`]).
    pub fn estimate_run_bytes(&self, batch: usize, (height, width): (usize, usize)) -> f64 {
        let scale = self.vae_scale_factor() as f64;
        let (h, w) = (height as f64, width as f64);
        let latent_pixels = (h / scale) * (w / scale);
        let f32_elements = 4.0 * self.vae.config().latent_channels as f64 * latent_pixels
            + 2.0 * (self.tokenizer.max_length() * self.unet.config().cross_attention_dim) as f64
            + 3.0 * h * w;
        let u8_image = 3.0 * h * w;
        let per_call = batch.min(self.model_batch((height, width))) as f64;
        batch as f64 * (4.0 * f32_elements + u8_image)
            + per_call * self.activation_bytes_per_image((height, width))
    }

    /// The most images one UNet call (their guidance pair) or VAE decode takes at once: the
    /// one set by [`Self::set_max_model_batch`], else as many as fit [`MODEL_CALL_BUDGET`]
    /// (at least 1). Larger batches run in sub-batches; each draw of the run stays as it is.
    pub fn model_batch(&self, (height, width): (usize, usize)) -> usize {
        self.max_model_batch.unwrap_or_else(|| {
            let fit = MODEL_CALL_BUDGET / self.activation_bytes_per_image((height, width));
            (fit as usize).max(1)
        })
    }

    /// Sets the most images per UNet or VAE call (`None`: estimated, see [`Self::model_batch`]).
    /// Results stay equal within rounding; mostly for tests and memory-tight machines.
    pub fn set_max_model_batch(&mut self, images: Option<usize>) {
        self.max_model_batch = images.map(|n| n.max(1));
    }

    /// Bytes of the larger of one image's UNet activations (2 samples with guidance) and its
    /// VAE decode activations, f32.
    fn activation_bytes_per_image(&self, (height, width): (usize, usize)) -> f64 {
        let scale = self.vae_scale_factor() as f64;
        let (h, w) = (height as f64, width as f64);
        let unet = 2.0
            * UNET_MAPS_PER_SAMPLE
            * self.unet.config().block_out_channels[0] as f64
            * (h / scale)
            * (w / scale);
        let vae = VAE_MAPS_PER_IMAGE * self.vae.config().block_out_channels[0] as f64 * h * w;
        4.0 * unet.max(vae)
    }

    fn available_memory(&self) -> Option<u64> {
        if !self.device().is_cpu() {
            return None;
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// `SD_MAX_IMAGES_PER_RUN`, or [`DEFAULT_MAX_IMAGES_PER_RUN`] when unset.
fn max_images_per_run() -> Result<usize> {
    match std::env::var("SD_MAX_IMAGES_PER_RUN") {
        Ok(v) => v.trim().parse().map_err(|_| {
            Error::invalid(format!("SD_MAX_IMAGES_PER_RUN must be a whole number, got {v:?}"))
        }),
        Err(_) => Ok(DEFAULT_MAX_IMAGES_PER_RUN),
    }
}
