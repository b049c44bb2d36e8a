//! A1111's `parse_prompt_attention` (modules/prompt_parser.py): a prompt to runs of text and
//! their attention weights. `(x)` multiplies the weights inside by 1.1, `[x]` divides them by 1.1,
//! `(x:w)` multiplies them by `w`; `\(`, `\)`, `\[`, `\]`, `\\` are literal; brackets left open
//! apply to the end; unmatched closing ones are text; `BREAK` (a whole word) becomes its own
//! [`WeightedText::is_break`] entry; neighbouring runs of the same weight are merged.

use crate::{Error, Result};

const ROUND_MULTIPLIER: f64 = 1.1;
const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;

/// A run of prompt text and its weight (A1111's `[text, weight]` pair; `BREAK` is
/// `["BREAK", -1]`).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedText {
    pub text: String,
    pub weight: f64,
}

impl WeightedText {
    pub fn new(text: &str, weight: f64) -> Self {
        Self { text: text.to_string(), weight }
    }

    /// Whether this entry is a `BREAK` (which a bracket around it turns back into text, as in
    /// A1111: its weight is then no longer -1).
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// One match of A1111's `re_attention` alternation.
enum Piece<'a> {
    Escaped(&'a str),
    Open(char),
    WeightClose(&'a str),
    Close(char),
    Text,
}

/// The next piece of `text` (non-empty) and its length in bytes, trying A1111's alternatives in
/// its order.
fn next_piece(text: &str) -> (Piece<'_>, usize) {
    let mut chars = text.chars();
    let first = chars.next().expect("non-empty text");
    match first {
        '\\' => match chars.next() {
            Some(c @ ('(' | ')' | '[' | ']' | '\\')) => {
                (Piece::Escaped(&text[1..2]), 1 + c.len_utf8())
            }
            // a lone backslash: A1111 appends its text after the backslash, ""
            _ => (Piece::Escaped(""), 1),
        },
        '(' | '[' => (Piece::Open(first), 1),
        ')' | ']' => (Piece::Close(first), 1),
        ':' => {
            // `:([+-]?[.\d]+)\)`
            let rest = &text[1..];
            let sign = usize::from(rest.starts_with(['+', '-']));
            let number = rest[sign..].find(|c: char| !(c == '.' || c.is_ascii_digit()));
            match number {
                Some(len) if len > 0 && rest[sign + len..].starts_with(')') => {
                    (Piece::WeightClose(&rest[..sign + len]), 1 + sign + len + 1)
                }
                _ => (Piece::Text, 1),
            }
        }
        _ => {
            let end = text.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(text.len());
            (Piece::Text, end)
        }
    }
}

/// A1111's `parse_prompt_attention`.
///
/// # Errors
/// [`Error::InvalidArgument`] for a weight that is not a number (`(x:1.2.3)`; A1111 raises too).
pub fn parse_prompt_attention(prompt: &str) -> Result<Vec<WeightedText>> {
    let mut spans: Vec<WeightedText> = vec![];
    let mut rounds = vec![];
    let mut squares = vec![];
    let scale_from = |spans: &mut Vec<WeightedText>, start: usize, factor: f64| {
        spans[start..].iter_mut().for_each(|s| s.weight *= factor);
    };
    let mut rest = prompt;
    while !rest.is_empty() {
        let (piece, len) = next_piece(rest);
        let matched = &rest[..len];
        rest = &rest[len..];
        match piece {
            Piece::Escaped(literal) => spans.push(WeightedText::new(literal, 1.0)),
            Piece::Open('(') => rounds.push(spans.len()),
            Piece::Open(_) => squares.push(spans.len()),
            Piece::WeightClose(number) if !rounds.is_empty() => {
                let weight: f64 = number.parse().map_err(|_| {
                    Error::invalid(format!("prompt weight {number:?} is not a number"))
                })?;
                let start = rounds.pop().expect("an open bracket");
                scale_from(&mut spans, start, weight);
            }
            Piece::Close(')') if !rounds.is_empty() => {
                let start = rounds.pop().expect("an open bracket");
                scale_from(&mut spans, start, ROUND_MULTIPLIER);
            }
            Piece::Close(']') if !squares.is_empty() => {
                let start = squares.pop().expect("an open bracket");
                scale_from(&mut spans, start, SQUARE_MULTIPLIER);
            }
            _ => {
                for (i, part) in split_breaks(matched).into_iter().enumerate() {
                    if i > 0 {
                        spans.push(WeightedText::new("BREAK", -1.0));
                    }
                    spans.push(WeightedText::new(part, 1.0));
                }
            }
        }
    }
    for start in rounds {
        scale_from(&mut spans, start, ROUND_MULTIPLIER);
    }
    for start in squares {
        scale_from(&mut spans, start, SQUARE_MULTIPLIER);
    }
    if spans.is_empty() {
        spans.push(WeightedText::new("", 1.0));
    }
    let mut merged: Vec<WeightedText> = Vec::with_capacity(spans.len());
    for span in spans {
        match merged.last_mut() {
            Some(last) if last.weight == span.weight => last.text.push_str(&span.text),
            _ => merged.push(span),
        }
    }
    Ok(merged)
}

/// Python's `re.split(r"\s*\bBREAK\b\s*", text)`: the text around each whole-word `BREAK`, the
/// whitespace on both sides dropped.
fn split_breaks(text: &str) -> Vec<&str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut parts = vec![];
    let mut part_start = 0;
    for (at, _) in text.match_indices("BREAK") {
        let end = at + "BREAK".len();
        let whole_word = !text[..at].chars().next_back().is_some_and(is_word)
            && !text[end..].chars().next().is_some_and(is_word);
        if at < part_start || !whole_word {
            continue;
        }
        let before = text[part_start..at].trim_end_matches(char::is_whitespace);
        parts.push(before);
        part_start = text.len() - text[end..].trim_start_matches(char::is_whitespace).len();
    }
    parts.push(&text[part_start..]);
    parts
}
