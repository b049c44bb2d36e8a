//! Parity of `sd_core::schedulers` with diffusers 0.42.1. Fixtures come from
//! `scripts/fixtures/gen_rng_schedulers.py`; the inputs of the step sequences are redrawn here
//! with `TorchGenerator` (its own parity is tested in `tests/rng.rs`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_core::rng::{Generators, TorchGenerator};
use sd_core::schedulers::{
    scheduler_from_name, scheduler_names, DDIMScheduler, EulerDiscreteScheduler, Scheduler, SchedulerConfig,
};
use sd_core::Error;
use serde_json::{json, Value};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/schedulers")
}

struct Fixtures {
    tensors: HashMap<String, Tensor>,
    cases: Vec<Value>,
}

fn load() -> Fixtures {
    let dir = fixtures_dir();
    let tensors =
        candle_core::safetensors::load(dir.join("schedulers.safetensors"), &Device::Cpu).expect("schedulers.safetensors");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("schedulers.json")).expect("schedulers.json")).unwrap();
    Fixtures { tensors, cases: meta["cases"].as_array().unwrap().clone() }
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// The largest elementwise error of `got` against `want`, relative to `|want|` but never to less
/// than the tensor's mean magnitude (elements where terms cancel out to ~0 would otherwise turn a
/// last-bit difference of the inputs into a huge relative error).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mean_abs = want.iter().map(|&w| (w as f64).abs()).sum::<f64>() / want.len().max(1) as f64;
    got.iter()
        .zip(want)
        .map(|(&g, &w)| ((g as f64) - (w as f64)).abs() / (w as f64).abs().max(mean_abs).max(1e-30))
        .fold(0.0, f64::max)
}

/// Relative difference of two schedule values (timesteps, sigmas), with an absolute floor of 1e-6
/// for values near 0.
fn sched_err(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1.0)
}

const SCHEDULE_TOL: f64 = 1e-6;

const STEP_TOL: f64 = 1e-5;

fn config_of(case: &Value) -> SchedulerConfig {
    SchedulerConfig::from_map(case["config"].as_object().unwrap().clone())
}

fn build(case: &Value) -> Box<dyn Scheduler> {
    let class = case["class"].as_str().unwrap();
    let mut s = scheduler_from_name(class, &config_of(case)).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
    assert_eq!(s.class_name(), class);
    for (k, v) in case["options"].as_object().unwrap() {
        let v = v.as_f64().unwrap_or_else(|| if v.as_bool() == Some(true) { 1.0 } else { 0.0 });
        s.set_step_option(k, v).unwrap();
    }
    s
}

fn noise_generators(case: &Value) -> Generators {
    let noise = &case["noise"];
    if noise.is_null() {
        // Deterministic cases must not draw: an empty list would fail if they did.
        return Generators::PerSample(vec![]);
    }
    let seeds: Vec<u64> = noise["seeds"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    match noise["kind"].as_str().unwrap() {
        "single" => Generators::Single(TorchGenerator::new(seeds[0])),
        _ => Generators::PerSample(seeds.into_iter().map(TorchGenerator::new).collect()),
    }
}

#[test]
fn schedules_match_diffusers() {
    let fx = load();
    let mut stats = Stats::default();
    assert!(fx.cases.len() > 150, "expected the full case grid");
    for case in &fx.cases {
        let (id, name) = (case["id"].as_str().unwrap(), case["name"].as_str().unwrap());
        let mut s = build(case);
        let steps = case["steps"].as_u64().unwrap() as usize;
        s.set_timesteps(steps).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.num_inference_steps(), Some(steps));
        let want_ts = vec_f64(&fx.tensors[&format!("{id}/ts")]);
        assert_eq!(s.timesteps().len(), want_ts.len(), "{name}: timestep count");
        for (i, (&g, &w)) in s.timesteps().iter().zip(&want_ts).enumerate() {
            stats.add("timesteps", sched_err(g, w), name);
            assert!(sched_err(g, w) <= SCHEDULE_TOL, "{name}: timestep {i}: {g} vs {w}\n{:?}\n{:?}", s.timesteps(), want_ts);
        }
        let want_ins = vec_f64(&fx.tensors[&format!("{id}/ins")])[0];
        let e = sched_err(s.init_noise_sigma(), want_ins);
        stats.add("init_noise_sigma", e, name);
        assert!(e <= SCHEDULE_TOL, "{name}: init_noise_sigma {} vs {want_ins}", s.init_noise_sigma());
        if case["class"] == "EulerDiscreteScheduler" {
            let mut eu = EulerDiscreteScheduler::from_config(&config_of(case)).unwrap();
            eu.set_timesteps(steps).unwrap();
            let want = vec_f64(&fx.tensors[&format!("{id}/sigmas")]);
            let got = eu.sigmas();
            assert_eq!(got.len(), want.len(), "{name}: sigma count");
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                stats.add("sigmas", sched_err(g, w), name);
                assert!(sched_err(g, w) <= SCHEDULE_TOL, "{name}: sigma {i}: {g} vs {w}");
            }
        }
    }
    stats.print();
}

