//! sd-core's scheduler registry and schedulers, for the generated Python scheduler classes.

use pyo3::prelude::*;
use sd_core::schedulers::{
    find_scheduler, scheduler_from_name, scheduler_names as core_scheduler_names, SchedulerConfig,
    SCHEDULERS,
};

use crate::error::{attached, config_arg_error};

/// The diffusers scheduler classes sd-core implements, in registry order (each once).
#[pyfunction]
pub fn scheduler_classes() -> Vec<&'static str> {
    let mut classes: Vec<&'static str> = Vec::new();
    for entry in SCHEDULERS {
        if !classes.contains(&entry.class_name) {
            classes.push(entry.class_name);
        }
    }
    classes
}

/// Every name sd-core's scheduler lookup accepts (class names and short names).
#[pyfunction]
pub fn scheduler_names() -> Vec<&'static str> {
    core_scheduler_names()
}

/// What a scheduler name (a class name, a short name like `euler_karras` or an A1111 name like
/// "DPM++ 2M Karras") means: `(class_name, config overrides as JSON)`.
#[pyfunction]
pub fn scheduler_entry(name: &str) -> PyResult<(&'static str, String)> {
    attached(|| {
        let entry = find_scheduler(name)?;
        let overrides: serde_json::Map<String, serde_json::Value> = entry
            .overrides
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        Ok((entry.class_name, serde_json::Value::Object(overrides).to_string()))
    })
}

/// `class_name.from_config(config)`: the resolved config (every key of the class with its value,
/// diffusers' `scheduler.config`) as JSON. Errors on invalid values, like the constructor.
#[pyfunction]
pub fn resolve_scheduler_config(class_name: &str, config_json: &str) -> PyResult<String> {
    attached(|| {
        let config = SchedulerConfig::from_json_str(config_json)?;
        let scheduler = scheduler_from_name(class_name, &config)?;
        Ok(scheduler.config().to_json_string())
    })
    .map_err(config_arg_error)
}

/// `(timesteps, init_noise_sigma, order)` of the scheduler after `set_timesteps(steps)` (or, with
/// `steps=None`, as constructed: no timesteps).
#[pyfunction]
#[pyo3(signature = (class_name, config_json, num_inference_steps=None))]
pub fn scheduler_schedule(
    class_name: &str,
    config_json: &str,
    num_inference_steps: Option<usize>,
) -> PyResult<(Vec<f64>, f64, usize)> {
    attached(|| {
        let config = SchedulerConfig::from_json_str(config_json)?;
        let mut scheduler = scheduler_from_name(class_name, &config)?;
        if let Some(n) = num_inference_steps {
            scheduler.set_timesteps(n)?;
        }
        Ok((scheduler.timesteps().to_vec(), scheduler.init_noise_sigma(), scheduler.order()))
    })
    .map_err(config_arg_error)
}
