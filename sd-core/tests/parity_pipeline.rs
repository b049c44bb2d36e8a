//! Whole pipelines against diffusers on the tiny fixture models: prompt embeddings, initial noise,
//! every denoising step (UNet input and output, guidance, scheduler step) within 1e-4 relative,
//! and the final 8-bit images within mean |diff| 0.5 and max |diff| 4.

mod support;

use candle_core::{Device, Tensor};
use sd_core::pipeline::{GenerateParams, RunHooks, StepControl, StepProgress};
use sd_core::rng::Generators;
use support::*;

const TOL: f32 = 1e-4;

/// Runs the denoising loop with the stage APIs and compares every intermediate with diffusers.
fn check_steps(name: &str) {
    let case = load_case(name);
    let refs = load_refs(&format!("{name}.safetensors"));
    let pipe = fixture_pipeline(&case.model);
    let guidance = case.guidance_scale > 1.0;
    let n = case.num_images_per_prompt;

    let ids = pipe.tokenizer.encode(&case.prompt).unwrap();
    let expected_ids: Vec<i64> = get(&refs, "input_ids").flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(
        ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        expected_ids,
        "{name}: token ids"
    );
    let cond = pipe.encode_prompts(std::slice::from_ref(&case.prompt)).unwrap();
    assert_close(&cond, get(&refs, "prompt_embeds"), TOL, &format!("{name} prompt_embeds"));
    let mut context = cond.repeat((n, 1, 1)).unwrap();
    if guidance {
        let negative = case.negative_prompt.clone().unwrap_or_default();
        let uncond = pipe.encode_prompts(&[negative]).unwrap();
        assert_close(
            &uncond,
            get(&refs, "negative_prompt_embeds"),
            TOL,
            &format!("{name} negative_prompt_embeds"),
        );
        context = Tensor::cat(&[uncond.repeat((n, 1, 1)).unwrap(), context], 0).unwrap();
    }

    let mut scheduler = pipe.scheduler(Some(&case.scheduler), None).unwrap();
    scheduler.set_timesteps(case.num_inference_steps).unwrap();
    let expected_t: Vec<f32> = get(&refs, "timesteps").to_vec1().unwrap();
    let actual_t: Vec<f32> = scheduler.timesteps().iter().map(|&t| t as f32).collect();
    assert_eq!(actual_t, expected_t, "{name}: timesteps");

    let mut generators = Generators::from_seeds(&[case.seed], n).unwrap();
    let shape = get(&refs, "init_latents").dims().to_vec();
    let mut latents =
        (generators.randn(&shape, &Device::Cpu).unwrap() * scheduler.init_noise_sigma()).unwrap();
    assert_close(&latents, get(&refs, "init_latents"), 1e-6, &format!("{name} init_latents"));

    for (i, &t) in scheduler.timesteps().to_vec().iter().enumerate() {
        let input =
            if guidance { Tensor::cat(&[&latents, &latents], 0).unwrap() } else { latents.clone() };
        let input = scheduler.scale_model_input(&input, t).unwrap();
        assert_close(
            &input,
            get(&refs, &format!("step{i}.model_input")),
            TOL,
            &format!("{name} step {i} model_input"),
        );
        let raw = pipe.unet.forward(&input, t, &context).unwrap();
        assert_close(
            &raw,
            get(&refs, &format!("step{i}.noise_pred_raw")),
            TOL,
            &format!("{name} step {i} unet"),
        );
        let pred = if guidance {
            let (u, c) = (raw.narrow(0, 0, n).unwrap(), raw.narrow(0, n, n).unwrap());
            (&u + ((c - &u).unwrap() * case.guidance_scale).unwrap()).unwrap()
        } else {
            raw
        };
        assert_close(
            &pred,
            get(&refs, &format!("step{i}.noise_pred")),
            TOL,
            &format!("{name} step {i} guidance"),
        );
        latents = scheduler.step(&pred, t, &latents, &mut generators).unwrap();
        assert_close(
            &latents,
            get(&refs, &format!("step{i}.latents")),
            TOL,
            &format!("{name} step {i} latents"),
        );
    }
    let decoded = pipe.decode_latents(&latents).unwrap();
    assert_close(&decoded, get(&refs, "decoded"), TOL, &format!("{name} decoded"));
}