/// Counts exact and inexact values and the worst error, for the test log.
#[derive(Default)]
struct Stats(std::collections::BTreeMap<&'static str, (usize, usize, f64, String, std::collections::BTreeSet<String>)>);

impl Stats {
    fn add(&mut self, what: &'static str, err: f64, case: &str) {
        let e = self.0.entry(what).or_default();
        e.0 += 1;
        if err != 0.0 {
            e.1 += 1;
            e.4.insert(case.to_string());
        }
        if err > e.2 {
            e.2 = err;
            e.3 = case.to_string();
        }
    }
    fn print(&self) {
        for (what, (n, inexact, worst, case, cases)) in &self.0 {
            println!("{what}: {n} values, {inexact} not bit-identical, worst relative error {worst:e} ({case})");
            if !cases.is_empty() {
                println!("    inexact in: {}", cases.iter().cloned().collect::<Vec<_>>().join("; "));
            }
        }
    }
}

#[test]
fn step_sequences_match_diffusers() {
    let fx = load();
    let mut stats = Stats::default();
    let mut runs = 0;
    for case in &fx.cases {
        let seq = &case["sequence"];
        if seq.is_null() {
            continue;
        }
        let (id, name) = (case["id"].as_str().unwrap(), case["name"].as_str().unwrap());
        let mut s = build(case);
        s.set_timesteps(case["steps"].as_u64().unwrap() as usize).unwrap();
        let shape: Vec<usize> = seq["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let mut inputs = TorchGenerator::new(seq["seed"].as_u64().unwrap());
        let mut gens = noise_generators(case);
        let noise0 = inputs.randn_tensor(&shape, &Device::Cpu).unwrap();
        let mut sample = noise0.affine(s.init_noise_sigma() as f32 as f64, 0.0).unwrap();
        let want_prev = &fx.tensors[&format!("{id}/prev")];
        let want_scaled = fx.tensors.get(&format!("{id}/scaled"));
        let timesteps = s.timesteps().to_vec();
        assert_eq!(want_prev.dims()[0], timesteps.len(), "{name}: step count");
        for (k, &t) in timesteps.iter().enumerate() {
            let model_output = inputs.randn_tensor(&shape, &Device::Cpu).unwrap();
            let scaled = s.scale_model_input(&sample, t).unwrap();
            match want_scaled {
                Some(w) => {
                    let e = rel_err(&vec_f32(&scaled), &vec_f32(&w.get(k).unwrap()));
                    stats.add("scale_model_input", e, name);
                    assert!(e <= STEP_TOL, "{name}: scale_model_input at step {k}: relative error {e:e}");
                }
                None => assert_eq!(vec_f32(&scaled), vec_f32(&sample), "{name}: DDIM does not scale its input"),
            }
            let prev = s.step(&model_output, t, &sample, &mut gens).unwrap_or_else(|e| panic!("{name} step {k}: {e}"));
            assert_eq!(prev.dims(), &shape[..]);
            let e = rel_err(&vec_f32(&prev), &vec_f32(&want_prev.get(k).unwrap()));
            stats.add("step", e, name);
            assert!(e <= STEP_TOL, "{name}: step {k} (t = {t}): relative error {e:e}");
            sample = prev;
        }
        let x0 = s.pred_original_sample().expect("pred_original_sample after a step");
        let e = rel_err(&vec_f32(x0), &vec_f32(&fx.tensors[&format!("{id}/x0_last")]));
        stats.add("pred_original_sample", e, name);
        assert!(e <= STEP_TOL, "{name}: pred_original_sample: relative error {e:e}");

        if let Some(an) = case["add_noise"].as_object() {
            let mut fresh = build(case);
            fresh.set_timesteps(case["steps"].as_u64().unwrap() as usize).unwrap();
            let mut g = TorchGenerator::new(an["seed"].as_u64().unwrap());
            let original = g.randn_tensor(&shape, &Device::Cpu).unwrap();
            let noise = g.randn_tensor(&shape, &Device::Cpu).unwrap();
            let t = fresh.timesteps()[an["index"].as_u64().unwrap() as usize];
            let got = fresh.add_noise(&original, &noise, t).unwrap();
            let e = rel_err(&vec_f32(&got), &vec_f32(&fx.tensors[&format!("{id}/add_noise")]));
            stats.add("add_noise", e, name);
            assert!(e <= STEP_TOL, "{name}: add_noise: relative error {e:e}");
        }
        runs += 1;
    }
    assert!(runs > 50);
    println!("{runs} step sequences");
    stats.print();
}

// ---- config semantics ----

fn sd21() -> SchedulerConfig {
    SchedulerConfig::from_json_str(
        r#"{"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
            "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "_class_name": "DDIMScheduler"}"#,
    )
    .unwrap()
}

#[test]
fn from_config_uses_each_class_defaults() {
    let cfg = sd21();
    assert_eq!(cfg.class_name(), Some("DDIMScheduler"));
    let euler = EulerDiscreteScheduler::from_config(&cfg).unwrap();
    let c = euler.config();
    assert_eq!(c.class_name(), Some("EulerDiscreteScheduler"));
    assert_eq!(c.get("timestep_spacing"), Some(&json!("linspace")));
    assert_eq!(c.get("prediction_type"), Some(&json!("v_prediction")));
    assert_eq!(c.get("steps_offset"), Some(&json!(1)));
    assert_eq!(c.get("clip_sample"), Some(&json!(false)), "unknown keys are kept as hidden keys");
    let defaults = c.get("_use_default_values").unwrap().as_array().unwrap();
    assert!(defaults.contains(&json!("timestep_spacing")));
    assert!(!defaults.contains(&json!("prediction_type")));

    let ddim = DDIMScheduler::from_config(&cfg).unwrap();
    assert_eq!(ddim.config().get("timestep_spacing"), Some(&json!("leading")));
    // Round trip: Euler's defaulted linspace does not leak into DDIM.
    let back = DDIMScheduler::from_config(euler.config()).unwrap();
    assert_eq!(back.ddim_config().timestep_spacing, sd_core::schedulers::TimestepSpacing::Leading);
    assert!(!back.ddim_config().clip_sample);
    // An explicit override wins.
    let mut over = euler.config().clone();
    over.set("timestep_spacing", "trailing");
    let ddim = DDIMScheduler::from_config(&over).unwrap();
    assert_eq!(ddim.ddim_config().timestep_spacing, sd_core::schedulers::TimestepSpacing::Trailing);
    // An empty config is all defaults.
    let e = EulerDiscreteScheduler::from_config(&SchedulerConfig::new()).unwrap();
    assert_eq!(e.euler_config(), &sd_core::schedulers::EulerDiscreteConfig::default());
}

#[test]
fn invalid_values_name_the_key_and_the_valid_values() {
    let cases = [
        ("beta_schedule", json!("cubic"), &["beta_schedule", "cubic", "scaled_linear", "squaredcos_cap_v2"][..]),
        ("prediction_type", json!("flow"), &["prediction_type", "epsilon", "v_prediction", "sample"][..]),
        ("timestep_spacing", json!("middle"), &["timestep_spacing", "linspace", "leading", "trailing"][..]),
        ("num_train_timesteps", json!("many"), &["num_train_timesteps", "integer"][..]),
        ("thresholding", json!(true), &["thresholding", "not supported"][..]),
    ];
    for (key, value, needles) in cases {
        for class in ["EulerDiscreteScheduler", "DDIMScheduler"] {
            if key == "thresholding" && class == "EulerDiscreteScheduler" {
                continue; // not an Euler key: ignored
            }
            let cfg = sd21().with(key, value.clone());
            let err = scheduler_from_name(class, &cfg).err().unwrap_or_else(|| panic!("{class} accepted {key}={value}"));
            assert!(matches!(err, Error::Config { .. }), "{class} {key}: {err:?}");
            let msg = err.to_string();
            for n in needles {
                assert!(msg.contains(n), "{class} {key}: `{msg}` should mention `{n}`");
            }
        }
    }
    let err = EulerDiscreteScheduler::from_config(&sd21().with("beta_schedule", "sigmoid")).unwrap_err();
    assert!(err.to_string().contains("not supported"), "{err}");
    let err = EulerDiscreteScheduler::from_config(&sd21().with("use_beta_sigmas", true)).unwrap_err();
    assert!(err.to_string().contains("use_beta_sigmas"), "{err}");
    let err = EulerDiscreteScheduler::from_config(&sd21().with("use_karras_sigmas", true).with("use_exponential_sigmas", true));
    assert!(err.is_err());
    assert!(matches!(SchedulerConfig::from_json_str("[1, 2]"), Err(Error::Config { .. })));
    assert!(matches!(SchedulerConfig::from_json_str("{oops"), Err(Error::Config { .. })));
    assert!(matches!(SchedulerConfig::from_file("/nonexistent/scheduler_config.json"), Err(Error::NotFound { .. })));
}

#[test]
fn set_timesteps_rejects_bad_step_counts() {
    for name in ["euler", "ddim"] {
        let mut s = scheduler_from_name(name, &sd21()).unwrap();
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidArgument(_))), "{name}: 0 steps");
        assert!(matches!(s.set_timesteps(1001), Err(Error::InvalidArgument(_))), "{name}: 1001 steps");
        s.set_timesteps(1000).unwrap();
        assert_eq!(s.timesteps().len(), 1000);
    }
}

