//! Tokenizer folders (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json,
//! added_tokens.json) with broken contents, and prompts of any Unicode through the tokenizer and
//! the pipeline's prompt path.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use sd_core::pipeline::{GenerateParams, StableDiffusionPipeline};
use sd_core::tokenizer::ClipTokenizer;
use sd_core::Error;
use serde_json::{json, Value};

use crate::harness::{fuzz, junk_value, mutate_bytes, mutate_json, Rng};
use crate::support::{pipelines, tokenizer_fixtures};

// ---- tokenizer files ----

/// A cut-down SD 2 tokenizer folder, small enough to rebuild per case: the 512 byte tokens, the
/// first `MERGES` merges and their results, the two special tokens, and SD 2's configs.
struct Folder {
    vocab: Value,
    merges: String,
    config: Value,
    special_map: Value,
}

const MERGES: usize = 300;

fn small_folder() -> Folder {
    let dir = tokenizer_fixtures().join("sd2");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let full: serde_json::Map<String, Value> = serde_json::from_str(&read("vocab.json")).unwrap();
    let keep = 512 + MERGES as u64;
    let mut vocab: serde_json::Map<String, Value> =
        full.into_iter().filter(|(_, id)| id.as_u64().is_some_and(|id| id < keep)).collect();
    vocab.insert("<|startoftext|>".into(), json!(keep));
    vocab.insert("<|endoftext|>".into(), json!(keep + 1));
    let merges_text = read("merges.txt");
    let merges: Vec<&str> = merges_text.lines().take(MERGES + 1).collect(); // + "#version"
    Folder {
        vocab: Value::Object(vocab),
        merges: merges.join("\n") + "\n",
        config: serde_json::from_str(&read("tokenizer_config.json")).unwrap(),
        special_map: serde_json::from_str(&read("special_tokens_map.json")).unwrap(),
    }
}

/// The files of one case, as (name, bytes); a file left out is absent from the folder.
type Files = Vec<(&'static str, Vec<u8>)>;

fn mutated_folder(rng: &mut Rng, base: &Folder) -> Files {
    let json = |v: &Value| serde_json::to_vec(v).expect("json");
    let mut files: Files = vec![
        ("vocab.json", json(&base.vocab)),
        ("merges.txt", base.merges.clone().into_bytes()),
        ("tokenizer_config.json", json(&base.config)),
        ("special_tokens_map.json", json(&base.special_map)),
    ];
    for _ in 0..1 + rng.below(2) {
        match rng.below(8) {
            0 => files[0].1 = json(&mutate_json(rng, &base.vocab)),
            1 => {
                let lines = [
                    "a b c",
                    "",
                    " ",
                    "x y",
                    "<|endoftext|> a",
                    "#version: 0.2",
                    "t h\u{0}",
                    "é ü",
                ];
                let mut text = base.merges.clone();
                let at = rng.below(text.lines().count());
                let offset: usize = text.lines().take(at).map(|l| l.len() + 1).sum();
                text.insert_str(offset, &format!("{}\n", rng.pick(&lines)));
                files[1].1 = text.into_bytes();
            }
            2 => files[1].1 = mutate_bytes(rng, base.merges.as_bytes()),
            3 | 4 => files[2].1 = json(&mutate_json(rng, &base.config)),
            5 => files[3].1 = json(&mutate_json(rng, &base.special_map)),
            6 => {
                let added = json!({"<new>": junk_value(rng, 1), "!": 0, "<|endoftext|>": 813});
                files.push(("added_tokens.json", json(&mutate_json(rng, &added))));
            }
            _ => {
                let i = rng.below(files.len());
                let bytes = mutate_bytes(rng, &files[i].1);
                files[i].1 = bytes;
            }
        }
    }
    if rng.one_in(8) {
        files.remove(rng.below(files.len()));
    }
    files
}

/// Prompts every tokenizer that loads must encode: plain, special tokens, the pad token, empty.
const PROMPTS: [&str; 5] =
    ["a photo of a cat", "<|endoftext|> <|ENDOFTEXT|> <|startoftext|>", "!!!", "", "thé 🐈 \u{0}"];

/// Loads the folder; on success encodes, decodes and truncates. Folder errors must be typed
/// config errors naming a file; a loaded tokenizer must encode any text.
fn check_folder(dir: &Path) -> Result<(), String> {
    let tokenizer = match ClipTokenizer::from_folder(dir) {
        Ok(t) => t,
        Err(Error::Config { .. } | Error::NotFound { .. } | Error::Io { .. }) => return Ok(()),
        Err(other) => return Err(format!("from_folder: {other:?}")),
    };
    for prompt in PROMPTS {
        check_encode(&tokenizer, prompt)?;
    }
    let ids: Vec<u32> = (0..20).map(|i| i * 41).collect();
    match tokenizer.decode(&ids) {
        Ok(_) | Err(Error::Tokenizer(_)) => Ok(()),
        Err(other) => Err(format!("decode: {other:?}")),
    }
}

#[test]
fn tokenizer_folders() {
    let base = small_folder();
    let dir = tempfile::tempdir().unwrap();
    let write = |files: &Files| -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir.path())? {
            std::fs::remove_file(entry?.path())?;
        }
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes)?;
        }
        Ok(())
    };
    fuzz(
        "tokenizer folder",
        300,
        |rng| mutated_folder(rng, &base),
        |files| {
            // Each file after a `==> name (N bytes) <==` line, so the folder can be rebuilt.
            let parts = files.iter().map(|(name, bytes)| {
                [format!("==> {name} ({} bytes) <==\n", bytes.len()).into_bytes(), bytes.clone()]
                    .concat()
            });
            parts.collect::<Vec<_>>().join(&b'\n')
        },
        |files| {
            write(files).map_err(|e| e.to_string())?;
            check_folder(dir.path())
        },
    );
}

