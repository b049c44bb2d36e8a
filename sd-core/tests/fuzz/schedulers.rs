//! `scheduler_config.json` for every scheduler class and name: junk values, wrong types, huge and
//! negative numbers, missing keys and broken JSON text, then a short run of the schedule.

use candle_core::{Device, Tensor};
use sd_core::rng::Generators;
use sd_core::schedulers::{SchedulerConfig, SCHEDULERS};
use sd_core::Error;
use serde_json::Value;

use crate::harness::{fuzz, mutate_bytes, mutate_json};
use crate::support::pipelines;

/// A config input: the JSON text when the mutation broke the text itself, else the object.
enum ConfigInput {
    Object(serde_json::Map<String, Value>),
    Text(Vec<u8>),
}

/// Builds scheduler `entry` from `input`, then sets a schedule and runs it on a tiny latent: every
/// failure must be an sd_core error (a bad config is `Error::Config`).
fn run(entry: usize, input: &ConfigInput, steps: usize) -> Result<(), String> {
    let entry = &SCHEDULERS[entry];
    let config = match input {
        ConfigInput::Object(map) => SchedulerConfig::from_map(map.clone()),
        ConfigInput::Text(bytes) => {
            let Ok(text) = std::str::from_utf8(bytes) else { return Ok(()) };
            match SchedulerConfig::from_json_str(text) {
                Ok(config) => config,
                Err(Error::Config { .. }) => return Ok(()),
                Err(other) => return Err(format!("from_json_str: {other:?}")),
            }
        }
    };
    let mut scheduler = match entry.build(&config) {
        Ok(s) => s,
        Err(Error::Config { .. }) => return Ok(()),
        Err(other) => return Err(format!("build: not Error::Config: {other:?}")),
    };
    // A scheduler rebuilt from its own resolved config must build too.
    entry.build(scheduler.config()).map_err(|e| format!("rebuild from config(): {e}"))?;
    if scheduler.set_timesteps(steps).is_err() {
        return Ok(());
    }
    let device = Device::Cpu;
    let sample = (Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &device).unwrap()
        * scheduler.init_noise_sigma())
    .map_err(|e| e.to_string())?;
    let mut generators = Generators::from_seed(0);
    let mut latents = sample.clone();
    for t in scheduler.timesteps().to_vec() {
        let Ok(input) = scheduler.scale_model_input(&latents, t) else { return Ok(()) };
        let output = (input * 0.5).map_err(|e| e.to_string())?;
        match scheduler.step(&output, t, &latents, &mut generators) {
            Ok(next) => latents = next,
            Err(_) => return Ok(()),
        }
    }
    if let Some(&t) = scheduler.timesteps().first() {
        scheduler.add_noise(&sample, &sample, t).ok();
    }
    Ok(())
}

#[test]
fn scheduler_configs() {
    let model =
        SchedulerConfig::from_file(pipelines().join("sd2-tiny/scheduler/scheduler_config.json"))
            .unwrap();
    // Each entry's resolved config: every key its class reads.
    let bases: Vec<serde_json::Map<String, Value>> =
        SCHEDULERS.iter().map(|e| e.build(&model).unwrap().config().as_map().clone()).collect();
    let steps_choices = [1, 2, 3, 4, 7, 10, 25, 0, 999, 1000, 1001];

    fuzz(
        "scheduler config",
        100 * SCHEDULERS.len(),
        |rng| {
            let entry = rng.below(SCHEDULERS.len());
            let base = Value::Object(bases[entry].clone());
            let input = if rng.one_in(5) {
                ConfigInput::Text(mutate_bytes(rng, base.to_string().as_bytes()))
            } else {
                match mutate_json(rng, &base) {
                    Value::Object(map) => ConfigInput::Object(map),
                    other => ConfigInput::Text(other.to_string().into_bytes()),
                }
            };
            (entry, input, *rng.pick(&steps_choices))
        },
        |(entry, input, steps)| {
            // The scheduler and step count on the first line, then the config file.
            let config = match input {
                ConfigInput::Object(map) => serde_json::to_vec(map).expect("json"),
                ConfigInput::Text(bytes) => bytes.clone(),
            };
            let name = SCHEDULERS[*entry].display_name();
            [format!("{name} with {steps} steps\n").into_bytes(), config].concat()
        },
        |(entry, input, steps)| run(*entry, input, *steps),
    );
}
