//! The pipeline's run controls: progress, cancellation, seeds (one generator or one per image),
//! latents output, argument validation, and concurrent calls on one pipeline.

mod support;

use std::sync::Arc;

use candle_core::{DType, Device};
use sd_core::pipeline::{
    CancelToken, GenerateParams, OutputType, RunHooks, StableDiffusionPipeline, StepControl,
    StepProgress,
};
use sd_core::Error;
use support::*;

fn pipe() -> StableDiffusionPipeline {
    fixture_pipeline("sd2-tiny")
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
    let mut on_step_end = |p: &StepProgress, _: &mut candle_core::Tensor| {
        seen.push((p.step, p.total));
        StepControl::Continue
    };
    pipe.generate_with(
        &params(3),
        RunHooks { on_step_end: Some(&mut on_step_end), ..Default::default() },
    )
    .unwrap();
    assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);

    let mut calls = 0;
    let mut stop_after_one = |_: &StepProgress, _: &mut candle_core::Tensor| {
        calls += 1;
        StepControl::Cancel
    };
    let err = pipe
        .generate_with(
            &params(3),
            RunHooks { on_step_end: Some(&mut stop_after_one), ..Default::default() },
        )
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(calls, 1);

    let token = CancelToken::new();
    token.cancel();
    let err = pipe
        .generate_with(&params(3), RunHooks { cancel: Some(token), ..Default::default() })
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
}

/// `on_step_end` sees the latents after every step; `Finish` skips the remaining steps and
/// decodes the latents of that step (diffusers' `interrupt`), with progress reported up to it.
#[test]
fn finish_decodes_the_latents_of_the_step_it_was_asked_at() {
    let pipe = pipe();
    let mut every_step = vec![];
    let mut keep = |_: &StepProgress, latents: &mut candle_core::Tensor| {
        every_step.push(latents.clone());
        StepControl::Continue
    };
    let full = pipe
        .generate_with(&params(3), RunHooks { on_step_end: Some(&mut keep), ..Default::default() })
        .unwrap();
    assert_eq!(every_step.len(), 3);
    assert_close(&full.latents, &every_step[2], 0.0, "last step latents");

    let mut progress = vec![];
    let mut finish_at_two = |p: &StepProgress, _: &mut candle_core::Tensor| {
        progress.push(p.step);
        if p.step == 2 {
            StepControl::Finish
        } else {
            StepControl::Continue
        }
    };
    let hooks = RunHooks { on_step_end: Some(&mut finish_at_two), ..Default::default() };
    let early = pipe.generate_with(&params(3), hooks).unwrap();
    assert_eq!(progress, vec![1, 2]);
    assert_close(&early.latents, &every_step[1], 0.0, "latents at the finish");
    let expected = pipe.decode_to_images(&every_step[1]).unwrap();
    assert_eq!(early.images.len(), 1);
    assert_eq!(early.images[0].as_raw(), expected[0].as_raw());
    assert_ne!(early.images[0].as_raw(), full.images[0].as_raw());
}

/// A hook may replace the latents (diffusers' callback returning `latents`); the replacement must
/// keep the shape, and `Cancel` stops the run.
#[test]
fn on_step_end_can_replace_the_latents_or_cancel() {
    let pipe = pipe();
    let mut to_zero = |p: &StepProgress, latents: &mut candle_core::Tensor| {
        if p.step == p.total {
            *latents = latents.zeros_like().unwrap().to_dtype(DType::F64).unwrap();
        }
        StepControl::Continue
    };
    let out = pipe
        .generate_with(
            &params(2),
            RunHooks { on_step_end: Some(&mut to_zero), ..Default::default() },
        )
        .unwrap();
    assert_eq!(out.latents.dtype(), DType::F32);
    assert_close(&out.latents, &out.latents.zeros_like().unwrap(), 0.0, "replaced latents");
    let decoded_zeros = pipe.decode_to_images(&out.latents).unwrap();
    assert_eq!(out.images[0].as_raw(), decoded_zeros[0].as_raw());

    let mut wrong_shape = |_: &StepProgress, latents: &mut candle_core::Tensor| {
        *latents = latents.narrow(3, 0, 4).unwrap();
        StepControl::Continue
    };
    let err = pipe
        .generate_with(
            &params(2),
            RunHooks { on_step_end: Some(&mut wrong_shape), ..Default::default() },
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("[1, 4, 8, 4]")), "{err}");

    let mut calls = 0;
    let mut cancel = |_: &StepProgress, _: &mut candle_core::Tensor| {
        calls += 1;
        StepControl::Cancel
    };
    let err = pipe
        .generate_with(
            &params(3),
            RunHooks { on_step_end: Some(&mut cancel), ..Default::default() },
        )
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(calls, 1);
}

