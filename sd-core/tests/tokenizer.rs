//! Parity of `ClipTokenizer` with transformers 5.24's `CLIPTokenizer`, on the fixtures written by
//! `scripts/fixtures/gen_tokenizer.py` (tests/fixtures/tokenizer/): every prompt with the SD 2.x
//! ("!") and SD 1.x ("<|endoftext|>") pad conventions, a few config variants, and the errors.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sd_core::tokenizer::ClipTokenizer;
use sd_core::Error;
use serde_json::Value;
use support::{read_json_file, tokenizer_fixtures};

fn doc() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| read_json_file(&tokenizer_fixtures().join("prompts.json")))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("an id list").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A scratch folder under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sd-core-tokenizer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A scratch folder holding a copy of the sd2 fixture (all four files).
    fn with_sd2(name: &str) -> Self {
        let s = Self::new(name);
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(tokenizer_fixtures().join("sd2").join(f), s.0.join(f)).unwrap();
        }
        s
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Checks one case object ({"ids", "unpadded", "decoded", "truncated_text"?}) and returns a
/// description of each mismatch.
fn check_case(tok: &ClipTokenizer, prompt: &str, expected: &Value, label: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let want = ids(&expected["ids"]);
    let got = tok.encode(prompt).unwrap();
    if got != want {
        failures.push(format!("{label} {prompt:?}: encode\n   got {got:?}\n  want {want:?}"));
    }
    let want = ids(&expected["unpadded"]);
    let got = tok.encode_unpadded(prompt).unwrap();
    if got != want {
        failures
            .push(format!("{label} {prompt:?}: encode_unpadded\n   got {got:?}\n  want {want:?}"));
    }
    let want = expected["decoded"].as_str().unwrap();
    let got = tok.decode(&got).unwrap();
    if got != want {
        failures.push(format!("{label} {prompt:?}: decode\n   got {got:?}\n  want {want:?}"));
    }
    let want = expected.get("truncated_text").and_then(Value::as_str);
    let got = tok.truncated_text(prompt).unwrap();
    if got.as_deref() != want {
        failures
            .push(format!("{label} {prompt:?}: truncated_text\n   got {got:?}\n  want {want:?}"));
    }
    failures
}

