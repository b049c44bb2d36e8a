//! A1111's `parameters` text. Its layout (A1111 `modules/processing.py` `create_infotext`):
//!
//! ```text
//! a prompt, which may span lines
//! Negative prompt: the negative prompt (this line only when it is not empty)
//! Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 768x768
//! ```
//!
//! The last line is `Key: value` pairs joined by `, `; a value holding `,`, `:` or a newline is
//! written as a JSON string (A1111's `quote`). Readers take the last line as settings when at
//! least three pairs parse, else as part of the prompt (`parse_generation_parameters`).

use crate::{Error, Result};

/// A parsed or to-be-written `parameters` text: prompt, negative prompt and the ordered settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Infotext {
    pub prompt: String,
    pub negative_prompt: String,
    /// `(key, value)` in order, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Infotext {
    /// The value of `key`, if present (the last one wins, as in A1111's dict).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Writes the text as A1111's `create_infotext` does.
    pub fn to_text(&self) -> String {
        let settings: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| if k == v { k.clone() } else { format!("{k}: {}", quote(v)) })
            .collect();
        let negative = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        format!("{}{negative}\n{}", self.prompt, settings.join(", ")).trim().to_string()
    }

    /// Reads a `parameters` text as A1111's `parse_generation_parameters` does.
    pub fn parse(text: &str) -> Infotext {
        let text = text.trim();
        let mut lines: Vec<&str> = text.split('\n').collect();
        let last = lines.pop().unwrap_or_default();
        let params = parse_settings_line(last);
        let params = if params.len() >= 3 {
            params
        } else {
            lines.push(last);
            Vec::new()
        };
        let (mut prompt, mut negative) = (Vec::new(), Vec::new());
        let mut in_negative = false;
        for line in lines {
            let mut line = line.trim();
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                in_negative = true;
                line = rest.trim();
            }
            if in_negative {
                negative.push(line)
            } else {
                prompt.push(line)
            }
        }
        Infotext { prompt: prompt.join("\n"), negative_prompt: negative.join("\n"), params }
    }
}

/// A1111's `quote`: a value with `,`, `:` or a newline becomes a JSON string (non-ASCII kept).
pub fn quote(value: &str) -> String {
    if !value.contains([',', ':', '\n']) {
        return value.to_string();
    }
    serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
}

/// A1111's `unquote`: a JSON string back to its text; anything else unchanged.
pub fn unquote(value: &str) -> String {
    if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(value) {
            return s;
        }
    }
    value.to_string()
}

/// The settings pairs of a line, as A1111's `re_param` finds them:
/// `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`, scanning left to right and skipping
/// what does not match.
fn parse_settings_line(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut pairs = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        match match_pair(&chars, start) {
            Some((key, value, end)) => {
                pairs.push((key, unquote(&value)));
                start = end.max(start + 1);
            }
            None => start += 1,
        }
    }
    pairs
}

/// One `re_param` match starting exactly at `at`: `(key, raw value, end)`.
fn match_pair(c: &[char], at: usize) -> Option<(String, String, usize)> {
    let word = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = at;
    while i < c.len() && c[i].is_whitespace() {
        i += 1;
    }
    // Key: a word character, then at least one of word characters, spaces, '-' or '/'.
    if i >= c.len() || !word(c[i]) {
        return None;
    }
    let key_start = i;
    i += 1;
    let rest_start = i;
    while i < c.len() && (word(c[i]) || matches!(c[i], ' ' | '-' | '/')) {
        i += 1;
    }
    if i == rest_start || i >= c.len() || c[i] != ':' {
        return None;
    }
    let key: String = c[key_start..i].iter().collect();
    i += 1;
    while i < c.len() && c[i].is_whitespace() {
        i += 1;
    }
    // Value: a quoted string with backslash escapes, else everything up to the next comma.
    let value_start = i;
    if let Some(end) = quoted_end(c, i) {
        if end == c.len() || c[end] == ',' {
            let value: String = c[value_start..end].iter().collect();
            return Some((key, value, (end + 1).min(c.len())));
        }
    }
    while i < c.len() && c[i] != ',' {
        i += 1;
    }
    let value: String = c[value_start..i].iter().collect();
    Some((key, value, (i + 1).min(c.len())))
}

/// The index after the closing quote of a `"..."` (non-empty) starting at `at`.
fn quoted_end(c: &[char], at: usize) -> Option<usize> {
    if c.get(at) != Some(&'"') {
        return None;
    }
    let mut i = at + 1;
    while i < c.len() {
        match c[i] {
            '\\' if i + 1 < c.len() => i += 2,
            '"' if i > at + 1 => return Some(i + 1),
            '"' => return None,
            _ => i += 1,
        }
    }
    None
}

