//! Scheduler configs with diffusers' `from_config` semantics.
//!
//! A [`SchedulerConfig`] is the raw JSON object of a `scheduler_config.json` (or of a
//! scheduler's [`config()`](super::Scheduler::config)). Each scheduler reads its own typed config
//! from it the way `XScheduler.from_config(config)` does in diffusers 0.42:
//!
//! * keys the class does not know are ignored (they are kept as "hidden" keys in the resolved
//!   config, as diffusers keeps them);
//! * keys the class knows but the object lacks take **the class's own default**;
//! * keys listed in `_use_default_values` (written by diffusers for values that were defaulted)
//!   are treated as missing, so a DDIM config's defaulted `timestep_spacing: "leading"` does not
//!   leak into an Euler scheduler built from it;
//! * keys starting with `_` (`_class_name`, `_diffusers_version`, ...) are never init arguments;
//! * `null` means "not set": `None` for optional keys, the class default for the others.
//!
//! Invalid values give an [`Error::Config`] naming the key, the value and the valid values.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The raw JSON object of a diffusers scheduler config, plus where it came from (for errors).
///
/// `SchedulerConfig::default()` is an empty object: every key takes the class default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerConfig {
    map: Map<String, Value>,
    source: Option<PathBuf>,
}

impl SchedulerConfig {
    /// An empty config: every scheduler built from it uses its class defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg = Self::parse(&text, path)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses a JSON object, e.g. `{"_class_name": "DDIMScheduler", "beta_start": 0.00085}`.
    pub fn from_json_str(json: &str) -> Result<Self> {
        Self::parse(json, Path::new("<scheduler config>"))
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let text = quote_non_finite(text);
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => Ok(Self { map, source: None }),
            Ok(other) => Err(Error::config(
                path,
                format!("expected a JSON object, got {}", json_kind(&other)),
            )),
            Err(e) => Err(Error::config(path, e)),
        }
    }

    /// Wraps a JSON object.
    pub fn from_map(map: Map<String, Value>) -> Self {
        Self { map, source: None }
    }

    /// The scheduler class that wrote this config (`_class_name`), if any.
    pub fn class_name(&self) -> Option<&str> {
        self.map.get("_class_name").and_then(Value::as_str)
    }

    /// The file this config was read from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The raw value of `key` (no `from_config` filtering).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// Sets `key`, like a keyword argument of diffusers' `from_config(config, key=value)`: the
    /// value wins over the config's own and is no longer considered a default.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        let key = key.into();
        if let Some(Value::Array(defaults)) = self.map.get_mut("_use_default_values") {
            defaults.retain(|v| v.as_str() != Some(key.as_str()));
        }
        self.map.insert(key, value.into());
        self
    }

    /// Builder form of [`set`](Self::set).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set(key, value);
        self
    }

    /// The whole JSON object.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// The config as pretty JSON (what diffusers' `save_config` writes, keys sorted).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.map).unwrap_or_default()
    }

    /// What diffusers' `from_config` passes to a class's `__init__` for `key`: `None` when the
    /// key is private (`_...`), listed in `_use_default_values`, absent, or `null`.
    pub fn init_value(&self, key: &str) -> Option<&Value> {
        if key.starts_with('_') || self.is_defaulted(key) {
            return None;
        }
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn is_defaulted(&self, key: &str) -> bool {
        matches!(self.map.get("_use_default_values"), Some(Value::Array(d)) if d.iter().any(|v| v.as_str() == Some(key)))
    }

    fn error_path(&self) -> PathBuf {
        self.source.clone().unwrap_or_else(|| PathBuf::from("<scheduler config>"))
    }
}

impl From<Map<String, Value>> for SchedulerConfig {
    fn from(map: Map<String, Value>) -> Self {
        Self::from_map(map)
    }
}

/// The value of Python's JSON spellings of non-finite floats.
fn non_finite(s: &str) -> Option<f64> {
    match s {
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => None,
    }
}