#[test]
fn names_resolve_case_insensitively() {
    let cfg = sd21();
    for (name, class) in [
        ("euler", "EulerDiscreteScheduler"),
        ("Euler", "EulerDiscreteScheduler"),
        ("EULER", "EulerDiscreteScheduler"),
        ("EulerDiscreteScheduler", "EulerDiscreteScheduler"),
        ("eulerdiscretescheduler", "EulerDiscreteScheduler"),
        ("Euler Karras", "EulerDiscreteScheduler"),
        ("ddim", "DDIMScheduler"),
        ("DDIM", "DDIMScheduler"),
        ("DDIMScheduler", "DDIMScheduler"),
    ] {
        assert_eq!(scheduler_from_name(name, &cfg).unwrap().class_name(), class, "{name}");
    }
    let karras = scheduler_from_name("euler_karras", &cfg).unwrap();
    assert_eq!(karras.config().get("use_karras_sigmas"), Some(&json!(true)));
    let plain = scheduler_from_name("euler", &cfg).unwrap();
    assert_eq!(plain.config().get("use_karras_sigmas"), Some(&json!(false)));

    match scheduler_from_name("nope", &cfg) {
        Err(Error::UnknownScheduler { name, valid }) => {
            assert_eq!(name, "nope");
            for n in scheduler_names() {
                assert!(valid.contains(n), "{valid} should list {n}");
            }
        }
        Err(other) => panic!("expected UnknownScheduler, got {other}"),
        Ok(_) => panic!("expected an error"),
    }
    let names = scheduler_names();
    for n in ["EulerDiscreteScheduler", "euler", "DDIMScheduler", "ddim"] {
        assert!(names.contains(&n), "{n}");
    }
}