/// Python's `repr(float)`: what A1111 writes for `CFG scale: 7.5` or `7.0`. Shortest digits
/// that round-trip, with `.0` on integral values and exponent notation below 1e-4 or from 1e16.
pub fn python_float(v: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // `{:e}` gives the shortest round-trip digits: "7.5e0", "1e-5", "1.2345e20".
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let plain = format!("{v}");
    if plain.contains('.') {
        plain
    } else {
        format!("{plain}.0")
    }
}

/// The settings of one generated image, as written into (and read back from) its infotext.
/// A1111's keys come first in A1111's order; the settings A1111 has no key for use keys of our
/// own after them (`Scheduler`, `Dtype`, `Batch size`, `Batch position`, `Guidance rescale`,
/// `Eta`, `Engine`). Reading an A1111 text leaves ours `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationInfo {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: Option<usize>,
    /// A1111's sampler name ("DPM++ 2M", "Euler a").
    pub sampler: Option<String>,
    /// A1111's schedule type ("Karras", "Automatic").
    pub schedule_type: Option<String>,
    pub cfg_scale: Option<f64>,
    pub seed: Option<u64>,
    /// `(width, height)`.
    pub size: Option<(usize, usize)>,
    pub model_hash: Option<String>,
    pub model: Option<String>,
    pub denoising_strength: Option<f64>,
    pub clip_skip: Option<usize>,
    /// Ours: the exact scheduler name `--scheduler` takes (a short name, or the model's class).
    pub scheduler: Option<String>,
    pub dtype: Option<String>,
    /// Ours: images drawn from one seed in one batch, and this image's place in it (from 0).
    pub batch_size: Option<usize>,
    pub batch_position: Option<usize>,
    pub guidance_rescale: Option<f64>,
    pub eta: Option<f64>,
    pub engine: Option<String>,
}

impl GenerationInfo {
    /// The infotext of these settings (absent fields are left out, as A1111 leaves out `None`).
    pub fn to_infotext(&self) -> Infotext {
        let mut params = Vec::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                params.push((k.to_string(), v));
            }
        };
        put("Steps", self.steps.map(|s| s.to_string()));
        put("Sampler", self.sampler.clone());
        put("Schedule type", self.schedule_type.clone());
        put("CFG scale", self.cfg_scale.map(python_float));
        put("Seed", self.seed.map(|s| s.to_string()));
        put("Size", self.size.map(|(w, h)| format!("{w}x{h}")));
        put("Model hash", self.model_hash.clone());
        put("Model", self.model.clone());
        put("Denoising strength", self.denoising_strength.map(python_float));
        put("Clip skip", self.clip_skip.map(|c| c.to_string()));
        put("Scheduler", self.scheduler.clone());
        put("Dtype", self.dtype.clone());
        put("Batch size", self.batch_size.map(|b| b.to_string()));
        put("Batch position", self.batch_position.map(|b| b.to_string()));
        put("Guidance rescale", self.guidance_rescale.map(python_float));
        put("Eta", self.eta.map(python_float));
        put("Engine", self.engine.clone());
        Infotext {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            params,
        }
    }

    /// The settings of a parsed infotext. Keys we do not use are ignored; a key we use with a
    /// value that does not parse is an error naming it.
    pub fn from_infotext(info: &Infotext) -> Result<Self> {
        fn parsed<T: std::str::FromStr>(info: &Infotext, key: &str) -> Result<Option<T>> {
            info.get(key)
                .map(|v| {
                    v.trim().parse::<T>().map_err(|_| {
                        Error::InvalidArgument(format!(
                            "image parameters: `{key}: {v}` is not valid"
                        ))
                    })
                })
                .transpose()
        }
        let text = |key: &str| info.get(key).map(str::to_string);
        let size = match info.get("Size") {
            None => None,
            Some(v) => Some(parse_size(v).ok_or_else(|| {
                Error::InvalidArgument(format!("image parameters: `Size: {v}` is not WxH"))
            })?),
        };
        Ok(GenerationInfo {
            prompt: info.prompt.clone(),
            negative_prompt: info.negative_prompt.clone(),
            steps: parsed(info, "Steps")?,
            sampler: text("Sampler"),
            schedule_type: text("Schedule type"),
            cfg_scale: parsed(info, "CFG scale")?,
            seed: parsed(info, "Seed")?,
            size,
            model_hash: text("Model hash"),
            model: text("Model"),
            denoising_strength: parsed(info, "Denoising strength")?,
            clip_skip: parsed(info, "Clip skip")?,
            scheduler: text("Scheduler"),
            dtype: text("Dtype"),
            batch_size: parsed(info, "Batch size")?,
            batch_position: parsed(info, "Batch position")?,
            guidance_rescale: parsed(info, "Guidance rescale")?,
            eta: parsed(info, "Eta")?,
            engine: text("Engine"),
        })
    }

    /// The scheduler name to run these settings with: ours when present, else A1111's sampler
    /// with its schedule type ("DPM++ 2M" + "Karras" -> "DPM++ 2M Karras") when we know that
    /// name, else the sampler alone.
    pub fn scheduler_name(&self) -> Option<String> {
        if let Some(s) = &self.scheduler {
            return Some(s.clone());
        }
        let sampler = self.sampler.as_ref()?;
        match self.schedule_type.as_deref() {
            Some(t) if !t.eq_ignore_ascii_case("automatic") => {
                let combined = format!("{sampler} {t}");
                if crate::schedulers::find_scheduler(&combined).is_ok() {
                    return Some(combined);
                }
                Some(sampler.clone())
            }
            _ => Some(sampler.clone()),
        }
    }
}