/// Python's `json.dumps` writes non-finite floats as the bare tokens `Infinity`, `-Infinity` and
/// `NaN` (e.g. `"lambda_min_clipped": -Infinity` in DPM-Solver configs), which are not JSON:
/// quote them (outside strings) so they parse, and let the float readers take them back.
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("Infinity") && !text.contains("NaN") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t));
        match token {
            Some(t) => {
                out.push('"');
                out.push_str(t);
                out.push('"');
                rest = &rest[t.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A config value that is one of a fixed set of strings.
pub trait ConfigEnum: Sized + Copy + PartialEq + 'static {
    /// Every accepted spelling and the value it means; the first spelling of each value is the
    /// canonical one (written back by [`as_str`](ConfigEnum::as_str)).
    const VALUES: &'static [(&'static str, Self)];

    /// The canonical spelling, as diffusers writes it.
    fn as_str(self) -> &'static str {
        Self::VALUES.iter().find(|(_, v)| *v == self).map(|(s, _)| *s).unwrap_or("?")
    }

    /// Parses a spelling; the error lists the valid ones.
    fn parse(s: &str) -> std::result::Result<Self, String> {
        Self::VALUES.iter().find(|(k, _)| *k == s).map(|(_, v)| *v).ok_or_else(|| {
            let mut valid: Vec<&str> = Vec::new();
            for (k, _) in Self::VALUES {
                if !valid.contains(k) {
                    valid.push(k);
                }
            }
            format!("`{s}` is not supported; valid values: {}", valid.join(", "))
        })
    }
}

macro_rules! config_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $($s:literal)|+),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant),+ }
        impl ConfigEnum for $name {
            const VALUES: &'static [(&'static str, Self)] = &[$($(($s, $name::$variant)),+),+];
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                <Self as ConfigEnum>::parse(s).map_err(Error::InvalidArgument)
            }
        }
    };
}

config_enum! {
    /// `beta_schedule`: how the training betas are laid out.
    BetaSchedule {
        /// `torch.linspace(beta_start, beta_end, N)` in float32.
        Linear = "linear",
        /// `torch.linspace(beta_start**0.5, beta_end**0.5, N) ** 2` (Stable Diffusion).
        ScaledLinear = "scaled_linear",
        /// The cosine schedule (`betas_for_alpha_bar`, capped at 0.999).
        SquaredcosCapV2 = "squaredcos_cap_v2",
        /// `sigmoid(linspace(-6, 6, N)) * (beta_end - beta_start) + beta_start` (DDPM only).
        Sigmoid = "sigmoid",
    }
}

config_enum! {
    /// `prediction_type`: what the model predicts.
    PredictionType {
        /// The noise.
        Epsilon = "epsilon",
        /// The velocity `v` (SD 2.x 768 models).
        VPrediction = "v_prediction",
        /// The denoised sample itself (`"original_sample"` is accepted as a synonym, as Euler does).
        Sample = "sample" | "original_sample",
    }
}

config_enum! {
    /// `timestep_spacing`: how inference timesteps are picked from the training ones (table 2 of
    /// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    TimestepSpacing {
        /// Evenly spaced over `[0, N - 1]`, both ends included.
        Linspace = "linspace",
        /// Multiples of `N / steps` from 0, plus `steps_offset`.
        Leading = "leading",
        /// Evenly spaced down from `N - 1` (ends on the last training timestep).
        Trailing = "trailing",
    }
}

config_enum! {
    /// `interpolation_type` of the sigma-based schedulers.
    InterpolationType {
        /// Linear interpolation of the training sigmas at the timesteps.
        Linear = "linear",
        /// Sigmas log-linearly spaced between the smallest and largest training sigma.
        LogLinear = "log_linear",
    }
}

