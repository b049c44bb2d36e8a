//! Image-to-image and inpainting against diffusers' `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` on the tiny fixture models (`tests/fixtures/edit`): the
//! preprocessed image and mask (Pillow's Lanczos resize), the generator's draws in diffusers'
//! order and the encoded latents, the timesteps `strength` leaves, the latents after every step,
//! and the final 8-bit images within mean |diff| 0.5 and max |diff| 4.

mod support;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sd_core::pipeline::{
    preprocess_images, preprocess_mask, GenerateParams, InitImage, RunHooks,
    StableDiffusionPipeline, StepControl, StepProgress,
};
use sd_core::rng::Generators;
use support::*;

const TOL: f32 = 1e-4;

/// The parameters of one of diffusers' edit runs (`edit/NAME.json`).
#[derive(Debug, serde::Deserialize)]
struct EditCase {
    pipeline: String,
    model: String,
    scheduler: String,
    prompt: String,
    negative_prompt: Option<String>,
    strength: f64,
    num_inference_steps: usize,
    guidance_scale: f64,
    seed: u64,
    num_images_per_prompt: usize,
    height: usize,
    width: usize,
}

impl EditCase {
    fn load(name: &str) -> Self {
        read_json_file(&edit_fixtures().join(format!("{name}.json")))
    }

    fn is_inpainting(&self) -> bool {
        self.pipeline == "inpaint"
    }

    /// sd2-tiny is shared with the text-to-image fixtures; the inpainting model is the edit's own.
    fn pipeline(&self) -> StableDiffusionPipeline {
        let folder = match self.model.as_str() {
            "sd2-tiny" => pipelines().join("sd2-tiny"),
            other => edit_fixtures().join(other),
        };
        StableDiffusionPipeline::from_folder(&folder, candle_core::DType::F32, &Device::Cpu, None)
            .unwrap()
    }

    fn params(&self) -> GenerateParams {
        let mut p = GenerateParams::new(self.prompt.clone());
        p.negative_prompts = self.negative_prompt.clone().map(|n| vec![n]);
        p.num_inference_steps = self.num_inference_steps;
        p.guidance_scale = self.guidance_scale;
        p.num_images_per_prompt = self.num_images_per_prompt;
        p.seeds = vec![self.seed];
        p.scheduler = Some(self.scheduler.clone());
        let mut init = InitImage::new(init_image());
        if self.is_inpainting() {
            init.mask = Some(mask_image());
        }
        init.strength = self.strength;
        p.init_image = Some(init);
        p
    }
}

fn init_image() -> image::RgbImage {
    image::open(edit_fixtures().join("init.png")).unwrap().to_rgb8()
}

fn mask_image() -> image::GrayImage {
    image::open(edit_fixtures().join("mask.png")).unwrap().to_luma8()
}

fn refs(name: &str) -> HashMap<String, Tensor> {
    read_tensors(&edit_fixtures().join(format!("{name}.safetensors")))
}

/// The preprocessing, the generator's draws and the VAE encodings of a case, stage by stage.
fn check_encoded_latents(name: &str) {
    let case = EditCase::load(name);
    let refs = refs(name);
    let pipe = case.pipeline();
    let size = (case.height, case.width);

    let pixels = preprocess_images(&[init_image()], size, &Device::Cpu).unwrap();
    assert_close(&pixels, get(&refs, "init_image"), 0.0, &format!("{name} init_image"));

    // diffusers' draws: the image's latent sample (unless inpainting with the inpainting UNet at
    // strength 1), the initial noise, then the masked image's latent sample.
    let mut generators = Generators::from_seed(case.seed);
    let n = case.num_images_per_prompt;
    if let Some(expected) = refs.get("image_latents") {
        let latents = pipe.encode_images(&pixels, &mut generators).unwrap();
        let latents = latents.repeat((n, 1, 1, 1)).unwrap();
        assert_close(&latents, expected, TOL, &format!("{name} image_latents"));
    }
    let noise = get(&refs, "noise");
    let drawn = generators.randn(noise.dims(), &Device::Cpu).unwrap();
    assert_close(&drawn, noise, 0.0, &format!("{name} noise"));
    if case.is_inpainting() {
        let mask = preprocess_mask(&mask_image(), size, &Device::Cpu).unwrap();
        assert_close(&mask, get(&refs, "mask_image"), 0.0, &format!("{name} mask_image"));
        let masked = get(&refs, "masked_image");
        let latents = pipe.encode_images(masked, &mut generators).unwrap();
        let latents = latents.repeat((n, 1, 1, 1)).unwrap();
        let expected = get(&refs, "masked_image_latents");
        assert_close(&latents, expected, TOL, &format!("{name} masked_image_latents"));
    }
}