#[test]
fn step_errors_are_reported() {
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut gens = Generators::from_seed(0);
    let mut ddim = scheduler_from_name("ddim", &sd21()).unwrap();
    assert!(ddim.step(&x, 981.0, &x, &mut gens).is_err(), "step before set_timesteps");
    ddim.set_timesteps(10).unwrap();
    assert!(ddim.step(&x, 1.5, &x, &mut gens).is_err(), "fractional DDIM timestep");
    assert!(ddim.step(&x, 5000.0, &x, &mut gens).is_err(), "timestep out of range");
    let y = Tensor::zeros((1, 4, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(ddim.step(&x, 901.0, &y, &mut gens).is_err(), "shape mismatch");
    assert!(ddim.set_step_option("bogus", 1.0).is_err());
    assert!(ddim.set_step_option("eta", -1.0).is_err());

    let mut euler = scheduler_from_name("euler", &sd21()).unwrap();
    euler.set_timesteps(10).unwrap();
    assert!(euler.scale_model_input(&x, 123.25).is_err(), "timestep not in the schedule");
    let ts = euler.timesteps().to_vec();
    for &t in &ts {
        euler.scale_model_input(&x, t).unwrap();
        euler.step(&x, t, &x, &mut gens).unwrap();
    }
    assert!(euler.step(&x, ts[9], &x, &mut gens).is_err(), "stepping past the end");
    assert!(euler.set_step_option("eta", 1.0).is_err());
}

#[test]
fn f16_inputs_are_stepped_in_f32() {
    let mut g = TorchGenerator::new(1);
    let x = g.randn_tensor(&[1, 4, 2, 2], &Device::Cpu).unwrap();
    let m = g.randn_tensor(&[1, 4, 2, 2], &Device::Cpu).unwrap();
    let mut gens = Generators::from_seed(0);
    for name in ["euler", "ddim"] {
        let mut a = scheduler_from_name(name, &sd21()).unwrap();
        let mut b = scheduler_from_name(name, &sd21()).unwrap();
        a.set_timesteps(5).unwrap();
        b.set_timesteps(5).unwrap();
        let t = a.timesteps()[0];
        let x16 = x.to_dtype(candle_core::DType::F16).unwrap();
        let m16 = m.to_dtype(candle_core::DType::F16).unwrap();
        let sa = a.scale_model_input(&x16, t).unwrap();
        assert_eq!(sa.dtype(), candle_core::DType::F32);
        let pa = a.step(&m16, t, &x16, &mut gens).unwrap();
        assert_eq!(pa.dtype(), candle_core::DType::F32);
        b.scale_model_input(&x16.to_dtype(candle_core::DType::F32).unwrap(), t).unwrap();
        let pb = b
            .step(&m16.to_dtype(candle_core::DType::F32).unwrap(), t, &x16.to_dtype(candle_core::DType::F32).unwrap(), &mut gens)
            .unwrap();
        assert_eq!(vec_f32(&pa), vec_f32(&pb), "{name}");
    }
}
