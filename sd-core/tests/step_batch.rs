//! Step-level batching (`start_run` / `step_runs` / `complete_run`): runs that join and leave a
//! batch between steps, at different steps of different schedulers, with and without guidance,
//! give the images of diffusers and of `generate` alone.

mod support;

use candle_core::{DType, Device, Tensor};
use sd_core::pipeline::{
    ActiveRun, GenerateOutput, GenerateParams, InitImage, StableDiffusionPipeline,
};
use sd_core::Error;
use support::*;

fn case_params(name: &str) -> GenerateParams {
    load_case(name).params()
}

/// An ancestral scheduler (it draws noise at every step from the run's own generators).
fn euler_a_params() -> GenerateParams {
    let mut p = case_params("sd2_ddim");
    p.scheduler = Some("euler_a".into());
    p.seeds = vec![7];
    p.num_inference_steps = 4;
    p
}

/// Steps `runs` together and completes those that finished, keeping their outputs by index.
fn tick(
    pipe: &StableDiffusionPipeline,
    active: &mut Vec<(usize, ActiveRun)>,
    done: &mut [Option<GenerateOutput>],
) {
    let mut runs: Vec<&mut ActiveRun> = active.iter_mut().map(|(_, run)| run).collect();
    pipe.step_runs(&mut runs).unwrap();
    let (finished, running): (Vec<_>, Vec<_>) =
        active.drain(..).partition(|(_, run)| run.is_finished());
    *active = running;
    for (i, run) in finished {
        done[i] = Some(pipe.complete_run(run).unwrap());
    }
}

/// Runs `params` through a schedule where they join at different ticks: run 0 alone first, runs
/// 1 and 2 join at the next tick, run 3 once runs 1 and 2 have left.
fn staggered(pipe: &StableDiffusionPipeline, params: &[GenerateParams]) -> Vec<GenerateOutput> {
    let mut done: Vec<Option<GenerateOutput>> = params.iter().map(|_| None).collect();
    let start = |i: usize| (i, pipe.start_run(&params[i]).unwrap());
    let mut active = vec![start(0)];
    tick(pipe, &mut active, &mut done);
    active.extend([start(1), start(2)]);
    while done[1].is_none() || done[2].is_none() {
        tick(pipe, &mut active, &mut done);
    }
    active.push(start(3));
    while !active.is_empty() {
        tick(pipe, &mut active, &mut done);
    }
    done.into_iter().map(Option::unwrap).collect()
}

#[test]
fn runs_batched_at_different_steps_match_diffusers_and_generate_alone() {
    let params = [
        case_params("sd2_ddim"),
        case_params("sd2_noguidance"),
        case_params("sd2_long"),
        euler_a_params(),
    ];
    let mut pipe = fixture_pipeline("sd2-tiny");
    let alone: Vec<GenerateOutput> = params.iter().map(|p| pipe.generate(p).unwrap()).collect();
    // Every run in one call, then calls of at most 2 images (the memory budget's chunking).
    for max_batch in [None, Some(2)] {
        pipe.set_max_model_batch(max_batch);
        let batched = staggered(&pipe, &params);
        for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
            let what = format!("run {i} (max batch {max_batch:?})");
            assert_close(&b.latents, &a.latents, 1e-4, &what);
            let (_, max) = image_diff(b.images[0].as_raw(), a.images[0].as_raw());
            assert!(max <= 1, "{what}: max |diff| {max} levels against generate alone");
            assert_eq!(b.seeds, a.seeds, "{what}");
        }
        for (i, name) in ["sd2_ddim", "sd2_noguidance", "sd2_long"].iter().enumerate() {
            let expected = image::open(pipelines().join(format!("{name}.png"))).unwrap().to_rgb8();
            assert_image_close(batched[i].images[0].as_raw(), expected.as_raw(), name);
        }
    }
}