/// Runs `generate` as a user would and compares the final images with diffusers' PNGs, and the
/// latents the step hook sees with those of diffusers' `callback_on_step_end`.
fn check_images(name: &str) {
    let case = load_case(name);
    let refs = load_refs(&format!("{name}.safetensors"));
    let pipe = fixture_pipeline(&case.model);
    let mut step_latents = vec![];
    let mut on_step_end = |_: &StepProgress, latents: &mut Tensor| {
        step_latents.push(latents.clone());
        StepControl::Continue
    };
    let out = pipe
        .generate_with(
            &case.params(),
            RunHooks { on_step_end: Some(&mut on_step_end), ..Default::default() },
        )
        .unwrap();
    assert_eq!(step_latents.len(), case.num_inference_steps);
    for (i, latents) in step_latents.iter().enumerate() {
        assert_close(
            latents,
            get(&refs, &format!("step{i}.latents")),
            TOL,
            &format!("{name} hook latents {i}"),
        );
    }
    let n = case.num_images_per_prompt;
    assert_eq!(out.images.len(), n);
    assert_eq!(out.seeds, vec![case.seed]);
    let last = format!("step{}.latents", case.num_inference_steps - 1);
    assert_close(&out.latents, get(&refs, &last), TOL, &format!("{name} final latents"));
    for (i, img) in out.images.iter().enumerate() {
        assert_eq!((img.width() as usize, img.height() as usize), (case.width, case.height));
        let png = if n == 1 { format!("{name}.png") } else { format!("{name}-{i}.png") };
        let expected = image::open(pipelines().join(&png)).unwrap().to_rgb8();
        assert_image_close(img.as_raw(), expected.as_raw(), &format!("{name} image {i}"));
    }
}

/// diffusers' `latents` argument: its initial noise (DDIM's `init_noise_sigma` is 1) given
/// with another seed gives diffusers' image.
#[test]
fn sd2_ddim_given_latents_images() {
    let case = load_case("sd2_ddim");
    let refs = load_refs("sd2_ddim.safetensors");
    let pipe = fixture_pipeline(&case.model);
    let mut p = case.params();
    p.seeds = vec![case.seed + 1];
    p.latents = Some(get(&refs, "init_latents").clone());
    let out = pipe.generate(&p).unwrap();
    let expected = image::open(pipelines().join("sd2_ddim.png")).unwrap().to_rgb8();
    assert_image_close(out.images[0].as_raw(), expected.as_raw(), "sd2_ddim with given latents");
    let seeded_differently = pipe.generate(&GenerateParams { latents: None, ..p }).unwrap();
    assert_ne!(seeded_differently.images[0].as_raw(), out.images[0].as_raw());
}

/// diffusers' `prompt_embeds` / `negative_prompt_embeds`: the embeddings diffusers computed for
/// the case, given instead of the prompts (with and without the negative ones), give its image.
#[test]
fn sd2_ddim_given_prompt_embeds_images() {
    let case = load_case("sd2_ddim");
    let refs = load_refs("sd2_ddim.safetensors");
    let pipe = fixture_pipeline(&case.model);
    let expected = image::open(pipelines().join("sd2_ddim.png")).unwrap().to_rgb8();
    let mut p = case.params();
    p.prompts.clear();
    p.prompt_embeds = Some(get(&refs, "prompt_embeds").clone());
    let negative_encoded = pipe.generate(&p).unwrap();
    assert_image_close(
        negative_encoded.images[0].as_raw(),
        expected.as_raw(),
        "sd2_ddim with prompt_embeds",
    );
    p.negative_prompts = None;
    p.negative_prompt_embeds = Some(get(&refs, "negative_prompt_embeds").clone());
    let both_given = pipe.generate(&p).unwrap();
    assert_image_close(
        both_given.images[0].as_raw(),
        expected.as_raw(),
        "sd2_ddim with both embeddings",
    );
}

#[test]
fn sd2_ddim_steps() {
    check_steps("sd2_ddim");
}
#[test]
fn sd2_ddim_images() {
    check_images("sd2_ddim");
}
#[test]
fn sd2_euler_nonsquare_two_images_steps() {
    check_steps("sd2_euler");
}
#[test]
fn sd2_euler_nonsquare_two_images() {
    check_images("sd2_euler");
}
#[test]
fn sd2_long_prompt_steps() {
    check_steps("sd2_long");
}
#[test]
fn sd2_long_prompt_images() {
    check_images("sd2_long");
}
#[test]
fn sd2_without_guidance_steps() {
    check_steps("sd2_noguidance");
}
#[test]
fn sd2_without_guidance_images() {
    check_images("sd2_noguidance");
}
#[test]
fn sd1_fp16_variant_euler_steps() {
    check_steps("sd1_euler");
}
#[test]
fn sd1_fp16_variant_euler_images() {
    check_images("sd1_euler");
}
#[test]
fn sd1_fp16_variant_ddim_steps() {
    check_steps("sd1_ddim");
}
#[test]
fn sd1_fp16_variant_ddim_images() {
    check_images("sd1_ddim");
}
