//! Parity of `sd_core::schedulers` with diffusers 0.42.1. Fixtures come from
//! `scripts/fixtures/gen_rng_schedulers.py`; the inputs of the step sequences are redrawn here
//! with `TorchGenerator` (its own parity is tested in `tests/rng.rs`).

mod support;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sd_core::rng::{Generators, TorchGenerator};
use sd_core::schedulers::{
    find_scheduler, normalize_scheduler_name, scheduler_from_name, scheduler_names, DDIMScheduler,
    EulerDiscreteScheduler, Scheduler, SchedulerConfig, SCHEDULERS,
};
use sd_core::Error;
use serde_json::{json, Value};
use support::{read_json_file, read_tensors, scheduler_fixtures};

struct Fixtures {
    tensors: HashMap<String, Tensor>,
    cases: Vec<Value>,
}

fn load() -> Fixtures {
    let dir = scheduler_fixtures();
    let tensors = read_tensors(&dir.join("schedulers.safetensors"));
    let meta: Value = read_json_file(&dir.join("schedulers.json"));
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

/// Records a failed tolerance check (all of them are reported at the end of the test).
macro_rules! soft {
    ($failures:ident, $cond:expr, $($fmt:tt)*) => {
        let ok: bool = $cond; // false for NaN too
        if !ok {
            $failures.push(format!($($fmt)*));
        }
    };
}

fn report(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} checks out of tolerance:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn config_of(case: &Value) -> SchedulerConfig {
    SchedulerConfig::from_map(case["config"].as_object().unwrap().clone())
}

/// The scheduler of a case: by its registry name when the case has one (the fixture applied
/// diffusers' documented overrides for that name), else by class name.
fn build(case: &Value) -> Box<dyn Scheduler> {
    let class = case["class"].as_str().unwrap();
    let name = case.get("scheduler_name").and_then(Value::as_str).unwrap_or(class);
    let mut s = scheduler_from_name(name, &config_of(case))
        .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
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
    let seeds: Vec<u64> =
        noise["seeds"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    match noise["kind"].as_str().unwrap() {
        "single" => Generators::Single(TorchGenerator::new(seeds[0])),
        _ => Generators::PerSample(seeds.into_iter().map(TorchGenerator::new).collect()),
    }
}

#[test]
fn schedules_match_diffusers() {
    let fx = load();
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    assert!(fx.cases.len() > 500, "expected the full case grid");
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
            soft!(
                failures,
                sched_err(g, w) <= SCHEDULE_TOL,
                "{name}: timestep {i}: {g} vs {w}\n{:?}\n{:?}",
                s.timesteps(),
                want_ts
            );
        }
        let want_ins = vec_f64(&fx.tensors[&format!("{id}/ins")])[0];
        let e = sched_err(s.init_noise_sigma(), want_ins);
        stats.add("init_noise_sigma", e, name);
        soft!(
            failures,
            e <= SCHEDULE_TOL,
            "{name}: init_noise_sigma {} vs {want_ins}",
            s.init_noise_sigma()
        );
        if case["class"] == "EulerDiscreteScheduler" && case.get("scheduler_name").is_none() {
            let mut eu = EulerDiscreteScheduler::from_config(&config_of(case)).unwrap();
            eu.set_timesteps(steps).unwrap();
            assert_eq!(eu.sigmas(), s.sigmas().unwrap(), "{name}: Scheduler::sigmas");
        }
        match fx.tensors.get(&format!("{id}/sigmas")) {
            Some(want) => {
                let want = vec_f64(want);
                let got = s.sigmas().unwrap_or_else(|| panic!("{name}: no sigmas"));
                assert_eq!(got.len(), want.len(), "{name}: sigma count");
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    // diffusers keeps NaN in KDPM2's unused first interpolated sigma only.
                    if w.is_nan() && g.is_nan() {
                        continue;
                    }
                    stats.add("sigmas", sched_err(g, w), name);
                    soft!(
                        failures,
                        sched_err(g, w) <= SCHEDULE_TOL,
                        "{name}: sigma {i}: {g} vs {w}\n{got:?}\n{want:?}"
                    );
                }
            }
            None => assert!(s.sigmas().is_none(), "{name}: diffusers has no sigmas"),
        }
    }
    stats.print();
    report(&failures);
}

