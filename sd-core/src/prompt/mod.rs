//! Prompt syntaxes beyond diffusers' plain text. diffusers defines no weighting or long-prompt
//! syntax, so [`PromptSyntax::A1111`] follows AUTOMATIC1111's webui (`modules/prompt_parser.py`
//! `parse_prompt_attention`, `modules/sd_hijack_clip.py` `tokenize_line` and `process_tokens`,
//! `EmphasisOriginal`): [`parse`] reads the weights and `BREAK`s, [`chunks`] cuts the tokens into
//! 77-id chunks and applies the weights to the encoder's output.

pub mod chunks;
pub mod parse;

use std::str::FromStr;

use crate::Error;

/// How a prompt's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// diffusers: the text as it is, truncated to 77 tokens.
    #[default]
    Plain,
    /// A1111: `(word)`, `(word:1.3)`, `[word]`, `\(` escapes, `BREAK`, any length (77-token
    /// chunks concatenated along the tokens).
    A1111,
}

impl FromStr for PromptSyntax {
    type Err = Error;

    fn from_str(name: &str) -> crate::Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "plain" => Ok(Self::Plain),
            "a1111" => Ok(Self::A1111),
            _ => Err(Error::invalid(format!(
                "unknown prompt syntax {name:?} (expected plain or a1111)"
            ))),
        }
    }
}
