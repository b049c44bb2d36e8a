//! The fuzz loop: a seeded generator, case counts, and a runner that turns every panic into a
//! test failure printing the input that caused it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// SplitMix64: small, seedable and the same on every platform, so a case number names an input.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// The case count of a target: `base` times `SD_FUZZ_CASES` (a multiplier, default 1), so a
/// longer session is `SD_FUZZ_CASES=10 cargo test -p sd-core --test fuzz`. Case `i` is the same
/// input whatever the multiplier, so a longer run adds new inputs after the CI ones.
pub fn case_count(base: usize) -> usize {
    let multiplier = std::env::var("SD_FUZZ_CASES").ok().and_then(|v| v.parse::<usize>().ok());
    base * multiplier.unwrap_or(1).max(1)
}

/// `SD_FUZZ_CASE=N`: run only case `N` of each target (to reproduce a reported failure under a
/// debugger or with prints).
fn only_case() -> Option<usize> {
    std::env::var("SD_FUZZ_CASE").ok().and_then(|v| v.parse().ok())
}

/// Where failing inputs are written: `SD_FUZZ_FAILURES`, else `fuzz-failures` in Cargo's
/// temporary folder for integration tests (`target/tmp`).
fn failures_dir() -> std::path::PathBuf {
    std::env::var_os("SD_FUZZ_FAILURES")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures"))
}

/// Runs `case_count(base)` cases of `target`: case `i` gets an [`Rng`] seeded from the target
/// name and `i` (the same inputs on every run), `make` builds the input and `check` runs the code
/// under test on it, returning `Err` for a wrong outcome (e.g. an untyped error). A panic or an
/// `Err` fails the test with the case number and the input; `save` gives the input as the bytes
/// of a file (the weight file, the config, the prompt...), written whole to
/// [`failures_dir`]`/<target>-case<i>.bin` for reproduction and shown escaped in the report.
pub fn fuzz<I>(
    target: &str,
    base: usize,
    mut make: impl FnMut(&mut Rng) -> I,
    save: impl Fn(&I) -> Vec<u8>,
    check: impl Fn(&I) -> Result<(), String>,
) {
    let cases = case_count(base);
    let seed = target.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3) // FNV-1a of the name
    });
    let only = only_case();
    let (mut failures, mut panics, mut ran) = (Vec::new(), 0, 0);
    let started = std::time::Instant::now();
    for case in 0..cases {
        if only.is_some_and(|only| only != case) {
            continue;
        }
        ran += 1;
        let mut rng = Rng::new(seed ^ (case as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let input = make(&mut rng);
        let outcome = match catch_unwind(AssertUnwindSafe(|| check(&input))) {
            Ok(Ok(())) => continue,
            Ok(Err(wrong)) => format!("wrong outcome: {wrong}"),
            Err(panic) => {
                panics += 1;
                format!("PANIC: {}", panic_message(&*panic))
            }
        };
        let bytes = save(&input);
        let file = failures_dir().join(format!("{}-case{case}.bin", target.replace(' ', "_")));
        let saved = std::fs::create_dir_all(file.parent().expect("a folder"))
            .and_then(|()| std::fs::write(&file, &bytes))
            .map_or_else(
                |e| format!("(not saved: {e})"),
                |()| format!("saved to {}", file.display()),
            );
        failures
            .push(format!("case {case}: {outcome}\n  input ({saved}): {}", escaped(&bytes, 2000)));
    }
    let wrong = failures.len() - panics;
    eprintln!(
        "fuzz {target}: {ran} cases, {panics} panics, {wrong} wrong outcomes ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "fuzz {target}:\n{}", failures.join("\n"));
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Bytes as an escaped string (`\xNN` for non-ASCII), cut to `max` bytes, for failure reports.
pub fn escaped(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let more = if bytes.len() > max { format!("... ({} bytes)", bytes.len()) } else { "".into() };
    format!("b\"{}\"{more}", cut.escape_ascii())
}

// ---- input generators shared by the targets ----

/// A JSON value of the kinds configs get wrong: wrong types, huge, negative and fractional
/// numbers, non-finite spellings, empty and nested containers.
pub fn junk_value(rng: &mut Rng, depth: usize) -> serde_json::Value {
    use serde_json::{json, Value};
    let leaves = [
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(2),
        json!(-1),
        json!(3),
        json!(7),
        json!(0.5),
        json!(-0.0),
        json!(1e-300),
        json!(1e300),
        json!(-1e300),
        json!(i64::MIN),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(1u64 << 40),
        json!(4294967296u64),
        json!(""),
        json!("NaN"),
        json!("Infinity"),
        json!("-Infinity"),
        json!("1000"),
        json!("linear"),
        json!("\u{0}\u{ffff}é"),
        json!([]),
        json!({}),
    ];
    match rng.below(if depth == 0 { 4 } else { 6 }) {
        0..=2 => rng.pick(&leaves).clone(),
        3 => json!(rng.next_u64() as i64 >> rng.below(64)),
        4 => Value::Array((0..rng.below(4)).map(|_| junk_value(rng, depth - 1)).collect()),
        _ => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.below(3) {
                map.insert(format!("k{}", rng.below(4)), junk_value(rng, depth - 1));
            }
            Value::Object(map)
        }
    }
}

/// A number near `x`'s scale or an edge of it (zero, negative, huge, fractional), for mutating
/// numeric config values while keeping the type.
pub fn nearby_number(rng: &mut Rng, x: f64) -> serde_json::Value {
    use serde_json::json;
    match rng.below(8) {
        0 => json!(0),
        1 => json!(-x),
        2 => json!(x * 2.0),
        3 => json!((x + 1.0).floor()),
        4 => json!(x + 0.5),
        5 => json!(1u64 << (20 + rng.below(44))),
        6 => json!(1),
        _ => json!((x / 2.0).floor()),
    }
}

/// `value` with one to three random edits: a key's value replaced by junk or a nearby number,
/// a key removed, a junk key added; nested objects and arrays are edited too.
pub fn mutate_json(rng: &mut Rng, value: &serde_json::Value) -> serde_json::Value {
    let mut out = value.clone();
    for _ in 0..1 + rng.below(3) {
        mutate_once(rng, &mut out);
    }
    out
}

fn mutate_once(rng: &mut Rng, value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            match rng.below(8) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(format!("junk{}", rng.below(3)), junk_value(rng, 2));
                }
                2..=4 => mutate_once(rng, map.get_mut(&key).expect("a key of the map")),
                _ => {
                    map.insert(key, junk_value(rng, 2));
                }
            }
        }
        Value::Array(items) if !items.is_empty() && !rng.one_in(4) => {
            let i = rng.below(items.len());
            match rng.below(4) {
                0 => {
                    items.remove(i);
                }
                1 => items.push(items[i].clone()),
                _ => mutate_once(rng, &mut items[i]),
            }
        }
        Value::Number(n) if !rng.one_in(4) => {
            *value = nearby_number(rng, n.as_f64().unwrap_or(1.0))
        }
        _ => *value = junk_value(rng, 2),
    }
}

