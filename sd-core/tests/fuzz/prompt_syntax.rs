//! A1111 prompt syntax (`PromptSyntax::A1111`): `(x)`, `[x]`, `(x:w)` with any weight text,
//! escapes, unbalanced brackets, `BREAK`, deep nesting and long prompts, through the parser, the
//! 77-id chunking and the pipeline's text encoder and a one-step run.

use sd_core::pipeline::{GenerateParams, PromptSyntax};
use sd_core::prompt::chunks::{tokenize_chunks, CHUNK_IDS};
use sd_core::prompt::parse::parse_prompt_attention;
use sd_core::Error;

use crate::harness::{fuzz, Rng};
use crate::tokenizer::{prompt_bytes, random_prompt, sd2_tiny_pipeline, sd2_tokenizer};

/// A prompt of A1111 syntax pieces (and sometimes the plain prompt generator's odd text), or one
/// of the shapes that stress the parser: deep nesting, many open brackets, many `BREAK`s.
fn random_a1111_prompt(rng: &mut Rng) -> String {
    const PIECES: [&str; 36] = [
        "(", ")", "[", "]", "(", ")", "a cat", " ", ", ", ",", ":", "\\", "\\(", "\\)", "\\[",
        "\\]", "\\\\", "\\x", ":1.5)", ":0)", ":-1)", ":+2)", ":.5)", ":1.2.3)", ":.)", ":..)",
        ":1e3)", ":)", ": 1)", "BREAK", " BREAK ", "xBREAK", "BREAK\n", "(BREAK)", "\u{0}", "é🐈",
    ];
    match rng.below(20) {
        0 => {
            // Deep nesting: 1.1^n overflows to inf past ~7400 levels, 1/1.1^n to 0.
            let n = 1 + rng.below(10_000);
            let (open, close) = *rng.pick(&[("(", ")"), ("[", "]"), ("(", ":2)"), ("(", ":0)")]);
            format!("{}a cat{}", open.repeat(n), close.repeat(n))
        }
        1 => {
            // Many brackets left open: each scales every run after it.
            let piece = *rng.pick(&["(a ", "[a ", "(a, ", "\\(a "]);
            piece.repeat(1 + rng.below(3_000))
        }
        2 => {
            let piece = *rng.pick(&["BREAK ", "a BREAK ", "a, ", "(a:1.1), "]);
            piece.repeat(1 + rng.below(2_000))
        }
        3 => random_prompt(rng),
        _ => {
            let mut text = String::new();
            for _ in 0..rng.below(30) {
                if rng.one_in(8) {
                    text.push_str(&random_prompt(rng).chars().take(8).collect::<String>());
                } else if rng.one_in(10) {
                    // A weight with many digits: parses to a huge number or to inf.
                    text.push_str(&format!(":{})", "9".repeat(1 + rng.below(400))));
                } else {
                    let piece = *rng.pick(&PIECES);
                    text.push_str(piece);
                }
            }
            text
        }
    }
}

/// The parser and the chunking: a weight that is not a number is `Error::InvalidArgument`; else
/// the runs are merged (no two neighbours of the same weight) and every chunk is 77 ids framed
/// by the start and end tokens, with a multiplier per id.
fn check_parse_and_chunks(prompt: &str) -> Result<(), String> {
    let spans = match parse_prompt_attention(prompt) {
        Ok(spans) => spans,
        Err(Error::InvalidArgument(_)) => return Ok(()),
        Err(other) => return Err(format!("parse: not Error::InvalidArgument: {other:?}")),
    };
    if spans.is_empty() {
        return Err("parse gave no runs".into());
    }
    if let Some(w) = spans.windows(2).find(|w| w[0].weight == w[1].weight && !w[1].is_break()) {
        return Err(format!("runs of the same weight not merged: {w:?}"));
    }
    let tokenizer = sd2_tokenizer();
    let chunks = tokenize_chunks(tokenizer, &spans).map_err(|e| format!("chunks: {e}"))?;
    for (i, chunk) in chunks.iter().enumerate() {
        let framed = chunk.ids.first() == Some(&tokenizer.bos_id())
            && chunk.ids.contains(&tokenizer.eos_id());
        if chunk.ids.len() != CHUNK_IDS || chunk.multipliers.len() != CHUNK_IDS || !framed {
            return Err(format!("chunk {i} of {}: {chunk:?}", chunks.len()));
        }
    }
    Ok(())
}

#[test]
fn a1111_prompts_parsed_and_chunked() {
    fuzz("a1111 prompt", 1500, random_a1111_prompt, prompt_bytes, |p| check_parse_and_chunks(p));
}

/// Through the pipeline: the A1111 text encoding (with and without `clip_skip`) and a one-step
/// 64 px run with an A1111 negative prompt. Weights of 0 or inf make NaN embeddings, which must be
/// `Error::NonFinite`, not an image.
#[test]
fn a1111_prompts_through_the_pipeline() {
    let pipe = sd2_tiny_pipeline();
    // Long prompts cost a text-encoder pass per 77 ids: keep these to a few hundred tokens.
    let short = |rng: &mut Rng| {
        let p = random_a1111_prompt(rng);
        p.chars().take(1 + rng.below(600)).collect::<String>()
    };
    fuzz(
        "a1111 prompt pipeline",
        40,
        |rng| (short(rng), short(rng), rng.below(3)),
        |p| serde_json::to_vec(&(&p.0, &p.1, p.2)).expect("json"),
        |(prompt, negative, clip_skip)| {
            let clip_skip = Some(*clip_skip).filter(|&k| k > 0);
            let typed = |what: &str, e: Error| match e {
                Error::InvalidArgument(_) | Error::NonFinite { .. } => Ok(()),
                other => Err(format!("{what}: {other:?}")),
            };
            let texts = [prompt.clone(), negative.clone()];
            if let Err(e) = pipe.encode_prompts_with(&texts, PromptSyntax::A1111, clip_skip) {
                typed("encode_prompts_with", e)?;
            }
            let mut params = GenerateParams::new(prompt.clone());
            params.negative_prompts = Some(vec![negative.clone()]);
            params.prompt_syntax = PromptSyntax::A1111;
            params.clip_skip = clip_skip;
            (params.height, params.width, params.num_inference_steps) = (Some(64), Some(64), 1);
            match pipe.generate(&params) {
                Ok(_) => Ok(()),
                Err(e) => typed("generate", e),
            }
        },
    );
}
