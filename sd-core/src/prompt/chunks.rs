//! A1111's long prompts and weights (modules/sd_hijack_clip.py): a parsed prompt is tokenized
//! into chunks of 75 tokens, each framed as 77 ids (`<|startoftext|>`, tokens, `<|endoftext|>`,
//! then the pad id, as A1111's OpenCLIP embedder pads for SD 2.x), with one multiplier per id;
//! the text encoder encodes each chunk, [`apply_multipliers`] weights its output and the chunks
//! are concatenated along the tokens.

use candle_core::{DType, Tensor};

use super::parse::WeightedText;
use crate::tokenizer::ClipTokenizer;
use crate::Result;

/// Prompt tokens per chunk.
pub const CHUNK_TOKENS: usize = 75;

/// Ids per chunk: the prompt tokens between the start and end tokens (CLIP's 77 positions).
pub const CHUNK_IDS: usize = CHUNK_TOKENS + 2;

/// A1111's `comma_padding_backtrack` default: a chunk that fills up within this many tokens after
/// a comma is cut after the comma, and the tokens since move to the next chunk.
pub const COMMA_BACKTRACK: usize = 20;

/// 77 ids and their weights (A1111's `PromptChunk`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    pub ids: Vec<u32>,
    pub multipliers: Vec<f64>,
}

/// Builds chunks as A1111's `tokenize_line` does.
struct ChunkBuilder<'a> {
    tokenizer: &'a ClipTokenizer,
    ids: Vec<u32>,
    multipliers: Vec<f64>,
    last_comma: Option<usize>,
    chunks: Vec<PromptChunk>,
}

impl ChunkBuilder<'_> {
    /// A1111's `next_chunk`, then `process_tokens`' SD 2.x padding: every id after the first end
    /// token becomes the pad id.
    fn close(&mut self) {
        let tok = self.tokenizer;
        let mut ids = Vec::with_capacity(CHUNK_IDS);
        ids.push(tok.bos_id());
        ids.append(&mut self.ids);
        ids.resize(CHUNK_IDS, tok.eos_id());
        let first_end = ids.iter().position(|&id| id == tok.eos_id()).expect("an end token");
        ids[first_end + 1..].fill(tok.pad_id());
        let mut multipliers = vec![1.0];
        multipliers.append(&mut self.multipliers);
        multipliers.resize(CHUNK_IDS, 1.0);
        self.chunks.push(PromptChunk { ids, multipliers });
        self.last_comma = None;
    }

    fn push(&mut self, token: u32, weight: f64, comma: Option<u32>) {
        if Some(token) == comma {
            self.last_comma = Some(self.ids.len());
        } else if let Some(last_comma) = self.last_comma {
            if self.ids.len() == CHUNK_TOKENS && self.ids.len() - last_comma <= COMMA_BACKTRACK {
                let moved_ids = self.ids.split_off(last_comma + 1);
                let moved_multipliers = self.multipliers.split_off(last_comma + 1);
                self.close();
                self.ids = moved_ids;
                self.multipliers = moved_multipliers;
            }
        }
        if self.ids.len() == CHUNK_TOKENS {
            self.close();
        }
        self.ids.push(token);
        self.multipliers.push(weight);
    }
}

/// A1111's `tokenize_line` for a parsed prompt: at least one chunk; `BREAK` starts a new one.
/// The comma is the vocabulary's `,</w>`.
pub fn tokenize_chunks(
    tokenizer: &ClipTokenizer,
    spans: &[WeightedText],
) -> Result<Vec<PromptChunk>> {
    let comma = tokenizer.token_to_id(",</w>");
    let mut builder = ChunkBuilder {
        tokenizer,
        ids: vec![],
        multipliers: vec![],
        last_comma: None,
        chunks: vec![],
    };
    for span in spans {
        if span.is_break() {
            builder.close();
            continue;
        }
        for token in tokenizer.tokenize(&span.text)? {
            builder.push(token, span.weight, comma);
        }
    }
    if !builder.ids.is_empty() || builder.chunks.is_empty() {
        builder.close();
    }
    Ok(builder.chunks)
}

/// A1111's `empty_chunk`, the padding of prompts with fewer chunks: the empty prompt, weight 1.
pub fn empty_chunk(tokenizer: &ClipTokenizer) -> Result<PromptChunk> {
    Ok(tokenize_chunks(tokenizer, &[])?.remove(0))
}

/// A1111's `EmphasisOriginal`: `z` `[chunks, 77, hidden]` times `multipliers` `[chunks, 77]` per
/// token, then rescaled so that each chunk's mean is its mean before (A1111 takes one mean over
/// the batch of prompts it encodes together; per chunk gives each prompt the same embedding
/// whatever it is batched with, and is the same for a batch of one). Computed in f32.
pub fn apply_multipliers(z: &Tensor, multipliers: &Tensor) -> Result<Tensor> {
    let dtype = z.dtype();
    let z = z.to_dtype(DType::F32)?;
    let chunks = z.dim(0)?;
    let chunk_mean = |t: &Tensor| t.reshape((chunks, ()))?.mean_keepdim(1)?.unsqueeze(2);
    let original = chunk_mean(&z)?;
    let weighted = z.broadcast_mul(&multipliers.to_dtype(DType::F32)?.unsqueeze(2)?)?;
    let rescale = (original / chunk_mean(&weighted)?)?;
    Ok(weighted.broadcast_mul(&rescale)?.to_dtype(dtype)?)
}
