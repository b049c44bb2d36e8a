//! Textual inversion, clip_skip and A1111 prompt weighting against `tests/fixtures/text`
//! (`scripts/fixtures/gen_text_adapters.py`): diffusers' runs with a textual-inversion embedding
//! in each layout and with clip_skip, and a reference of A1111's parser, chunking and weighting.
//! Parser, ids and multipliers exactly; embeddings within 1e-5 (A1111) / 1e-4 (runs); images
//! within mean |diff| 0.5, max |diff| 4.

mod support;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_core::pipeline::{GenerateParams, PromptSyntax, StableDiffusionPipeline};
use sd_core::prompt::chunks::{tokenize_chunks, PromptChunk};
use sd_core::prompt::parse::{parse_prompt_attention, WeightedText};
use support::*;

fn text_fixtures() -> PathBuf {
    fixtures().join("text")
}

#[derive(serde::Deserialize)]
struct TextCase {
    prompt: String,
    negative_prompt: String,
    seed: u64,
    height: usize,
    width: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
}

#[derive(serde::Deserialize)]
struct A1111Prompt {
    prompt: String,
    /// `[text, repr(weight)]` (multipliers too): Rust's `str::parse` rounds exactly,
    /// serde_json's float reader may not.
    parsed: Vec<(String, String)>,
    #[serde(default)]
    chunks: Vec<ReferenceChunk>,
}

#[derive(serde::Deserialize)]
struct ReferenceChunk {
    ids: Vec<u32>,
    multipliers: Vec<String>,
}

impl A1111Prompt {
    fn parsed(&self) -> Vec<WeightedText> {
        self.parsed.iter().map(|(t, w)| WeightedText::new(t, w.parse().unwrap())).collect()
    }

    fn chunks(&self) -> Vec<PromptChunk> {
        let chunk = |c: &ReferenceChunk| PromptChunk {
            ids: c.ids.clone(),
            multipliers: c.multipliers.iter().map(|m| m.parse().unwrap()).collect(),
        };
        self.chunks.iter().map(chunk).collect()
    }
}

#[derive(serde::Deserialize)]
struct A1111Reference {
    prompts: Vec<A1111Prompt>,
    parsed_only: Vec<A1111Prompt>,
}

fn a1111_reference() -> A1111Reference {
    read_json_file(&text_fixtures().join("a1111.json"))
}

fn load_case(name: &str) -> (TextCase, std::collections::HashMap<String, Tensor>) {
    let dir = text_fixtures();
    (
        read_json_file(&dir.join(format!("{name}.json"))),
        read_tensors(&dir.join(format!("{name}.safetensors"))),
    )
}

fn case_params(case: &TextCase) -> GenerateParams {
    let mut p = GenerateParams::new(case.prompt.clone());
    p.negative_prompts = Some(vec![case.negative_prompt.clone()]);
    p.height = Some(case.height);
    p.width = Some(case.width);
    p.num_inference_steps = case.num_inference_steps;
    p.guidance_scale = case.guidance_scale;
    p.seeds = vec![case.seed];
    p
}

fn check_image(pipe: &StableDiffusionPipeline, params: &GenerateParams, name: &str) {
    let out = pipe.generate(params).unwrap();
    let expected = image::open(text_fixtures().join(format!("{name}.png"))).unwrap().to_rgb8();
    assert_image_close(out.images[0].as_raw(), expected.as_raw(), name);
}

fn with_embeddings() -> StableDiffusionPipeline {
    let mut pipe = fixture_pipeline("sd2-tiny");
    let dir = text_fixtures();
    let added =
        pipe.load_textual_inversion(&dir.join("ti_emb_params.safetensors"), Some("<red-cube>"));
    assert_eq!(added.unwrap(), ["<red-cube>"]);
    let added = pipe.load_textual_inversion(&dir.join("ti_a1111.safetensors"), None).unwrap();
    assert_eq!(added, ["<blue-ball>", "<blue-ball>_1", "<blue-ball>_2"]);
    pipe
}

#[test]
fn a1111_parser_matches_reference() {
    let reference = a1111_reference();
    for case in reference.prompts.iter().chain(&reference.parsed_only) {
        assert_eq!(
            parse_prompt_attention(&case.prompt).unwrap(),
            case.parsed(),
            "{:?}",
            case.prompt
        );
    }
    assert!(parse_prompt_attention("(x:1.2.3)").is_err());
}

#[test]
fn a1111_chunks_and_embeddings_match_reference() {
    let pipe = fixture_pipeline("sd2-tiny");
    let embeds = read_tensors(&text_fixtures().join("a1111.safetensors"));
    for (i, case) in a1111_reference().prompts.iter().enumerate() {
        let chunks = tokenize_chunks(&pipe.tokenizer, &case.parsed()).unwrap();
        assert_eq!(chunks, case.chunks(), "chunks of {:?}", case.prompt);
        let z = pipe
            .encode_prompts_with(std::slice::from_ref(&case.prompt), PromptSyntax::A1111, None)
            .unwrap();
        assert_close(&z, get(&embeds, &format!("embeds.{i}")), 1e-5, &case.prompt);
    }
}