/// `generate` as a user calls it: the timesteps run and the latents after every step (as the
/// step hook sees them, after inpainting's blending) against diffusers', then the images.
fn check_run(name: &str) {
    let case = EditCase::load(name);
    let refs = refs(name);
    let pipe = case.pipeline();
    let mut seen = vec![];
    let mut on_step_end = |p: &StepProgress, latents: &mut Tensor| {
        seen.push((p.timestep, latents.clone()));
        StepControl::Continue
    };
    let hooks = RunHooks { on_step_end: Some(&mut on_step_end), ..Default::default() };
    let out = pipe.generate_with(&case.params(), hooks).unwrap();

    let expected_t: Vec<f64> = get(&refs, "timesteps").to_vec1().unwrap();
    let actual_t: Vec<f64> = seen.iter().map(|(t, _)| *t).collect();
    assert_eq!(actual_t, expected_t, "{name}: timesteps");
    for (i, (_, latents)) in seen.iter().enumerate() {
        let expected = get(&refs, &format!("step{i}.latents"));
        assert_close(latents, expected, TOL, &format!("{name} step {i} latents"));
    }
    let n = case.num_images_per_prompt;
    assert_eq!(out.images.len(), n);
    for (i, img) in out.images.iter().enumerate() {
        assert_eq!((img.width() as usize, img.height() as usize), (case.width, case.height));
        let png = if n == 1 { format!("{name}.png") } else { format!("{name}-{i}.png") };
        let expected = image::open(edit_fixtures().join(&png)).unwrap().to_rgb8();
        assert_image_close(img.as_raw(), expected.as_raw(), &format!("{name} image {i}"));
    }
}

#[test]
fn img2img_heun_encoded_latents() {
    check_encoded_latents("img2img_heun");
}
#[test]
fn img2img_heun_run() {
    check_run("img2img_heun");
}
#[test]
fn img2img_euler_two_images_encoded_latents() {
    check_encoded_latents("img2img_euler_two");
}
#[test]
fn img2img_euler_two_images_run() {
    check_run("img2img_euler_two");
}
#[test]
fn inpaint_plain_unet_euler_a_encoded_latents() {
    check_encoded_latents("inpaint4_euler_a");
}
#[test]
fn inpaint_plain_unet_euler_a_run() {
    check_run("inpaint4_euler_a");
}
#[test]
fn inpaint_plain_unet_strength_07_encoded_latents() {
    check_encoded_latents("inpaint4_euler_a_s07");
}
#[test]
fn inpaint_plain_unet_strength_07_run() {
    check_run("inpaint4_euler_a_s07");
}
#[test]
fn inpaint_9_channel_unet_ddim_encoded_latents() {
    check_encoded_latents("inpaint9_ddim");
}
#[test]
fn inpaint_9_channel_unet_ddim_run() {
    check_run("inpaint9_ddim");
}

/// Bad edit inputs are refused before any model runs, with a message that says what is wrong.
#[test]
fn invalid_edit_inputs_are_refused() {
    let plain = fixture_pipeline("sd2-tiny");
    let inpainting = EditCase::load("inpaint9_ddim").pipeline();
    let base = EditCase::load("inpaint4_euler_a").params();
    let error = |pipe: &StableDiffusionPipeline, change: &dyn Fn(&mut GenerateParams)| {
        let mut p = base.clone();
        change(&mut p);
        pipe.generate(&p).unwrap_err().to_string()
    };
    let init = |p: &mut GenerateParams| p.init_image.as_mut().unwrap().clone();
    for strength in [0.0, -0.5, 1.5, f64::NAN] {
        let msg = error(&plain, &|p| p.init_image.as_mut().unwrap().strength = strength);
        assert!(msg.contains("strength must be in (0, 1]"), "{msg}");
    }
    let msg = error(&plain, &|p| p.init_image.as_mut().unwrap().strength = 0.1);
    assert!(msg.contains("leaves no step"), "{msg}");
    let msg = error(&plain, &|p| {
        p.init_image.as_mut().unwrap().mask = Some(image::GrayImage::new(8, 8));
    });
    assert!(msg.contains("the mask is 8x8 but the image is 75x61"), "{msg}");
    let msg = error(&inpainting, &|p| p.init_image.as_mut().unwrap().mask = None);
    assert!(msg.contains("9 input channels") && msg.contains("mask"), "{msg}");
    let msg = error(&inpainting, &|p| p.init_image = None);
    assert!(msg.contains("9 input channels") && msg.contains("mask"), "{msg}");
    let msg = error(&plain, &|p| {
        let mut more = init(p);
        more.images = vec![init_image(); 2];
        p.init_image = Some(more);
    });
    assert!(msg.contains("2 init images for 1 prompts"), "{msg}");
    let msg = error(&plain, &|p| {
        p.latents =
            Some(Tensor::zeros((1, 4, 7, 9), candle_core::DType::F32, &Device::Cpu).unwrap())
    });
    assert!(msg.contains("latents cannot be given with an init image"), "{msg}");
}