/// Counts exact and inexact values and the worst error, for the test log.
#[derive(Default)]
struct Stats(
    std::collections::BTreeMap<
        &'static str,
        (usize, usize, f64, String, std::collections::BTreeSet<String>),
    >,
    std::collections::BTreeMap<(&'static str, String), (usize, f64)>,
);

impl Stats {
    fn add(&mut self, what: &'static str, err: f64, case: &str) {
        let e = self.0.entry(what).or_default();
        let class = case.split(' ').next().unwrap_or(case).to_string();
        let c = self.1.entry((what, class)).or_insert((0, 0.0));
        c.0 += 1;
        c.1 = f64::max(c.1, err);
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
            if !cases.is_empty() && cases.len() <= 40 {
                println!(
                    "    inexact in: {}",
                    cases.iter().cloned().collect::<Vec<_>>().join("; ")
                );
            }
        }
        println!("worst relative error per scheduler (first word of the case name):");
        for ((what, class), (n, worst)) in &self.1 {
            println!("    {what:<22} {class:<34} {n:>6} values, worst {worst:e}");
        }
    }
}

#[test]
fn step_sequences_match_diffusers() {
    let fx = load();
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in &fx.cases {
        let seq = &case["sequence"];
        if seq.is_null() {
            continue;
        }
        let (id, name) = (case["id"].as_str().unwrap(), case["name"].as_str().unwrap());
        let mut s = build(case);
        s.set_timesteps(case["steps"].as_u64().unwrap() as usize).unwrap();
        let shape: Vec<usize> =
            seq["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
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
                    soft!(
                        failures,
                        e <= STEP_TOL,
                        "{name}: scale_model_input at step {k}: relative error {e:e}"
                    );
                }
                None => assert_eq!(
                    vec_f32(&scaled),
                    vec_f32(&sample),
                    "{name}: does not scale its input"
                ),
            }
            let prev = s
                .step(&model_output, t, &sample, &mut gens)
                .unwrap_or_else(|e| panic!("{name} step {k}: {e}"));
            assert_eq!(prev.dims(), &shape[..]);
            let e = rel_err(&vec_f32(&prev), &vec_f32(&want_prev.get(k).unwrap()));
            stats.add("step", e, name);
            soft!(failures, e <= STEP_TOL, "{name}: step {k} (t = {t}): relative error {e:e}");
            sample = prev;
        }
        if let Some(want) = fx.tensors.get(&format!("{id}/x0_last")) {
            let x0 = s.pred_original_sample().expect("pred_original_sample after a step");
            let e = rel_err(&vec_f32(x0), &vec_f32(want));
            stats.add("pred_original_sample", e, name);
            soft!(failures, e <= STEP_TOL, "{name}: pred_original_sample: relative error {e:e}");
        }

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
            soft!(failures, e <= STEP_TOL, "{name}: add_noise: relative error {e:e}");
        }
        runs += 1;
    }
    assert!(runs > 300, "expected every scheduler's step sequences, ran {runs}");
    println!("{runs} step sequences");
    stats.print();
    report(&failures);
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
        (
            "beta_schedule",
            json!("cubic"),
            &["beta_schedule", "cubic", "scaled_linear", "squaredcos_cap_v2"][..],
        ),
        (
            "prediction_type",
            json!("flow"),
            &["prediction_type", "epsilon", "v_prediction", "sample"][..],
        ),
        (
            "timestep_spacing",
            json!("middle"),
            &["timestep_spacing", "linspace", "leading", "trailing"][..],
        ),
        ("num_train_timesteps", json!("many"), &["num_train_timesteps", "integer"][..]),
        ("thresholding", json!(true), &["thresholding", "not supported"][..]),
    ];
    for (key, value, needles) in cases {
        for &class in ALL_CLASSES {
            let has_thresholding = [
                "DDIMScheduler",
                "DPMSolverMultistepScheduler",
                "UniPCMultistepScheduler",
                "DEISMultistepScheduler",
                "DDPMScheduler",
                "LCMScheduler",
            ];
            if key == "thresholding" && !has_thresholding.contains(&class) {
                continue; // not a key of the class: ignored
            }
            let cfg = sd21().with(key, value.clone());
            let err = scheduler_from_name(class, &cfg)
                .err()
                .unwrap_or_else(|| panic!("{class} accepted {key}={value}"));
            assert!(matches!(err, Error::Config { .. }), "{class} {key}: {err:?}");
            let msg = err.to_string();
            for n in needles {
                assert!(msg.contains(n), "{class} {key}: `{msg}` should mention `{n}`");
            }
        }
    }
    let err =
        EulerDiscreteScheduler::from_config(&sd21().with("beta_schedule", "sigmoid")).unwrap_err();
    assert!(err.to_string().contains("not supported"), "{err}");
    let err =
        EulerDiscreteScheduler::from_config(&sd21().with("use_beta_sigmas", true)).unwrap_err();
    assert!(err.to_string().contains("use_beta_sigmas"), "{err}");
    let err = EulerDiscreteScheduler::from_config(
        &sd21().with("use_karras_sigmas", true).with("use_exponential_sigmas", true),
    );
    assert!(err.is_err());
    assert!(matches!(SchedulerConfig::from_json_str("[1, 2]"), Err(Error::Config { .. })));
    assert!(matches!(SchedulerConfig::from_json_str("{oops"), Err(Error::Config { .. })));
    assert!(matches!(
        SchedulerConfig::from_file("/nonexistent/scheduler_config.json"),
        Err(Error::NotFound { .. })
    ));
}