fn parse_size(v: &str) -> Option<(usize, usize)> {
    let (w, h) = v.trim().split_once('x')?;
    Some((w.parse().ok()?, h.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_matches_repr() {
        let cases = [
            (7.5, "7.5"),
            (7.0, "7.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567.0, "1234567.0"),
            (1.2345e20, "1.2345e+20"),
            (-2.5, "-2.5"),
            (0.75, "0.75"),
        ];
        for (v, want) in cases {
            assert_eq!(python_float(v), want, "{v}");
        }
    }

    #[test]
    fn quote_follows_a1111() {
        assert_eq!(quote("Euler a"), "Euler a");
        assert_eq!(quote("a, b"), "\"a, b\"");
        assert_eq!(quote("k: v"), "\"k: v\"");
        assert_eq!(quote("say \"hi\", ok"), "\"say \\\"hi\\\", ok\"");
        assert_eq!(quote("é, ü"), "\"é, ü\"");
        assert_eq!(unquote(&quote("say \"hi\", ok")), "say \"hi\", ok");
    }

    #[test]
    fn writes_a1111_layout() {
        let info = Infotext {
            prompt: "a cat, sitting".into(),
            negative_prompt: "blurry".into(),
            params: vec![
                ("Steps".into(), "20".into()),
                ("Sampler".into(), "DPM++ 2M".into()),
                ("CFG scale".into(), "7.0".into()),
                ("Model".into(), "sd, v2".into()),
            ],
        };
        assert_eq!(
            info.to_text(),
            "a cat, sitting\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, CFG scale: \
             7.0, Model: \"sd, v2\""
        );
        assert_eq!(Infotext::parse(&info.to_text()), info);
    }

    #[test]
    fn parses_a1111_text() {
        let text = "girl, (blue eyes:1.2)\nsecond line\nNegative prompt: ugly, [blurry]\n\
                    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: \
                    290643261, Size: 512x768, Model hash: abc123, Model: \"My, model\", Lora \
                    hashes: \"a: 1, b: 2\", Version: v1.10.1";
        let info = Infotext::parse(text);
        assert_eq!(info.prompt, "girl, (blue eyes:1.2)\nsecond line");
        assert_eq!(info.negative_prompt, "ugly, [blurry]");
        assert_eq!(info.get("Model"), Some("My, model"));
        assert_eq!(info.get("Lora hashes"), Some("a: 1, b: 2"));
        assert_eq!(info.get("Version"), Some("v1.10.1"));
        let g = GenerationInfo::from_infotext(&info).unwrap();
        assert_eq!(g.steps, Some(30));
        assert_eq!(g.size, Some((512, 768)));
        assert_eq!(g.seed, Some(290643261));
        assert_eq!(g.cfg_scale, Some(4.5));
        assert_eq!(g.scheduler_name().as_deref(), Some("DPM++ 2M Karras"));
    }

    #[test]
    fn a_last_line_with_fewer_than_three_pairs_is_prompt() {
        let info = Infotext::parse("just a prompt: with a colon\nSteps: 3");
        assert_eq!(info.prompt, "just a prompt: with a colon\nSteps: 3");
        assert!(info.params.is_empty());
    }

    #[test]
    fn round_trips_our_settings() {
        let g = GenerationInfo {
            prompt: "a \"quoted\" prompt, with: colons".into(),
            negative_prompt: String::new(),
            steps: Some(4),
            sampler: Some("Euler a".into()),
            schedule_type: Some("Automatic".into()),
            cfg_scale: Some(7.5),
            seed: Some(u64::MAX >> 1),
            size: Some((64, 48)),
            model_hash: Some("0123456789".into()),
            model: Some("sd2-tiny".into()),
            denoising_strength: Some(0.6),
            clip_skip: None,
            scheduler: Some("euler_a".into()),
            dtype: Some("f32".into()),
            batch_size: Some(2),
            batch_position: Some(1),
            guidance_rescale: Some(0.7),
            eta: None,
            engine: Some("sd-rs 0.1.0".into()),
        };
        let text = g.to_infotext().to_text();
        assert!(!text.contains("Negative prompt"));
        let back = GenerationInfo::from_infotext(&Infotext::parse(&text)).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn bad_values_name_the_key() {
        let info = Infotext::parse("p\nSteps: many, Sampler: Euler, Seed: 1");
        let err = GenerationInfo::from_infotext(&info).unwrap_err().to_string();
        assert!(err.contains("Steps: many"), "{err}");
    }
}