/// diffusers' `latents`: given noise replaces the seeded draw (and is scaled by the scheduler's
/// `init_noise_sigma`, here Euler's); its shape must be the run's.
#[test]
fn given_latents_replace_the_seeded_noise() {
    let pipe = pipe();
    let mut seeded = params(2);
    seeded.scheduler = Some("euler".into());
    seeded.output = OutputType::Latent;
    let expected = pipe.generate(&seeded).unwrap();

    let noise = sd_core::rng::Generators::from_seeds(&[7], 1)
        .unwrap()
        .randn(&[1, 4, 8, 8], &Device::Cpu)
        .unwrap();
    let mut given = seeded.clone();
    given.seeds = vec![1234];
    given.latents = Some(noise.to_dtype(DType::F64).unwrap());
    let out = pipe.generate(&given).unwrap();
    assert_close(&out.latents, &expected.latents, 0.0, "latents from the given noise");
    assert_eq!(out.seeds, vec![1234]);

    given.latents = Some(noise.narrow(2, 0, 4).unwrap());
    let err = pipe.generate(&given).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.contains("latents have shape [1, 4, 4, 8], expected [1, 4, 8, 8]")),
        "{err}"
    );
}

/// Prompt embeddings come instead of prompts, with the shapes the model takes.
#[test]
fn prompt_embeds_are_checked() {
    let pipe = pipe();
    let embeds = pipe.encode_prompts(&["a red cube".into(), "a blue ball".into()]).unwrap();
    let hidden = embeds.dim(2).unwrap();
    let with = |f: &dyn Fn(&mut GenerateParams)| {
        let mut p = params(1);
        p.prompts.clear();
        p.prompt_embeds = Some(embeds.clone());
        f(&mut p);
        pipe.generate(&p)
    };
    let two = with(&|_| {}).unwrap();
    assert_eq!(two.images.len(), 2);
    let mut by_prompt = params(1);
    by_prompt.prompts = vec!["a red cube".into(), "a blue ball".into()];
    assert_close(
        &two.latents,
        &pipe.generate(&by_prompt).unwrap().latents,
        0.0,
        "embeddings vs prompts",
    );

    type Change<'a> = Box<dyn Fn(&mut GenerateParams) + 'a>;
    let cases: Vec<(Change, String)> = vec![
        (Box::new(|p| p.prompts = vec!["x".into()]), "prompts or prompt_embeds, not both".into()),
        (
            Box::new(|p| p.prompt_embeds = Some(embeds.narrow(2, 0, 8).unwrap())),
            format!("shape [2, 77, 8], expected [prompts, tokens, {hidden}]"),
        ),
        (
            Box::new(|p| p.prompt_embeds = Some(embeds.get(0).unwrap())),
            "expected [prompts, tokens".into(),
        ),
        (
            Box::new(|p| {
                p.negative_prompts = Some(vec!["x".into()]);
                p.negative_prompt_embeds = Some(embeds.clone())
            }),
            "not both".into(),
        ),
        (
            Box::new(|p| p.negative_prompts = Some(vec!["x".into(), "y".into(), "z".into()])),
            "3 negative prompts for 2 prompts".into(),
        ),
        (
            Box::new(|p| p.negative_prompt_embeds = Some(embeds.narrow(0, 0, 1).unwrap())),
            "negative_prompt_embeds have shape [1, 77,".into(),
        ),
        (
            Box::new(|p| p.prompt_embeds = Some(embeds.narrow(1, 0, 20).unwrap())),
            "prompt_embeds of 20 tokens need negative_prompt_embeds".into(),
        ),
    ];
    for (change, needle) in cases {
        let err = with(&*change).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m.contains(&needle)),
            "{needle}: {err}"
        );
    }
    // Any number of tokens works when both embeddings are given (or without guidance).
    let short = embeds.narrow(1, 0, 20).unwrap();
    with(&|p| {
        p.prompt_embeds = Some(short.clone());
        p.negative_prompt_embeds = Some(short.clone())
    })
    .unwrap();
    with(&|p| {
        p.prompt_embeds = Some(short.clone());
        p.guidance_scale = 1.0
    })
    .unwrap();
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
        assert_close(
            &out.latents.narrow(0, i, 1).unwrap(),
            &one.latents,
            1e-5,
            &format!("image {i}"),
        );
    }
}

#[test]
fn bad_arguments_are_invalid_argument_errors() {
    let pipe = pipe();
    let cases: Vec<(GenerateParams, &str)> = vec![
        (
            {
                let mut p = params(2);
                p.height = Some(60);
                p
            },
            "height",
        ),
        (
            {
                let mut p = params(2);
                p.width = Some(0);
                p
            },
            "width",
        ),
        (params(0), "num_inference_steps"),
        (
            {
                let mut p = params(2);
                p.num_inference_steps = 5000;
                p
            },
            "5000",
        ),
        (
            {
                let mut p = params(2);
                p.num_images_per_prompt = 0;
                p
            },
            "num_images_per_prompt",
        ),
        (
            {
                let mut p = params(2);
                p.guidance_scale = f64::NAN;
                p
            },
            "guidance_scale",
        ),
        (
            {
                let mut p = params(2);
                p.seeds = vec![1, 2, 3];
                p
            },
            "seeds",
        ),
        (
            {
                let mut p = params(2);
                p.prompts = vec![];
                p
            },
            "prompt",
        ),
        (
            {
                let mut p = params(2);
                p.negative_prompts = Some(vec!["a".into(), "b".into()]);
                p
            },
            "negative",
        ),
        (
            {
                let mut p = params(2);
                p.scheduler = Some("nope".into());
                p
            },
            "nope",
        ),
    ];
    for (p, needle) in cases {
        let err = pipe.generate(&p).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_) | Error::UnknownScheduler { .. }),
            "{needle}: {err:?}"
        );
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