/// Every diffusers class in the registry.
const ALL_CLASSES: &[&str] = &[
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DDPMScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
];

#[test]
fn set_timesteps_rejects_bad_step_counts() {
    for &name in ALL_CLASSES {
        let mut s = scheduler_from_name(name, &sd21()).unwrap();
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidArgument(_))), "{name}: 0 steps");
        assert!(
            matches!(s.set_timesteps(1001), Err(Error::InvalidArgument(_))),
            "{name}: 1001 steps"
        );
        if name == "LCMScheduler" {
            // At most original_inference_steps (50).
            assert!(
                matches!(s.set_timesteps(51), Err(Error::InvalidArgument(_))),
                "{name}: 51 steps"
            );
            s.set_timesteps(50).unwrap();
            assert_eq!(s.timesteps().len(), 50);
            continue;
        }
        s.set_timesteps(1000).unwrap();
        let want = match s.order() {
            2 => 1999,                            // two evaluations per step but the last
            _ if name == "PNDMScheduler" => 1001, // the second timestep repeats
            _ => 1000,
        };
        assert_eq!(s.timesteps().len(), want, "{name}");
        assert_eq!(s.num_inference_steps(), Some(1000), "{name}");
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

/// A name, its diffusers class and the config values the name forces.
type NameMapping = (&'static str, &'static str, Vec<(&'static str, Value)>);

/// The A1111 names of the issue, mapped as diffusers' documentation maps them: a class plus
/// `from_config` overrides applied on top of the model's config.
fn a1111_table() -> Vec<NameMapping> {
    let karras = ("use_karras_sigmas", json!(true));
    let sde = ("algorithm_type", json!("sde-dpmsolver++"));
    vec![
        ("Euler", "EulerDiscreteScheduler", vec![]),
        ("Euler a", "EulerAncestralDiscreteScheduler", vec![]),
        (
            "DPM++ 2M",
            "DPMSolverMultistepScheduler",
            vec![("algorithm_type", json!("dpmsolver++")), ("use_karras_sigmas", json!(false))],
        ),
        (
            "DPM++ 2M Karras",
            "DPMSolverMultistepScheduler",
            vec![karras.clone(), ("algorithm_type", json!("dpmsolver++"))],
        ),
        (
            "DPM++ 2M SDE",
            "DPMSolverMultistepScheduler",
            vec![sde.clone(), ("use_karras_sigmas", json!(false))],
        ),
        ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", vec![sde.clone(), karras.clone()]),
        ("DDIM", "DDIMScheduler", vec![]),
        ("PNDM", "PNDMScheduler", vec![]),
        ("UniPC", "UniPCMultistepScheduler", vec![]),
        ("LMS", "LMSDiscreteScheduler", vec![("use_karras_sigmas", json!(false))]),
        ("LMS Karras", "LMSDiscreteScheduler", vec![karras.clone()]),
        ("Heun", "HeunDiscreteScheduler", vec![]),
        ("DPM2", "KDPM2DiscreteScheduler", vec![("use_karras_sigmas", json!(false))]),
        ("DPM2 a", "KDPM2AncestralDiscreteScheduler", vec![("use_karras_sigmas", json!(false))]),
        ("DPM2 Karras", "KDPM2DiscreteScheduler", vec![karras.clone()]),
        ("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", vec![karras.clone()]),
        ("DEIS", "DEISMultistepScheduler", vec![]),
        ("LCM", "LCMScheduler", vec![]),
    ]
}

#[test]
fn a1111_names_map_to_a_class_and_overrides() {
    let cfg = sd21();
    for (name, class, overrides) in a1111_table() {
        for spelling in [
            name.to_string(),
            name.to_lowercase(),
            name.to_uppercase(),
            name.replace(' ', "_"),
            name.replace(' ', "-"),
        ] {
            let s =
                scheduler_from_name(&spelling, &cfg).unwrap_or_else(|e| panic!("{spelling}: {e}"));
            assert_eq!(s.class_name(), class, "{spelling}");
            for (k, v) in &overrides {
                assert_eq!(s.config().get(k), Some(v), "{spelling}: {k}");
            }
            // The model's own config values stay (SD 2.1 is v-prediction with leading spacing).
            assert_eq!(
                s.config().get("prediction_type"),
                Some(&json!("v_prediction")),
                "{spelling}"
            );
            assert_eq!(s.config().get("steps_offset"), Some(&json!(1)), "{spelling}");
        }
        let entry = find_scheduler(name).unwrap();
        assert!(entry.a1111_names.contains(&name), "{name} is listed as an A1111 name");
        assert!(scheduler_names().contains(&name), "{name} is in scheduler_names()");
    }
    // Short names.
    for (short, a1111) in [
        ("dpmpp_2m", "DPM++ 2M"),
        ("dpmpp_2m_karras", "DPM++ 2M Karras"),
        ("dpmpp_2m_sde", "DPM++ 2M SDE"),
        ("dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras"),
        ("euler_a", "Euler a"),
        ("dpm2_a_karras", "DPM2 a Karras"),
        ("lms_karras", "LMS Karras"),
    ] {
        assert!(
            std::ptr::eq(find_scheduler(short).unwrap(), find_scheduler(a1111).unwrap()),
            "{short} = {a1111}"
        );
    }
    // An override wins over the model's value, and the rest of the model's config is kept.
    let over = sd21()
        .with("use_karras_sigmas", false)
        .with("algorithm_type", "dpmsolver++")
        .with("solver_order", 3);
    let s = scheduler_from_name("DPM++ 2M SDE Karras", &over).unwrap();
    assert_eq!(s.config().get("use_karras_sigmas"), Some(&json!(true)));
    assert_eq!(s.config().get("algorithm_type"), Some(&json!("sde-dpmsolver++")));
    assert_eq!(s.config().get("solver_order"), Some(&json!(3)));
    // A class name means the class with no overrides (whatever the model's config says).
    let s =
        scheduler_from_name("DPMSolverMultistepScheduler", &sd21().with("use_karras_sigmas", true))
            .unwrap();
    assert_eq!(s.config().get("use_karras_sigmas"), Some(&json!(true)));
}

#[test]
fn every_registry_name_is_unique_and_builds() {
    let cfg = sd21();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, e) in SCHEDULERS.iter().enumerate() {
        for n in e.aliases.iter().chain(e.a1111_names) {
            if let Some(j) = seen.insert(normalize_scheduler_name(n), i) {
                assert_eq!(i, j, "`{n}` names two entries");
            }
        }
    }
    for e in SCHEDULERS {
        if let Some(&j) = seen.get(&normalize_scheduler_name(e.class_name)) {
            assert_eq!(
                SCHEDULERS[j].class_name, e.class_name,
                "{} collides with a short name",
                e.class_name
            );
        }
    }
    for &class in ALL_CLASSES {
        assert!(
            SCHEDULERS.iter().any(|e| e.class_name == class && e.overrides.is_empty()),
            "{class} has a plain entry"
        );
    }
    for name in scheduler_names() {
        let e = find_scheduler(name).unwrap();
        let mut s = scheduler_from_name(name, &cfg).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(s.class_name(), e.class_name);
        s.set_timesteps(4).unwrap_or_else(|err| panic!("{name}: {err}"));
        // Built from a default config too (every class default).
        scheduler_from_name(name, &SchedulerConfig::new())
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        // And the resolved config round-trips: the class rebuilt from its own config is the same.
        let again = scheduler_from_name(e.class_name, s.config()).unwrap();
        assert_eq!(again.config(), s.config(), "{name}: config round trip");
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
    for &name in ALL_CLASSES {
        let mut gens = Generators::from_seed(0);
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
        let mut gens = Generators::from_seed(0);
        let pb = b
            .step(
                &m16.to_dtype(candle_core::DType::F32).unwrap(),
                t,
                &x16.to_dtype(candle_core::DType::F32).unwrap(),
                &mut gens,
            )
            .unwrap();
        assert_eq!(vec_f32(&pa), vec_f32(&pb), "{name}");
    }
}

#[test]
fn configs_with_python_non_finite_floats_load() {
    // diffusers' save_config writes DPM-Solver's default lambda_min_clipped as a bare -Infinity.
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "lambda_min_clipped": -Infinity, "note": "Infinity and NaN inside strings stay", "solver_order": 2,
        "prediction_type": "v_prediction", "steps_offset": 1, "timestep_spacing": "leading"}"#;
    let cfg = SchedulerConfig::from_json_str(text).unwrap();
    assert_eq!(cfg.get("note"), Some(&json!("Infinity and NaN inside strings stay")));
    let mut s = scheduler_from_name("DPM++ 2M", &cfg).unwrap();
    s.set_timesteps(4).unwrap();
    assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0]);
    let dpm = sd_core::schedulers::DPMSolverMultistepScheduler::from_config(&cfg).unwrap();
    assert_eq!(dpm.typed_config().lambda_min_clipped, f64::NEG_INFINITY);
    let clipped = SchedulerConfig::from_json_str(&text.replace("-Infinity", "-5.1")).unwrap();
    let dpm = sd_core::schedulers::DPMSolverMultistepScheduler::from_config(&clipped).unwrap();
    assert_eq!(dpm.typed_config().lambda_min_clipped, -5.1);
    assert!(SchedulerConfig::from_json_str(r#"{"beta_start": Infinity, "x": NaN}"#).is_ok());
}

#[test]
fn multistep_schedulers_repeat_timesteps_and_draw_noise_as_diffusers() {
    // Heun and DPM2 evaluate the model twice per step; the pipeline just iterates timesteps().
    // (SD 2.1's config as saved by diffusers spells out timestep_spacing "leading".)
    let cfg = sd21().with("timestep_spacing", "leading");
    let mut heun = scheduler_from_name("Heun", &cfg).unwrap();
    heun.set_timesteps(3).unwrap();
    assert_eq!(heun.timesteps(), &[667.0, 334.0, 334.0, 1.0, 1.0]);
    assert_eq!(heun.order(), 2);
    let mut dpm2 = scheduler_from_name("DPM2", &cfg).unwrap();
    dpm2.set_timesteps(3).unwrap();
    assert_eq!(dpm2.timesteps().len(), 5);
    // Deterministic schedulers never touch the generators; stochastic ones draw the sample's shape
    // from them at the steps diffusers draws at.
    let x = Tensor::zeros((2, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    for (name, draws) in [
        ("Euler", 0),
        ("DPM++ 2M Karras", 0),
        ("UniPC", 0),
        ("DEIS", 0),
        ("LMS", 0),
        ("Heun", 0),
        ("DPM2", 0),
        ("PNDM", 0),
        ("DDIM", 0),
        ("Euler a", 4),             // every step
        ("DPM++ 2M SDE", 4),        // every step
        ("DPM++ 2M SDE Karras", 4), // every step
        ("DPM2 a", 3),              // the second evaluation of each step but the last
        ("DDPMScheduler", 4),       // every step with t > 0 (SD's last timestep is 1)
        ("LCM", 3),                 // every step but the last
    ] {
        let mut s = scheduler_from_name(name, &cfg).unwrap();
        s.set_timesteps(4).unwrap();
        let mut gens = Generators::PerSample(vec![TorchGenerator::new(1), TorchGenerator::new(2)]);
        let mut reference = TorchGenerator::new(1);
        let mut sample = x.clone();
        for t in s.timesteps().to_vec() {
            let input = s.scale_model_input(&sample, t).unwrap();
            sample = s.step(&input, t, &sample, &mut gens).unwrap();
        }
        let per_sample = 4 * 2 * 2;
        for _ in 0..draws {
            reference.randn(per_sample);
        }
        let Generators::PerSample(g) = &mut gens else { unreachable!() };
        assert_eq!(
            g[0].randn(3),
            reference.randn(3),
            "{name}: {draws} draws of [1, 4, 2, 2] from generator 0"
        );
    }
}

/// Configs the fuzzing (tests/fuzz) found panicking, for every scheduler: one training timestep
/// (sigma-to-timestep interpolation indexed past its table) must build and run a short schedule
/// or fail with an error; a huge `steps_offset` (overflowed the timestep arithmetic) is refused.
#[test]
fn fuzz_found_configs_do_not_panic() {
    let base = SchedulerConfig::from_file(
        support::pipelines().join("sd2-tiny/scheduler/scheduler_config.json"),
    )
    .unwrap();
    let overrides = [
        json!({"num_train_timesteps": 1}),
        json!({"num_train_timesteps": 1, "use_karras_sigmas": true}),
        json!({"steps_offset": i64::MAX, "timestep_spacing": "leading"}),
        json!({"steps_offset": i64::MIN, "timestep_spacing": "leading"}),
    ];
    for entry in SCHEDULERS {
        for o in &overrides {
            let mut map = entry.build(&base).unwrap().config().as_map().clone();
            map.extend(o.as_object().unwrap().clone());
            let built = entry.build(&SchedulerConfig::from_map(map));
            if o.get("steps_offset").is_some() {
                // Refused when read: no offset that large gives a timestep in the schedule.
                let err = built.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(err.contains("`steps_offset`: "), "{}: {err}", entry.display_name());
                continue;
            }
            let Ok(mut scheduler) = built else { continue };
            for steps in [1, 2, 3] {
                if scheduler.set_timesteps(steps).is_err() {
                    continue;
                }
                let sample =
                    Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
                let mut generators = Generators::from_seed(0);
                for t in scheduler.timesteps().to_vec() {
                    let Ok(input) = scheduler.scale_model_input(&sample, t) else { break };
                    if scheduler.step(&input, t, &sample, &mut generators).is_err() {
                        break;
                    }
                }
            }
        }
    }
}