/// A plain prompt that fits in one chunk encodes as diffusers encodes it.
#[test]
fn a1111_plain_prompt_is_diffusers() {
    let pipe = fixture_pipeline("sd2-tiny");
    let prompts = ["a red cube on a table".to_string(), String::new()];
    let plain = pipe.encode_prompts(&prompts).unwrap();
    let a1111 = pipe.encode_prompts_with(&prompts, PromptSyntax::A1111, None).unwrap();
    assert_close(&a1111, &plain, 0.0, "unweighted A1111 prompt");
}

#[test]
fn a1111_long_prompt_runs_like_diffusers_with_its_embeddings() {
    let (case, refs) = load_case("a1111_long");
    let pipe = fixture_pipeline("sd2-tiny");
    let mut params = case_params(&case);
    params.prompt_syntax = PromptSyntax::A1111;
    let both = pipe
        .encode_prompts_with(
            &[case.negative_prompt.clone(), case.prompt.clone()],
            PromptSyntax::A1111,
            None,
        )
        .unwrap();
    assert_close(
        &both.get(0).unwrap().unsqueeze(0).unwrap(),
        get(&refs, "negative_prompt_embeds"),
        1e-5,
        "uncond",
    );
    assert_close(
        &both.get(1).unwrap().unsqueeze(0).unwrap(),
        get(&refs, "prompt_embeds"),
        1e-5,
        "cond",
    );
    check_image(&pipe, &params, "a1111_long");
}

#[test]
fn textual_inversion_matches_diffusers() {
    let (case, refs) = load_case("ti");
    let pipe = with_embeddings();
    let expanded = pipe.expand_multi_vector_tokens(&case.prompt).unwrap();
    assert_eq!(expanded, "a <red-cube> next to <blue-ball> <blue-ball>_1 <blue-ball>_2");
    let ids: Vec<i64> =
        pipe.tokenizer.encode(&expanded).unwrap().into_iter().map(i64::from).collect();
    let expected: Vec<i64> = get(&refs, "input_ids").flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ids, expected);
    let cond = pipe.encode_prompts(std::slice::from_ref(&case.prompt)).unwrap();
    assert_close(&cond, get(&refs, "prompt_embeds"), 1e-4, "ti prompt_embeds");
    let uncond = pipe.encode_prompts(std::slice::from_ref(&case.negative_prompt)).unwrap();
    assert_close(&uncond, get(&refs, "negative_prompt_embeds"), 1e-4, "ti negative_prompt_embeds");
    check_image(&pipe, &case_params(&case), "ti");
}

#[test]
fn textual_inversion_refusals() {
    let mut pipe = with_embeddings();
    let dir = tempfile::tempdir().unwrap();
    let pickle = dir.path().join("learned_embeds.bin");
    std::fs::write(&pickle, b"not read").unwrap();
    let err = pipe.load_textual_inversion(&pickle, Some("<x>")).unwrap_err().to_string();
    assert!(err.contains("pickle files are not loaded") && err.contains(".safetensors"), "{err}");

    let again = text_fixtures().join("ti_a1111.safetensors");
    let err = pipe.load_textual_inversion(&again, None).unwrap_err().to_string();
    assert!(err.contains("<blue-ball> is already in the tokenizer"), "{err}");

    let wrong_size = dir.path().join("small.safetensors");
    let vectors = Tensor::zeros((2, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("emb_params".to_string(), vectors)].into(), &wrong_size)
        .unwrap();
    let err = pipe.load_textual_inversion(&wrong_size, Some("<small>")).unwrap_err().to_string();
    assert!(err.contains("size 16, expected 32"), "{err}");
    // nothing was added by the refused loads
    assert_eq!(pipe.tokenizer.token_to_id("<small>"), None);
    assert_eq!(pipe.text_encoder.token_count(), 49408 + 4);
}

#[test]
fn clip_skip_matches_diffusers() {
    let (case, refs) = load_case("clip_skip");
    let pipe = fixture_pipeline("sd2-tiny");
    let skipped = |text: &str| {
        pipe.encode_prompts_with(&[text.to_string()], PromptSyntax::Plain, Some(1)).unwrap()
    };
    assert_close(&skipped(&case.prompt), get(&refs, "prompt_embeds"), 1e-4, "clip_skip prompt");
    let uncond = skipped(&case.negative_prompt);
    assert_close(&uncond, get(&refs, "negative_prompt_embeds"), 1e-4, "clip_skip negative");
    let mut params = case_params(&case);
    params.clip_skip = Some(1);
    check_image(&pipe, &params, "clip_skip");

    params.clip_skip = Some(2);
    let err = pipe.generate(&params).unwrap_err().to_string();
    assert!(err.contains("clip_skip 2 must be less than the text encoder's 2 layers"), "{err}");
}