/// `value` with one of its numbers (at any depth) replaced by [`nearby_number`]: values of the
/// right type that reach the code behind the parser. Unchanged if it holds no number.
pub fn mutate_number(rng: &mut Rng, value: &serde_json::Value) -> serde_json::Value {
    fn numbers(value: &mut serde_json::Value) -> Vec<&mut serde_json::Value> {
        match value {
            serde_json::Value::Number(_) => vec![value],
            serde_json::Value::Array(items) => items.iter_mut().flat_map(numbers).collect(),
            serde_json::Value::Object(map) => map.values_mut().flat_map(numbers).collect(),
            _ => vec![],
        }
    }
    let mut out = value.clone();
    let mut found = numbers(&mut out);
    if !found.is_empty() {
        let i = rng.below(found.len());
        let x = found[i].as_f64().unwrap_or(1.0);
        *found[i] = nearby_number(rng, x);
    }
    out
}

/// Text edits for files that are not JSON (or JSON as text): truncation, byte flips, inserted
/// or deleted runs. May produce invalid UTF-8.
pub fn mutate_bytes(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = if out.is_empty() { 0 } else { rng.below(out.len() + 1) };
        match rng.below(5) {
            0 => out.truncate(at),
            1 if at < out.len() => out[at] ^= 1 << rng.below(8),
            2 => {
                const INSERTS: [&[u8]; 8] =
                    [b"\0", b"\xff\xfe", b"\"", b"{", b"]", b",", b" ", b"\n"];
                out.splice(at..at, rng.pick(&INSERTS).iter().copied());
            }
            3 => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            _ => {
                let len = 1 + rng.below(8);
                let junk = rng.bytes(len);
                out.splice(at..at, junk);
            }
        }
    }
    out
}
