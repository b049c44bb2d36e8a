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
