//! Every stage of the pipeline called on its own: tokenize, encode text, run the UNet and a
//! scheduler by hand with classifier-free guidance, decode with the VAE, save a PNG.
//!
//! ```sh
//! cargo run --release -p sd-core --example stages -- tests/fixtures/pipelines/sd2-tiny out.png
//! ```

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_core::pipeline::{to_rgb_images, StableDiffusionPipeline};
use sd_core::rng::Generators;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model =
        PathBuf::from(args.next().unwrap_or_else(|| "tests/fixtures/pipelines/sd2-tiny".into()));
    let out = PathBuf::from(args.next().unwrap_or_else(|| "stages.png".into()));
    let device = Device::Cpu;
    // Opt in to sd-core's CPU thread pool and allocator settings: faster, same image.
    sd_core::runtime::init_cpu(None)?;
    let pipe = StableDiffusionPipeline::from_folder(&model, DType::F32, &device, None)?;

    // 1. Tokenize (77 ids, padded as the model's tokenizer config says).
    let prompt = "a lighthouse on a cliff at sunset";
    let ids = pipe.tokenizer.encode(prompt)?;
    println!("{} tokens, first ids {:?}", ids.len(), &ids[..8]);

    // 2. Encode text: unconditional ("") and conditional embeddings, one batch of 2.
    let ids = Tensor::from_vec(
        [pipe.tokenizer.encode("")?, ids].concat(),
        (2, pipe.tokenizer.max_length()),
        &device,
    )?;
    let context = pipe.text_encoder.forward(&ids)?;

    // 3. Scheduler: Euler, configured from the model's scheduler config (diffusers' from_config).
    let mut scheduler = pipe.scheduler(Some("euler"), None)?;
    scheduler.set_timesteps(10)?;

    // 4. Initial noise from a torch-compatible generator, then the denoising loop.
    let size = pipe.default_size();
    let shape = [
        1,
        pipe.unet.config().in_channels,
        size / pipe.vae_scale_factor(),
        size / pipe.vae_scale_factor(),
    ];
    let mut generators = Generators::from_seeds(&[42], 1)?;
    let mut latents = (generators.randn(&shape, &device)? * scheduler.init_noise_sigma())?;
    let guidance = 7.5;
    for &t in scheduler.timesteps().to_vec().iter() {
        let input = scheduler.scale_model_input(&Tensor::cat(&[&latents, &latents], 0)?, t)?;
        let pred = pipe.unet.forward(&input, t, &context)?;
        let (uncond, cond) = (pred.narrow(0, 0, 1)?, pred.narrow(0, 1, 1)?);
        let guided = (&uncond + ((cond - &uncond)? * guidance)?)?;
        latents = scheduler.step(&guided, t, &latents, &mut generators)?;
    }

    // 5. Decode and save.
    let decoded = pipe.vae.decode(&(latents / pipe.vae.config().scaling_factor)?)?;
    to_rgb_images(&decoded)?[0].save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