#[test]
fn an_image_to_image_run_steps_as_generate_runs_it() {
    let case: serde_json::Value = read_json_file(&edit_fixtures().join("img2img_heun.json"));
    let init = image::open(edit_fixtures().join("init.png")).unwrap().to_rgb8();
    let mut p = GenerateParams::new(case["prompt"].as_str().unwrap());
    p.negative_prompts = Some(vec![case["negative_prompt"].as_str().unwrap().into()]);
    p.num_inference_steps = 5;
    p.seeds = vec![42];
    p.scheduler = Some("heun".into());
    p.init_image = Some(InitImage { strength: 0.6, ..InitImage::new(init) });
    let pipe = fixture_pipeline("sd2-tiny");
    let alone = pipe.generate(&p).unwrap();

    // Two runs of the image at once (one with another seed), so the batch has two rows each.
    let mut other = p.clone();
    other.seeds = vec![43];
    let mut runs = [pipe.start_run(&p).unwrap(), pipe.start_run(&other).unwrap()];
    // strength 0.6 of 5 Heun steps: the last 3, as 5 UNet calls (Heun is of order 2).
    assert_eq!(runs[0].total_steps(), 5);
    while !runs[0].is_finished() {
        pipe.step_runs(&mut runs.iter_mut().collect::<Vec<_>>()).unwrap();
    }
    let [run, _] = runs;
    let batched = pipe.complete_run(run).unwrap();
    assert_close(&batched.latents, &alone.latents, 1e-4, "img2img batched");
    let expected = image::open(edit_fixtures().join("img2img_heun.png")).unwrap().to_rgb8();
    assert_image_close(batched.images[0].as_raw(), expected.as_raw(), "img2img_heun batched");
}

#[test]
fn a_run_that_fails_its_step_leaves_the_others_going() {
    let pipe = fixture_pipeline("sd2-tiny");
    let good = case_params("sd2_ddim");
    let mut bad = good.clone();
    bad.guidance_scale = 1e308;
    let mut runs = [pipe.start_run(&bad).unwrap(), pipe.start_run(&good).unwrap()];
    pipe.step_runs(&mut runs.iter_mut().collect::<Vec<_>>()).unwrap();
    let [bad_run, mut good_run] = runs;
    assert!(bad_run.is_finished() && !good_run.is_finished());
    match pipe.complete_run(bad_run) {
        Err(Error::NonFinite { stage, .. }) => assert_eq!(stage, "after step 1 of 4 of the UNet"),
        other => panic!("expected NonFinite, got {:?}", other.map(|o| o.seeds)),
    }
    while !good_run.is_finished() {
        pipe.step_runs(&mut [&mut good_run]).unwrap();
    }
    let out = pipe.complete_run(good_run).unwrap();
    assert_close(&out.latents, &pipe.generate(&good).unwrap().latents, 1e-4, "the good run");
}

#[test]
fn runs_that_cannot_share_a_call_are_refused() {
    let pipe = fixture_pipeline("sd2-tiny");
    let small = case_params("sd2_ddim");
    let mut large = small.clone();
    large.height = Some(72);
    let (mut a, mut b) = (pipe.start_run(&small).unwrap(), pipe.start_run(&large).unwrap());
    assert_ne!(a.batch_key().unwrap(), b.batch_key().unwrap());
    let err = pipe.step_runs(&mut [&mut a, &mut b]).unwrap_err();
    assert!(err.to_string().contains("must share a batch key"), "{err}");
    // Another LoRA scale is another key too (the adapters run at one scale per call).
    let mut scaled = small.clone();
    scaled.lora_scale = Some(0.5);
    assert_ne!(pipe.start_run(&scaled).unwrap().batch_key().unwrap(), a.batch_key().unwrap());

    // A finished run has no step left.
    let mut one = small.clone();
    one.num_inference_steps = 1;
    let mut run = pipe.start_run(&one).unwrap();
    pipe.step_runs(&mut [&mut run]).unwrap();
    let err = pipe.step_runs(&mut [&mut run]).unwrap_err();
    assert!(err.to_string().contains("no step left"), "{err}");

    // Inpainting goes through generate only.
    let init = image::RgbImage::new(64, 64);
    let mut inpaint = small.clone();
    inpaint.init_image = Some(InitImage::with_mask(init, image::GrayImage::new(64, 64)));
    let err = pipe.start_run(&inpaint).expect_err("inpainting is refused");
    assert!(err.to_string().contains("run inpainting with generate"), "{err}");
}

#[test]
fn the_unet_takes_a_timestep_per_sample() {
    let pipe = fixture_pipeline("sd2-tiny");
    let dev = Device::Cpu;
    let sample = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, 32), &dev).unwrap();
    let both = pipe.unet.forward_with_timesteps(&sample, &[999.0, 1.0], &context).unwrap();
    for (row, t) in [(0, 999.0), (1, 1.0)] {
        let alone = pipe
            .unet
            .forward(&sample.narrow(0, row, 1).unwrap(), t, &context.narrow(0, row, 1).unwrap())
            .unwrap();
        assert_close(&both.narrow(0, row, 1).unwrap(), &alone, 1e-5, &format!("row {row}"));
    }
    let err = pipe.unet.forward_with_timesteps(&sample, &[1.0], &context).unwrap_err();
    assert!(err.to_string().contains("1 timesteps for a batch of 2"), "{err}");
    assert_eq!(both.dtype(), DType::F32);
}
