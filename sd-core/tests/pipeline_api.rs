//! The pipeline's run controls: progress, cancellation, seeds (one generator or one per image),
//! latents output, argument validation, and concurrent calls on one pipeline.

mod support;

use std::sync::Arc;

use candle_core::{DType, Device};
use sd_core::pipeline::{CancelToken, GenerateParams, OutputType, RunHooks, StableDiffusionPipeline};
use sd_core::Error;
use support::*;

fn pipe() -> StableDiffusionPipeline {
    StableDiffusionPipeline::from_folder(&pipelines().join("sd2-tiny"), DType::F32, &Device::Cpu, None).unwrap()
}

fn params(steps: usize) -> GenerateParams {
    let mut p = GenerateParams::new("a red cube on a table");
    p.height = Some(64);
    p.width = Some(64);
    p.num_inference_steps = steps;
    p.seeds = vec![7];
    p
}

#[test]
fn progress_is_reported_every_step_and_can_cancel() {
    let pipe = pipe();
    let mut seen = vec![];
    let mut on_step = |p: &sd_core::pipeline::StepProgress| {
        seen.push((p.step, p.total));
        true
    };
    pipe.generate_with(&params(3), RunHooks { on_step: Some(&mut on_step), cancel: None }).unwrap();
    assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);

    let mut calls = 0;
    let mut stop_after_one = |_: &sd_core::pipeline::StepProgress| {
        calls += 1;
        false
    };
    let err = pipe.generate_with(&params(3), RunHooks { on_step: Some(&mut stop_after_one), cancel: None }).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(calls, 1);

    let token = CancelToken::new();
    token.cancel();
    let err = pipe.generate_with(&params(3), RunHooks { on_step: None, cancel: Some(token) }).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
}

/// Per-image seeds behave like diffusers' list of generators: image i of a batch equals the single
/// image made with seed i.
#[test]
fn per_image_seeds_equal_single_runs() {
    let pipe = pipe();
    let mut batch = params(2);
    batch.num_images_per_prompt = 2;
    batch.seeds = vec![11, 12];
    batch.output = OutputType::Latent;
    let out = pipe.generate(&batch).unwrap();
    assert!(out.images.is_empty());
    for (i, seed) in [11u64, 12].into_iter().enumerate() {
        let mut single = params(2);
        single.seeds = vec![seed];
        single.output = OutputType::Latent;
        let one = pipe.generate(&single).unwrap();
        assert_close(&out.latents.narrow(0, i, 1).unwrap(), &one.latents, 1e-5, &format!("image {i}"));
    }
}

#[test]
fn bad_arguments_are_invalid_argument_errors() {
    let pipe = pipe();
    let cases: Vec<(GenerateParams, &str)> = vec![
        ({ let mut p = params(2); p.height = Some(60); p }, "height"),
        ({ let mut p = params(2); p.width = Some(0); p }, "width"),
        (params(0), "num_inference_steps"),
        ({ let mut p = params(2); p.num_inference_steps = 5000; p }, "5000"),
        ({ let mut p = params(2); p.num_images_per_prompt = 0; p }, "num_images_per_prompt"),
        ({ let mut p = params(2); p.guidance_scale = f64::NAN; p }, "guidance_scale"),
        ({ let mut p = params(2); p.seeds = vec![1, 2, 3]; p }, "seeds"),
        ({ let mut p = params(2); p.prompts = vec![]; p }, "prompt"),
        ({ let mut p = params(2); p.negative_prompts = Some(vec!["a".into(), "b".into()]); p }, "negative"),
        ({ let mut p = params(2); p.scheduler = Some("nope".into()); p }, "nope"),
    ];
    for (p, needle) in cases {
        let err = pipe.generate(&p).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_) | Error::UnknownScheduler { .. }), "{needle}: {err:?}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
}

/// One pipeline, several threads: each call has its own scheduler and generator, so results equal
/// the serial ones.
#[test]
fn concurrent_calls_equal_serial_calls() {
    let pipe = Arc::new(pipe());
    let serial: Vec<_> = (0..3u64)
        .map(|s| {
            let mut p = params(2);
            p.seeds = vec![s];
            pipe.generate(&p).unwrap().images[0].clone()
        })
        .collect();
    let handles: Vec<_> = (0..3u64)
        .map(|s| {
            let pipe = Arc::clone(&pipe);
            std::thread::spawn(move || {
                let mut p = params(2);
                p.seeds = vec![s];
                pipe.generate(&p).unwrap().images[0].clone()
            })
        })
        .collect();
    for (h, expected) in handles.into_iter().zip(serial) {
        assert_eq!(h.join().unwrap(), expected);
    }
}

/// DDIM's eta draws its noise from the run's generator: it changes the result, repeats with the
/// seed, and is refused by schedulers without an eta.
#[test]
fn ddim_eta_is_seeded_and_checked() {
    let pipe = pipe();
    let mut p = params(3);
    p.scheduler = Some("ddim".into());
    p.output = OutputType::Latent;
    let deterministic = pipe.generate(&p).unwrap().latents;
    p.eta = 1.0;
    let a = pipe.generate(&p).unwrap().latents;
    let b = pipe.generate(&p).unwrap().latents;
    assert_close(&a, &b, 0.0, "eta=1 repeats with the same seed");
    assert!(rel_err(&a, &deterministic) > 1e-3, "eta=1 should add noise");
    p.scheduler = Some("euler".into());
    let err = pipe.generate(&p).unwrap_err().to_string();
    assert!(err.contains("eta"), "{err}");
    p.eta = 2.0;
    assert!(pipe.generate(&p).unwrap_err().to_string().contains("between 0 and 1"));
}
