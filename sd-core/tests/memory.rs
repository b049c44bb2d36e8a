//! Absurd image counts are refused up front with an error, never an allocator abort: a cap on
//! the images of one run (`SD_MAX_IMAGES_PER_RUN`) and an estimate of the run's memory checked
//! against the memory available, both before the prompt is encoded.

mod support;

use std::time::{Duration, Instant};

use sd_core::pipeline::{GenerateParams, DEFAULT_MAX_IMAGES_PER_RUN};
use sd_core::Error;
use support::*;

fn params(images: usize) -> GenerateParams {
    let mut p = GenerateParams::new("a red cube on a table");
    p.height = Some(64);
    p.width = Some(64);
    p.num_inference_steps = 2;
    p.seeds = vec![7];
    p.num_images_per_prompt = images;
    p
}

fn invalid_argument(p: &GenerateParams) -> String {
    let started = Instant::now();
    let err = fixture_pipeline("sd2-tiny").generate(p).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "refused too slowly");
    match err {
        Error::InvalidArgument(msg) => msg,
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

#[test]
fn a_billion_images_are_refused_by_the_cap() {
    let msg = invalid_argument(&params(1_000_000_000));
    assert!(
        msg.contains("1000000000 images (1 prompts x 1000000000 per prompt) exceed the limit")
            && msg.contains(&format!("{DEFAULT_MAX_IMAGES_PER_RUN} images per run")),
        "{msg}"
    );
}

#[test]
fn an_image_count_whose_product_overflows_is_refused() {
    let mut p = params(usize::MAX);
    p.prompts = vec!["a".into(), "b".into()];
    let msg = invalid_argument(&p);
    assert!(msg.contains(&format!("{} images", 2 * usize::MAX as u128)), "{msg}");
}

#[test]
#[cfg(target_os = "linux")]
fn a_run_larger_than_the_available_memory_is_refused() {
    // Under the image cap, but 1000 images of 4096x4096 need terabytes.
    let mut p = params(1000);
    p.height = Some(4096);
    p.width = Some(4096);
    let msg = invalid_argument(&p);
    assert!(msg.starts_with("1000 images of 4096x4096 need an estimated"), "{msg}");
    assert!(msg.contains("GiB of memory available"), "{msg}");
}

#[test]
fn a_normal_run_fits_the_estimate() {
    let pipe = fixture_pipeline("sd2-tiny");
    // The tiny model's 2 images at 64 px need a few MiB.
    assert!(pipe.estimate_run_bytes(2, (64, 64)) < 64.0 * 1024.0 * 1024.0);
    let out = pipe.generate(&params(2)).unwrap();
    assert_eq!(out.images.len(), 2);
}

/// Sub-batches keep diffusers' draws: the 2-image `sd2_euler` case run one image per UNet and
/// VAE call matches the whole-batch run and diffusers.
#[test]
fn a_run_in_sub_batches_of_one_image_matches_the_whole_batch() {
    let case = load_case("sd2_euler");
    let refs = load_refs("sd2_euler.safetensors");
    let mut p = GenerateParams::new(case.prompt.clone());
    p.negative_prompts = case.negative_prompt.clone().map(|n| vec![n]);
    (p.height, p.width) = (Some(case.height), Some(case.width));
    p.num_inference_steps = case.num_inference_steps;
    p.guidance_scale = case.guidance_scale;
    p.num_images_per_prompt = case.num_images_per_prompt;
    p.seeds = vec![case.seed];
    p.scheduler = Some(case.scheduler.clone());
    assert_eq!(case.num_images_per_prompt, 2);

    let mut pipe = fixture_pipeline(&case.model);
    let whole = pipe.generate(&p).unwrap();
    pipe.set_max_model_batch(Some(1));
    let chunked = pipe.generate(&p).unwrap();
    assert_close(&chunked.latents, &whole.latents, 1e-4, "chunked vs whole-batch latents");
    let last = format!("step{}.latents", case.num_inference_steps - 1);
    assert_close(&chunked.latents, get(&refs, &last), 1e-4, "chunked vs diffusers latents");
    for (i, (a, b)) in chunked.images.iter().zip(&whole.images).enumerate() {
        assert_image_close(a.as_raw(), b.as_raw(), &format!("chunked image {i}"));
        let expected = image::open(pipelines().join(format!("sd2_euler-{i}.png"))).unwrap();
        assert_image_close(a.as_raw(), expected.to_rgb8().as_raw(), &format!("image {i}"));
    }
}