config_enum! {
    /// `final_sigmas_type`: the sigma after the last step.
    FinalSigmasType {
        /// Sigma 0: the last step denoises completely.
        Zero = "zero",
        /// The smallest training sigma.
        SigmaMin = "sigma_min",
    }
}

config_enum! {
    /// `timestep_type` of the sigma-based schedulers.
    TimestepType {
        /// The (interpolated) training timesteps.
        Discrete = "discrete",
        /// `0.25 * ln(sigma)` (with v-prediction).
        Continuous = "continuous",
    }
}

config_enum! {
    /// `algorithm_type` of the multistep DPM-Solver family (`DPMSolverMultistepScheduler`,
    /// `DEISMultistepScheduler`).
    AlgorithmType {
        /// DPM-Solver++ (data prediction), what "DPM++ 2M" means.
        DpmSolverPlusPlus = "dpmsolver++",
        /// The stochastic DPM-Solver++ ("DPM++ 2M SDE"); draws noise at every step.
        SdeDpmSolverPlusPlus = "sde-dpmsolver++",
        /// The original DPM-Solver (noise prediction; deprecated in diffusers).
        DpmSolver = "dpmsolver",
        /// The stochastic original DPM-Solver (deprecated in diffusers).
        SdeDpmSolver = "sde-dpmsolver",
        /// DEIS (`DEISMultistepScheduler`'s only algorithm).
        Deis = "deis",
    }
}

config_enum! {
    /// `solver_type` of the multistep solvers. Each class accepts the others' values and maps
    /// them to its own default, as diffusers does.
    SolverType {
        /// DPM-Solver's second-order midpoint update (the default).
        Midpoint = "midpoint",
        /// DPM-Solver's second-order Heun update.
        Heun = "heun",
        /// DEIS's log-rho solver.
        Logrho = "logrho",
        /// UniPC's B(h) = h.
        Bh1 = "bh1",
        /// UniPC's B(h) = e^h - 1 (the default).
        Bh2 = "bh2",
    }
}

config_enum! {
    /// `variance_type` of `DDPMScheduler` (and DPM-Solver's optional learned variance).
    VarianceType {
        /// The posterior variance (the default).
        FixedSmall = "fixed_small",
        /// The posterior variance, computed through its log.
        FixedSmallLog = "fixed_small_log",
        /// `beta_t`.
        FixedLarge = "fixed_large",
        /// `log(beta_t)` (not usable as a variance; rejected).
        FixedLargeLog = "fixed_large_log",
        /// Predicted by the model in extra output channels.
        Learned = "learned",
        /// Interpolated between the fixed bounds by extra model output channels.
        LearnedRange = "learned_range",
    }
}

config_enum! {
    /// `time_shift_type` of the flow-matching options (kept for config round trips; dynamic
    /// shifting is not supported).
    TimeShiftType {
        /// `exp(mu) / (exp(mu) + (1 / t - 1) ** sigma)`.
        Exponential = "exponential",
        /// `mu / (mu + (1 / t - 1) ** sigma)`.
        Linear = "linear",
    }
}

/// Reads one class's typed config out of a [`SchedulerConfig`] with `from_config` semantics and
/// records which keys were defaulted, to build the resolved config (`scheduler.config`).
pub struct ConfigReader<'a> {
    cfg: &'a SchedulerConfig,
    class: &'static str,
    keys: Vec<&'static str>,
    defaulted: Vec<&'static str>,
}

impl<'a> ConfigReader<'a> {
    /// Starts reading `cfg` for the class `class` (a diffusers class name).
    pub fn new(cfg: &'a SchedulerConfig, class: &'static str) -> Self {
        Self { cfg, class, keys: Vec::new(), defaulted: Vec::new() }
    }

    /// An [`Error::Config`] about `key`.
    pub fn error(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::config(self.cfg.error_path(), format!("{}: `{key}`: {msg}", self.class))
    }

    fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.keys.push(key);
        let present =
            !key.starts_with('_') && !self.cfg.is_defaulted(key) && self.cfg.map.contains_key(key);
        if !present {
            self.defaulted.push(key);
            return None;
        }
        self.cfg.map.get(key).filter(|v| !v.is_null())
    }

    /// A float key.
    pub fn f64(&mut self, key: &'static str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// An optional float key (`null` or absent: `None`). Python's `Infinity`, `-Infinity` and
    /// `NaN` (which `json.dumps` writes for non-finite floats, e.g. DPM-Solver's default
    /// `lambda_min_clipped`) are accepted.
    pub fn opt_f64(&mut self, key: &'static str) -> Result<Option<f64>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) if non_finite(s).is_some() => Ok(non_finite(s)),
            Some(v) => Err(self.error(key, format!("expected a number, got {}", json_kind(v)))),
        }
    }

    /// A non-negative integer key (integral floats such as `1000.0` are accepted).
    pub fn usize(&mut self, key: &'static str, default: usize) -> Result<usize> {
        let v = self.i64(key, default as i64)?;
        usize::try_from(v)
            .map_err(|_| self.error(key, format!("expected a non-negative integer, got {v}")))
    }

    /// An integer key (integral floats such as `1.0` are accepted).
    pub fn i64(&mut self, key: &'static str, default: i64) -> Result<i64> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Ok(i)
                } else {
                    match n.as_f64() {
                        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
                        _ => Err(self.error(key, format!("expected an integer, got {n}"))),
                    }
                }
            }
            Some(v) => Err(self.error(key, format!("expected an integer, got {}", json_kind(v)))),
        }
    }

    /// A boolean key.
    pub fn bool(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => {
                Err(self.error(key, format!("expected true or false, got {}", json_kind(v))))
            }
        }
    }

    /// An optional list of floats (e.g. `trained_betas`).
    pub fn opt_f64_vec(&mut self, key: &'static str) -> Result<Option<Vec<f64>>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Array(a)) => {
                let v: Option<Vec<f64>> = a.iter().map(Value::as_f64).collect();
                v.map(Some).ok_or_else(|| self.error(key, "expected a list of numbers"))
            }
            Some(v) => {
                Err(self.error(key, format!("expected a list of numbers, got {}", json_kind(v))))
            }
        }
    }

    /// A string key with a fixed set of values.
    pub fn choice<T: ConfigEnum>(&mut self, key: &'static str, default: T) -> Result<T> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::String(s)) => T::parse(s).map_err(|m| self.error(key, m)),
            Some(v) => Err(self.error(key, format!("expected a string, got {}", json_kind(v)))),
        }
    }

    /// Like [`choice`](Self::choice), restricted to the values this class implements.
    pub fn choice_among<T: ConfigEnum>(
        &mut self,
        key: &'static str,
        default: T,
        allowed: &[T],
    ) -> Result<T> {
        let v = self.choice(key, default)?;
        self.check_among(key, v, allowed)?;
        Ok(v)
    }

    /// Errors unless `value` (read from `key`) is one of the values this class implements.
    pub fn check_among<T: ConfigEnum>(&self, key: &str, value: T, allowed: &[T]) -> Result<()> {
        if allowed.contains(&value) {
            return Ok(());
        }
        let valid: Vec<&str> = allowed.iter().map(|a| a.as_str()).collect();
        Err(self.error(
            key,
            format!(
                "`{}` is not supported by {}; valid values: {}",
                value.as_str(),
                self.class,
                valid.join(", ")
            ),
        ))
    }

    /// An optional string key with a fixed set of values (`null` or absent: `None`).
    pub fn opt_choice<T: ConfigEnum>(&mut self, key: &'static str) -> Result<Option<T>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::String(s)) => T::parse(s).map(Some).map_err(|m| self.error(key, m)),
            Some(v) => {
                Err(self.error(key, format!("expected a string or null, got {}", json_kind(v))))
            }
        }
    }

    /// A list of non-negative integers (e.g. UniPC's `disable_corrector`); absent or `null`: the
    /// default.
    pub fn usize_vec(&mut self, key: &'static str, default: Vec<usize>) -> Result<Vec<usize>> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::Array(a)) => {
                let v: Option<Vec<usize>> = a
                    .iter()
                    .map(|x| {
                        x.as_u64().map(|u| u as usize).or_else(|| {
                            x.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as usize)
                        })
                    })
                    .collect();
                v.ok_or_else(|| self.error(key, "expected a list of non-negative integers"))
            }
            Some(v) => {
                Err(self.error(key, format!("expected a list of integers, got {}", json_kind(v))))
            }
        }
    }

    /// A key that must be absent or `null` here (e.g. UniPC's `solver_p`, a scheduler object in
    /// diffusers that no JSON config can hold).
    pub fn null(&mut self, key: &'static str) -> Result<()> {
        match self.raw(key) {
            None => Ok(()),
            Some(v) => {
                Err(self.error(key, format!("only null is supported here, got {}", json_kind(v))))
            }
        }
    }

    /// What diffusers' `hasattr(self.config, key) and self.config.key` gives for a key that is
    /// not an argument of the class but is kept from the source config as a hidden key (e.g.
    /// `sigma_min` read by the Karras conversion of classes without such an argument). Not
    /// recorded as a key of the class.
    pub fn hidden_f64(&self, key: &str) -> Option<f64> {
        self.cfg.init_value(key).and_then(Value::as_f64)
    }

    /// The resolved config of the class, as diffusers' `scheduler.config`: the class's values
    /// for all its keys (`values`), the source's other keys kept as hidden keys,
    /// `_use_default_values` listing the defaulted keys, and `_class_name`.
    pub fn resolved(&self, mut values: Map<String, Value>) -> SchedulerConfig {
        for (k, v) in &self.cfg.map {
            if k == "_use_default_values" || self.cfg.is_defaulted(k) || values.contains_key(k) {
                continue;
            }
            values.insert(k.clone(), v.clone());
        }
        if !self.defaulted.is_empty() {
            values.insert(
                "_use_default_values".into(),
                Value::Array(self.defaulted.iter().map(|k| Value::from(*k)).collect()),
            );
        } else {
            values.remove("_use_default_values");
        }
        values.insert("_class_name".into(), Value::from(self.class));
        SchedulerConfig { map: values, source: self.cfg.source.clone() }
    }
}