// ---- prompts ----

/// `encode` must succeed on any text with `max_length` ids starting with the start token, and
/// decoding and truncation must not fail on them.
fn check_encode(tokenizer: &ClipTokenizer, prompt: &str) -> Result<(), String> {
    let ids = tokenizer.encode(prompt).map_err(|e| format!("encode: {e}"))?;
    if ids.len() != tokenizer.max_length() || ids[0] != tokenizer.bos_id() {
        return Err(format!("encode gave {} ids starting with {}", ids.len(), ids[0]));
    }
    tokenizer.decode(&ids).map_err(|e| format!("decode: {e}"))?;
    tokenizer.truncated_text(prompt).map_err(|e| format!("truncated_text: {e}"))?;
    Ok(())
}

/// Text from the character classes prompts get wrong: controls and NUL, combining marks,
/// zero-width and unusual spaces, emoji sequences, right-to-left and CJK text, the largest
/// code points, special-token look-alikes; sometimes very long.
pub fn random_prompt(rng: &mut Rng) -> String {
    const PIECES: [&str; 24] = [
        "a cat",
        " ",
        "   ",
        "\t",
        "\n",
        "\r\n",
        "\u{0}",
        "\u{1}\u{1f}\u{7f}",
        "\u{85}",
        "e\u{301}\u{302}\u{303}",
        "\u{200b}\u{200d}\u{feff}",
        "\u{a0}\u{2028}\u{3000}",
        "👩\u{200d}👩\u{200d}👧",
        "🏳️\u{200d}🌈",
        "שלום",
        "猫の写真",
        "\u{10ffff}\u{e000}",
        "<|endoftext|>",
        "<|startoftext|>",
        "!",
        "'s'll'd",
        "ǅ\u{130}ß",
        "1234567890",
        "\u{fffd}",
    ];
    let mut text = String::new();
    for _ in 0..rng.below(40) {
        if rng.one_in(4) {
            text.push(char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{fffd}'));
        } else {
            let piece = *rng.pick(&PIECES);
            text.push_str(piece);
        }
    }
    if rng.one_in(40) {
        // Very long: 100k characters of one kind.
        let piece = *rng.pick(&["a ", " ", "🐈", "e\u{301}", "!"]);
        text = piece.repeat(100_000 / piece.chars().count());
    }
    text
}

/// A prompt as its failure file: the UTF-8 text.
pub fn prompt_bytes(prompt: &String) -> Vec<u8> {
    prompt.as_bytes().to_vec()
}

pub fn sd2_tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| ClipTokenizer::from_folder(&tokenizer_fixtures().join("sd2")).unwrap())
}

#[test]
fn prompts_through_the_tokenizer() {
    let tokenizer = sd2_tokenizer();
    fuzz("prompt tokenizer", 800, random_prompt, prompt_bytes, |p| check_encode(tokenizer, p));
}

/// The tiny SD 2 fixture pipeline, in f32 on the CPU, for the targets that run prompts through it.
pub fn sd2_tiny_pipeline() -> StableDiffusionPipeline {
    StableDiffusionPipeline::from_folder(
        &pipelines().join("sd2-tiny"),
        DType::F32,
        &Device::Cpu,
        None,
    )
    .unwrap()
}

/// Prompts through the pipeline: text encoder, and a one-step 64 px run with a negative prompt.
#[test]
fn prompts_through_the_pipeline() {
    let pipe = sd2_tiny_pipeline();
    fuzz(
        "prompt pipeline",
        40,
        |rng| (random_prompt(rng), random_prompt(rng)),
        |p| serde_json::to_vec(&[&p.0, &p.1]).expect("json"),
        |(prompt, negative)| {
            pipe.encode_prompts(std::slice::from_ref(prompt))
                .map_err(|e| format!("encode_prompts: {e}"))?;
            let mut params = GenerateParams::new(prompt.clone());
            params.negative_prompts = Some(vec![negative.clone()]);
            (params.height, params.width, params.num_inference_steps) = (Some(64), Some(64), 1);
            pipe.generate(&params).map(|_| ()).map_err(|e| format!("generate: {e}"))
        },
    );
}