fn check_folder(name: &str) {
    let doc = doc();
    let tok = ClipTokenizer::from_folder(&tokenizer_fixtures().join(name)).unwrap();
    let info = &doc["folders"][name];
    assert_eq!(tok.max_length(), info["model_max_length"].as_u64().unwrap() as usize);
    assert_eq!(tok.pad_id() as u64, info["pad_id"].as_u64().unwrap());
    assert_eq!(tok.bos_id() as u64, info["bos_id"].as_u64().unwrap());
    assert_eq!(tok.eos_id() as u64, info["eos_id"].as_u64().unwrap());
    assert_eq!(tok.pad_token(), info["pad_token"].as_str().unwrap());

    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 60, "only {} prompts", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        failures.extend(check_case(&tok, prompt, &case[name], name));
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ from transformers:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn fixtures_were_made_without_ftfy() {
    // transformers 5's CLIPTokenizer has no ftfy path at all; the generator records it anyway.
    assert_eq!(doc()["ftfy_installed"], Value::Bool(false));
    assert_eq!(doc()["transformers_version"], "5.24.0");
}

#[test]
fn matches_transformers_sd2_pad_bang() {
    check_folder("sd2");
}

#[test]
fn matches_transformers_sd1_pad_endoftext() {
    check_folder("sd1");
}

#[test]
fn pad_conventions() {
    let sd2 = ClipTokenizer::from_folder(&tokenizer_fixtures().join("sd2")).unwrap();
    let sd1 = ClipTokenizer::from_folder(&tokenizer_fixtures().join("sd1")).unwrap();
    assert_eq!((sd2.pad_id(), sd2.bos_id(), sd2.eos_id(), sd2.max_length()), (0, 49406, 49407, 77));
    assert_eq!(
        (sd1.pad_id(), sd1.bos_id(), sd1.eos_id(), sd1.max_length()),
        (49407, 49406, 49407, 77)
    );
    assert_eq!(sd2.vocab_size(), 49408);
    assert_eq!(sd2.token_to_id("cat</w>"), sd1.token_to_id("cat</w>"));

    let empty = sd2.encode("").unwrap();
    assert_eq!(empty.len(), 77);
    assert_eq!(&empty[..3], &[49406, 49407, 0]);
    assert!(empty[2..].iter().all(|&id| id == 0));
    let empty = sd1.encode("").unwrap();
    assert_eq!(&empty[..2], &[49406, 49407]);
    assert!(empty[2..].iter().all(|&id| id == 49407));

    // Truncation keeps bos + the first 75 tokens + eos.
    let long = "a ".repeat(100);
    let ids = sd2.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert_eq!(sd2.encode_unpadded(&long).unwrap().len(), 102);
    assert_eq!(&sd2.encode_unpadded(&long).unwrap()[..76], &ids[..76]);
    assert_eq!(sd2.truncated_text(&"a ".repeat(75)).unwrap(), None);
    assert_eq!(sd2.truncated_text(&"a ".repeat(76)).unwrap().as_deref(), Some("a"));
}

#[test]
fn matches_transformers_config_variants() {
    let variants = doc()["variants"].as_array().unwrap();
    assert!(!variants.is_empty());
    let mut failures = Vec::new();
    for v in variants {
        let name = v["name"].as_str().unwrap();
        let scratch = Scratch::new(&format!("variant-{name}"));
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(tokenizer_fixtures().join("sd2").join(f), scratch.0.join(f)).unwrap();
        }
        for (file, content) in v["files"].as_object().unwrap() {
            if !content.is_null() {
                std::fs::write(
                    scratch.0.join(file),
                    serde_json::to_string_pretty(content).unwrap(),
                )
                .unwrap();
            }
        }
        let tok = ClipTokenizer::from_folder(&scratch.0)
            .unwrap_or_else(|e| panic!("variant {name}: {e}"));
        let header = (
            tok.pad_id() as u64,
            tok.bos_id() as u64,
            tok.eos_id() as u64,
            tok.max_length() as u64,
        );
        let want = (
            v["pad_id"].as_u64().unwrap(),
            v["bos_id"].as_u64().unwrap(),
            v["eos_id"].as_u64().unwrap(),
            v["max_length"].as_u64().unwrap(),
        );
        if header != want {
            failures.push(format!(
                "variant {name}: (pad, bos, eos, max_length) {header:?}, want {want:?}"
            ));
        }
        assert_eq!(tok.pad_token(), v["pad_token"].as_str().unwrap(), "variant {name}");
        for case in v["cases"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            failures.extend(check_case(&tok, prompt, case, &format!("variant {name}")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn expect_not_found(dir: &Path, file: &str) {
    let err = ClipTokenizer::from_folder(dir).unwrap_err();
    match &err {
        Error::NotFound { path } => assert_eq!(path, &dir.join(file), "{err}"),
        other => panic!("expected NotFound for {file}, got {other:?}"),
    }
    assert!(err.to_string().contains(file), "{err}");
}

fn expect_config_error(dir: &Path, file: &str, needle: &str) {
    let err = ClipTokenizer::from_folder(dir).unwrap_err();
    match &err {
        Error::Config { path, .. } => assert_eq!(path, &dir.join(file), "{err}"),
        other => panic!("expected a Config error for {file}, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(file) && msg.contains(needle),
        "{msg:?} should name {file} and say {needle:?}"
    );
}

#[test]
fn missing_folder_is_not_found() {
    let dir = tokenizer_fixtures().join("no-such-tokenizer");
    match ClipTokenizer::from_folder(&dir).unwrap_err() {
        Error::NotFound { path } => assert_eq!(path, dir),
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_vocab_is_not_found() {
    let s = Scratch::with_sd2("missing-vocab");
    std::fs::remove_file(s.0.join("vocab.json")).unwrap();
    expect_not_found(&s.0, "vocab.json");
}

#[test]
fn missing_merges_is_not_found() {
    let s = Scratch::with_sd2("missing-merges");
    std::fs::remove_file(s.0.join("merges.txt")).unwrap();
    expect_not_found(&s.0, "merges.txt");
}

#[test]
fn malformed_vocab_names_the_file() {
    let s = Scratch::with_sd2("bad-vocab-json");
    std::fs::write(s.0.join("vocab.json"), "{\"a\": 1,").unwrap();
    expect_config_error(&s.0, "vocab.json", "not valid JSON");

    std::fs::write(s.0.join("vocab.json"), "[1, 2]").unwrap();
    expect_config_error(&s.0, "vocab.json", "JSON object");

    std::fs::write(s.0.join("vocab.json"), "{\"a\": -1}").unwrap();
    expect_config_error(&s.0, "vocab.json", "not a u32");
}

#[test]
fn malformed_merges_name_the_file() {
    let s = Scratch::with_sd2("bad-merges");
    std::fs::write(s.0.join("merges.txt"), "#version: 0.2\ni n\nthree parts here\n").unwrap();
    expect_config_error(&s.0, "merges.txt", "line 3");

    // A merge of tokens the vocabulary lacks.
    std::fs::write(s.0.join("merges.txt"), "#version: 0.2\nnot-a-token other-missing\n").unwrap();
    expect_config_error(&s.0, "merges.txt", "not-a-token");
}

#[test]
fn malformed_configs_name_the_file() {
    let s = Scratch::with_sd2("bad-config");
    std::fs::write(s.0.join("tokenizer_config.json"), "{ not json").unwrap();
    expect_config_error(&s.0, "tokenizer_config.json", "not valid JSON");

    std::fs::write(s.0.join("tokenizer_config.json"), r#"{"model_max_length": "77"}"#).unwrap();
    expect_config_error(&s.0, "tokenizer_config.json", "model_max_length");

    std::fs::write(s.0.join("tokenizer_config.json"), r#"{"model_max_length": 1}"#).unwrap();
    expect_config_error(&s.0, "tokenizer_config.json", "model_max_length");

    std::fs::write(s.0.join("tokenizer_config.json"), r#"{"pad_token": 5}"#).unwrap();
    expect_config_error(&s.0, "tokenizer_config.json", "pad_token");

    std::fs::write(s.0.join("tokenizer_config.json"), r#"{"pad_token": null}"#).unwrap();
    std::fs::remove_file(s.0.join("special_tokens_map.json")).unwrap();
    expect_config_error(&s.0, "tokenizer_config.json", "pad_token");

    std::fs::write(s.0.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(s.0.join("special_tokens_map.json"), r#"{"pad_token": {"lstrip": false}}"#)
        .unwrap();
    expect_config_error(&s.0, "special_tokens_map.json", "content");
}

#[test]
fn max_length_sentinels_default_to_77() {
    let s = Scratch::with_sd2("max-length");
    for (value, want) in [
        ("1e30", 77),
        ("1000000000000000019884624838656", 77),
        ("null", 77),
        ("77.0", 77),
        ("16", 16),
    ] {
        std::fs::write(
            s.0.join("tokenizer_config.json"),
            format!(r#"{{"pad_token": "!", "model_max_length": {value}}}"#),
        )
        .unwrap();
        let tok = ClipTokenizer::from_folder(&s.0).unwrap();
        assert_eq!(tok.max_length(), want, "model_max_length {value}");
        assert_eq!(tok.encode("a photo").unwrap().len(), want);
    }
}

#[test]
fn decode_rejects_unknown_ids() {
    let tok = ClipTokenizer::from_folder(&tokenizer_fixtures().join("sd2")).unwrap();
    assert!(matches!(tok.decode(&[49406, 1_000_000]), Err(Error::Tokenizer(_))));
}