/// Writes typed values into a JSON map (for resolved configs).
#[derive(Default)]
pub struct ConfigWriter(pub Map<String, Value>);

impl ConfigWriter {
    /// Sets `key` to `value`.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        self.0.insert(key.to_string(), value.into());
        self
    }

    /// Sets `key` to an optional float (`null` for `None`).
    pub fn opt_f64(&mut self, key: &str, value: Option<f64>) -> &mut Self {
        self.set(key, value.map(Value::from).unwrap_or(Value::Null))
    }

    /// Sets `key` to an optional list of floats (`null` for `None`).
    pub fn opt_f64_vec(&mut self, key: &str, value: Option<&[f64]>) -> &mut Self {
        self.set(key, value.map(|v| Value::from(v.to_vec())).unwrap_or(Value::Null))
    }

    /// Sets `key` to an optional enum (`null` for `None`).
    pub fn opt_choice<T: ConfigEnum>(&mut self, key: &str, value: Option<T>) -> &mut Self {
        self.set(key, value.map(|v| Value::from(v.as_str())).unwrap_or(Value::Null))
    }

    /// Sets `key` to a list of integers.
    pub fn usize_vec(&mut self, key: &str, value: &[usize]) -> &mut Self {
        self.set(key, Value::from(value.to_vec()))
    }

    /// Sets `key` to an enum's canonical spelling.
    pub fn choice<T: ConfigEnum>(&mut self, key: &str, value: T) -> &mut Self {
        self.set(key, value.as_str())
    }
}
