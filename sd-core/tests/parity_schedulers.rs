//! Every scheduler end to end against diffusers on the tiny SD 2.x fixture model: the scheduler
//! is picked by name (`GenerateParams::scheduler`, A1111 names included) and built with
//! `from_config` from the model's SD 2.1 (v-prediction DDIM) scheduler config, the seeds give
//! diffusers' CPU generators (initial, ancestral and SDE noise alike). The final latents must
//! match within 1e-4 relative and the 8-bit images within mean |diff| 0.5, max 4. Fixtures come
//! from `scripts/fixtures/gen_scheduler_pipelines.py`.

mod support;

use std::sync::OnceLock;

use sd_core::pipeline::{GenerateParams, StableDiffusionPipeline};
use sd_core::schedulers::SchedulerConfig;
use serde_json::{Map, Value};
use support::*;

const LATENT_TOL: f32 = 1e-4;

#[derive(Debug, serde::Deserialize)]
struct SchedCase {
    model: String,
    scheduler: String,
    prompt: String,
    negative_prompt: Option<String>,
    height: usize,
    width: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
    seeds: Vec<u64>,
    num_images_per_prompt: usize,
    guidance_rescale: f64,
    scheduler_config: Map<String, Value>,
}

fn sd2() -> &'static StableDiffusionPipeline {
    static PIPE: OnceLock<StableDiffusionPipeline> = OnceLock::new();
    PIPE.get_or_init(|| fixture_pipeline("sd2-tiny"))
}

fn load(name: &str) -> SchedCase {
    read_json_file(&pipelines().join(format!("{name}.json")))
}

/// Runs `generate` as a user would, with the case's scheduler name, and compares timesteps,
/// final latents and images with diffusers'.
fn check(name: &str) {
    let case = load(name);
    assert_eq!(case.model, "sd2-tiny");
    let refs = load_refs(&format!("{name}.safetensors"));
    let pipe = sd2();
    let mut params = GenerateParams::new(case.prompt.clone());
    params.negative_prompts = case.negative_prompt.clone().map(|n| vec![n]);
    params.height = Some(case.height);
    params.width = Some(case.width);
    params.num_inference_steps = case.num_inference_steps;
    params.guidance_scale = case.guidance_scale;
    params.guidance_rescale = case.guidance_rescale;
    params.num_images_per_prompt = case.num_images_per_prompt;
    params.seeds = case.seeds.clone();
    params.scheduler = Some(case.scheduler.clone());
    let mut config: SchedulerConfig = pipe.scheduler_config.clone();
    for (k, v) in &case.scheduler_config {
        config.set(k.clone(), v.clone());
    }
    if !case.scheduler_config.is_empty() {
        params.scheduler_config = Some(config.clone());
    }

    let mut scheduler = pipe.scheduler(params.scheduler.as_deref(), Some(&config)).unwrap();
    scheduler.set_timesteps(case.num_inference_steps).unwrap();
    let want_t: Vec<f64> = get(&refs, "timesteps").to_vec1().unwrap();
    assert_eq!(scheduler.timesteps().len(), want_t.len(), "{name}: timestep count");
    for (g, w) in scheduler.timesteps().iter().zip(&want_t) {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{name}: timesteps {:?} vs {want_t:?}",
            scheduler.timesteps()
        );
    }

    let out = pipe.generate(&params).unwrap_or_else(|e| panic!("{name}: {e}"));
    let err = rel_err(&out.latents, get(&refs, "latents"));
    println!("{name} ({}): final latents relative error {err:e}", case.scheduler);
    assert!(err <= LATENT_TOL, "{name}: final latents relative error {err:e} > {LATENT_TOL:e}");
    let n = case.num_images_per_prompt;
    assert_eq!(out.images.len(), n);
    for (i, img) in out.images.iter().enumerate() {
        let png = if n == 1 { format!("{name}.png") } else { format!("{name}-{i}.png") };
        let expected = image::open(pipelines().join(&png)).unwrap().to_rgb8();
        let (mean, max) = image_diff(img.as_raw(), expected.as_raw());
        println!("{name} image {i}: mean |diff| {mean:.4}, max |diff| {max}");
        assert_image_close(img.as_raw(), expected.as_raw(), &format!("{name} image {i}"));
    }
}

macro_rules! cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test]
        fn $test() {
            check($name);
        })*

        /// Every fixture written by the generator has a test above.
        #[test]
        fn every_fixture_case_is_tested() {
            let listed = [$($name),*];
            let mut on_disk: Vec<String> = std::fs::read_dir(pipelines())
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter_map(|f| f.strip_prefix("sched_").and_then(|f| f.strip_suffix(".json")).map(|s| format!("sched_{s}")))
                .collect();
            on_disk.sort();
            for f in &on_disk {
                assert!(listed.contains(&f.as_str()), "{f} has no test");
            }
            assert_eq!(on_disk.len(), listed.len());
        }
    };
}

cases! {
    euler => "sched_euler",
    euler_karras => "sched_euler_karras",
    euler_a => "sched_euler_a",
    euler_a_two_images_one_generator => "sched_euler_a_two_images",
    dpmpp_2m => "sched_dpmpp_2m",
    dpmpp_2m_karras => "sched_dpmpp_2m_karras",
    dpmpp_2m_sde => "sched_dpmpp_2m_sde",
    dpmpp_2m_sde_karras => "sched_dpmpp_2m_sde_karras",
    dpmpp_2m_sde_karras_generator_per_image => "sched_dpmpp_2m_sde_karras_per_image",
    ddim => "sched_ddim",
    ddim_zero_snr_trailing_guidance_rescale => "sched_ddim_zsnr_rescale",
    pndm => "sched_pndm",
    unipc => "sched_unipc",
    lms => "sched_lms",
    lms_karras => "sched_lms_karras",
    heun => "sched_heun",
    dpm2 => "sched_dpm2",
    dpm2_karras => "sched_dpm2_karras",
    dpm2_a => "sched_dpm2_a",
    dpm2_a_karras => "sched_dpm2_a_karras",
    ddpm => "sched_ddpm",
    deis => "sched_deis",
    lcm => "sched_lcm",
}
