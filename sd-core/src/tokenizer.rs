//! The CLIP BPE tokenizer, read from a diffusers `tokenizer/` folder and matched id for id to
//! transformers' `CLIPTokenizer.from_pretrained(folder)` as diffusers' `StableDiffusionPipeline`
//! calls it:
//!
//! ```text
//! tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
//! ```
//!
//! transformers 5 builds CLIP on the `tokenizers` crate (there is no ftfy / `html.unescape` path any
//! more); [`ClipTokenizer`] builds the same pipeline with the same crate:
//!
//! * normalizer: NFC, then every `\s+` run replaced by one space, then lowercase;
//! * pre-tokenizer: split on
//!   `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!   (keeping the matches, dropping the rest), then byte-level (no prefix space);
//! * model: BPE from `vocab.json` + `merges.txt` with the `</w>` end-of-word suffix;
//! * post-processor: `<|startoftext|> ... <|endoftext|>`;
//! * added tokens: the special tokens named in `tokenizer_config.json` / `special_tokens_map.json`
//!   (and `added_tokens_decoder` / `added_tokens.json` where present), resolved the way
//!   transformers resolves them. This matters: the pad token of SD 2.x, `"!"`, becomes an added
//!   token, so every `!` in a prompt is its own token (id 0) instead of merging (`"!!!"` is
//!   `[0, 0, 0]`, not `[995]`); and whether `<|endoftext|>` also matches `<|ENDOFTEXT|>` depends
//!   on the `normalized` flag the last mention of it in the config carries.
//!
//! Truncation and padding follow `truncation=True, padding="max_length"`: a prompt longer than
//! `max_length` keeps `<|startoftext|>`, its first `max_length - 2` tokens and `<|endoftext|>`;
//! shorter ones are padded on the right with the pad token.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// The `model_max_length` used when the config has none, or has one of transformers' "no limit"
/// sentinels (`1e30`, `1000000000000000019884624838656`): CLIP's 77 positions.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// Any `model_max_length` above this is treated as a "no limit" sentinel, i.e. as missing.
const MAX_SANE_LENGTH: f64 = 1_000_000.0;

/// The pre-tokenizer split pattern of transformers 5's `CLIPTokenizer` (tokenization_clip.py).
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order (the order matters: a later mention of
/// the same token content overrides the flags of an earlier one).
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// `CLIPTokenizer.__init__` defaults for the named tokens a config leaves out.
const CLIP_DEFAULTS: [(&str, &str); 4] = [
    ("bos_token", "<|startoftext|>"),
    ("eos_token", "<|endoftext|>"),
    ("unk_token", "<|endoftext|>"),
    ("pad_token", "<|endoftext|>"),
];

/// A CLIP byte-level BPE tokenizer producing the ids transformers' `CLIPTokenizer` produces.
///
/// Build it with [`ClipTokenizer::from_folder`]; [`ClipTokenizer::encode`] gives the fixed-length
/// ids the text encoder takes.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_token: String,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .field("pad_token", &self.pad_token)
            .field("pad_id", &self.pad_id)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Reads a diffusers/transformers `tokenizer/` folder.
    ///
    /// Needs `vocab.json` and `merges.txt`. Reads, when present, `tokenizer_config.json`
    /// (`model_max_length`, the special tokens, `added_tokens_decoder`), `special_tokens_map.json`
    /// (overrides the config's special tokens, as in transformers, unless the config has an
    /// `added_tokens_decoder`) and the legacy `added_tokens.json`. Without any config the
    /// `CLIPTokenizer` defaults apply: pad `<|endoftext|>`, length [`DEFAULT_MAX_LENGTH`].
    ///
    /// The pad token may be a string or an AddedToken object (`{"content": "!", ...}`); a
    /// `model_max_length` that is missing or a "no limit" sentinel such as `1e30` becomes 77.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the folder, `vocab.json` or `merges.txt` when missing;
    /// [`Error::Config`] naming the file when a file is malformed (not JSON, wrong shape, a merge
    /// line that is not two tokens, a merge of tokens not in the vocabulary, an unusable
    /// `model_max_length`, no pad token); [`Error::Io`] for other read failures.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound { path: dir.to_path_buf() });
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let vocab = read_vocab(&vocab_path)?;
        let merges = read_merges(&merges_path)?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json_object(&config_path)?.unwrap_or_default();
        let map_path = dir.join("special_tokens_map.json");
        let added_json_path = dir.join("added_tokens.json");
        let max_length = parse_max_length(&config_path, config.get("model_max_length"))?;

        let specials = resolve_special_tokens(&config_path, &config, &map_path, &added_json_path)?;
        let unk = specials.named.get("unk_token").map(|t| t.content.clone());

        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder.build().map_err(|e| Error::config(&merges_path, e))?;

        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(tok_err)?.into(),
            Lowercase.into(),
        ]);
        tokenizer.with_normalizer(Some(normalizer)).map_err(tok_err)?;
        let split = Split::new(
            SplitPattern::Regex(SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tok_err)?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        // The normalizer must be in place before the added tokens: `normalized` tokens are matched
        // in their normalized form.
        tokenizer.add_tokens(specials.added.iter().cloned()).map_err(tok_err)?;

        let id_of = |key: &str| -> Result<(String, u32)> {
            let token = specials.named.get(key).ok_or_else(|| {
                Error::config(
                    &config_path,
                    format!("no {key}: CLIP needs bos_token, eos_token and pad_token"),
                )
            })?;
            let id = tokenizer.token_to_id(&token.content).ok_or_else(|| {
                Error::config(&config_path, format!("{key} {:?} has no id", token.content))
            })?;
            Ok((token.content.clone(), id))
        };
        let (bos, bos_id) = id_of("bos_token")?;
        let (eos, eos_id) = id_of("eos_token")?;
        let (pad_token, pad_id) = id_of("pad_token")?;
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos, eos_id), (bos, bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));

        Ok(Self { tokenizer, max_length, pad_token, pad_id, bos_id, eos_id })
    }

    /// The ids of `text` as diffusers feeds them to the text encoder: `<|startoftext|>`, the tokens,
    /// `<|endoftext|>`, truncated to [`max_length`](Self::max_length) (keeping the end token) and
    /// padded on the right with [`pad_id`](Self::pad_id) to exactly `max_length` ids.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the tokenizer pipeline fails (it does not for valid UTF-8 text).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_unpadded(text)?;
        if ids.len() > self.max_length {
            ids.truncate(self.max_length - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// The ids of `text` with `<|startoftext|>` and `<|endoftext|>`, neither truncated nor padded
    /// (`tokenizer(text).input_ids`). Longer than [`max_length`](Self::max_length) means
    /// [`encode`](Self::encode) truncates it; see [`truncated_text`](Self::truncated_text).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the tokenizer pipeline fails.
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode_fast(text, true).map_err(tok_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The ids of `text` alone, without `<|startoftext|>` / `<|endoftext|>`
    /// (`tokenizer(text, add_special_tokens=False).input_ids`).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the tokenizer pipeline fails.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode_fast(text, false).map_err(tok_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Adds `tokens` as added (non-special, normalized) tokens, as transformers'
    /// `tokenizer.add_tokens(tokens)` does for textual inversion, and returns their new ids.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a token already in the vocabulary (diffusers' error) or
    /// given twice; nothing is added then.
    pub fn add_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let mut seen = HashSet::new();
        for token in tokens {
            if self.token_to_id(token).is_some() || !seen.insert(token) {
                return Err(Error::invalid(format!(
                    "token {token} is already in the tokenizer's vocabulary; choose a different \
                     token name"
                )));
            }
        }
        let added = tokens.iter().map(|t| AddedToken::from(t.clone(), false));
        self.tokenizer.add_tokens(added).map_err(tok_err)?;
        tokens
            .iter()
            .map(|t| {
                self.token_to_id(t)
                    .ok_or_else(|| Error::Tokenizer(format!("added token {t} has no id")))
            })
            .collect()
    }

    /// Decodes ids back to text the way transformers' `CLIPTokenizer.decode` does: special tokens
    /// are kept, each word end (`</w>`) becomes a space, and the result is stripped. Lossy: the
    /// normalization (case, whitespace) is not undone and words split by the pre-tokenizer come
    /// back space-separated (`"state-of-the-art"` decodes to `"state - of - the - art"`).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] for an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab_size = self.tokenizer.get_vocab_size(true) as u32;
        if let Some(bad) = ids.iter().find(|&&id| self.tokenizer.id_to_token(id).is_none()) {
            return Err(Error::Tokenizer(format!(
                "id {bad} is not in the vocabulary (size {vocab_size})"
            )));
        }
        let text = self.tokenizer.decode(ids, false).map_err(tok_err)?;
        Ok(py_strip(&text.replace("</w>", " ")).to_string())
    }

    /// The part of `text` that [`encode`](Self::encode) drops, decoded as diffusers logs it
    /// ("The following part of your input was truncated because CLIP can only handle sequences
    /// up to 77 tokens: ..."), or `None` when `text` fits.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the tokenizer pipeline fails.
    pub fn truncated_text(&self, text: &str) -> Result<Option<String>> {
        let ids = self.encode_unpadded(text)?;
        if ids.len() <= self.max_length {
            return Ok(None);
        }
        self.decode(&ids[self.max_length - 1..ids.len() - 1]).map(Some)
    }

    /// The fixed length [`encode`](Self::encode) returns: `model_max_length` (77 for every SD
    /// checkpoint).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding id: 0 (`"!"`) for SD 2.x, 49407 (`<|endoftext|>`) for SD 1.x.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The padding token's text (`"!"` or `"<|endoftext|>"`).
    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }

    /// The id of `<|startoftext|>` (49406 in CLIP's vocabulary).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id of `<|endoftext|>` (49407 in CLIP's vocabulary).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The number of ids, added tokens included (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of a token (a vocabulary entry such as `"cat</w>"`, or an added token), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Python's `str.strip()`: Unicode whitespace plus the ASCII separators `\x1c`..`\x1f`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))
}

/// `vocab.json`: `{"token": id, ...}`. Like the `tokenizers` crate's reader, entries whose value is
/// not a number are skipped.
fn read_vocab(path: &Path) -> Result<Vocab> {
    let Value::Object(map) = parse_json(path, &read_text(path)?)? else {
        return Err(Error::config(path, "expected a JSON object mapping tokens to ids"));
    };
    let mut vocab = Vocab::default();
    for (token, id) in map {
        let Value::Number(n) = id else { continue };
        let id = n
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| Error::config(path, format!("token {token:?} has id {n}, not a u32")))?;
        vocab.insert(token, id);
    }
    if vocab.is_empty() {
        return Err(Error::config(path, "the vocabulary is empty"));
    }
    Ok(vocab)
}

/// `merges.txt`: an optional `#version` line, then one `left right` pair per line.
fn read_merges(path: &Path) -> Result<Merges> {
    let text = read_text(path)?;
    let mut merges = Merges::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.starts_with("#version")) {
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::config(
                    path,
                    format!(
                        "line {}: expected two tokens separated by one space, got {line:?}",
                        n + 1
                    ),
                ))
            }
        }
    }
    // A CLIP BPE without merges would split every word into letters: a truncated file.
    if merges.is_empty() {
        return Err(Error::config(path, "no merges (an empty or truncated file)"));
    }
    Ok(merges)
}

fn read_optional_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    match parse_json(path, &text)? {
        Value::Object(map) => Ok(Some(map)),
        _ => Err(Error::config(path, "expected a JSON object")),
    }
}

/// `model_max_length`: missing, `null` or a "no limit" sentinel → [`DEFAULT_MAX_LENGTH`].
fn parse_max_length(path: &Path, value: Option<&Value>) -> Result<usize> {
    let n = match value {
        None | Some(Value::Null) => return Ok(DEFAULT_MAX_LENGTH),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::INFINITY),
        Some(other) => {
            return Err(Error::config(path, format!("model_max_length {other} is not a number")))
        }
    };
    if n > MAX_SANE_LENGTH {
        return Ok(DEFAULT_MAX_LENGTH);
    }
    if n.fract() != 0.0 || n < 2.0 {
        return Err(Error::config(
            path,
            format!("model_max_length {n} is unusable: it must be a whole number >= 2 (room for the start and end tokens)"),
        ));
    }
    Ok(n as usize)
}

/// The properties of a transformers/tokenizers `AddedToken`.
#[derive(Clone, Debug, PartialEq)]
struct TokenSpec {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

impl TokenSpec {
    /// A plain string special token: `AddedToken(s, special=True)`, hence not normalized.
    fn special_str(s: &str) -> Self {
        Self {
            content: s.to_string(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
        }
    }

    /// `AddedToken(**dict)`, or `AddedToken(**dict, special=True)` with `force_special`. Python's
    /// AddedToken defaults `normalized` to `not special`.
    fn from_dict(
        path: &Path,
        key: &str,
        map: &Map<String, Value>,
        force_special: bool,
    ) -> Result<Self> {
        let flag = |name: &str| -> Result<Option<bool>> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(v) => {
                    Err(Error::config(path, format!("{key}: `{name}` is {v}, not a boolean")))
                }
            }
        };
        let content = match map.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(Error::config(
                    path,
                    format!("{key}: an AddedToken object needs a string `content`"),
                ))
            }
        };
        let special = force_special || flag("special")?.unwrap_or(false);
        Ok(Self {
            content,
            single_word: flag("single_word")?.unwrap_or(false),
            lstrip: flag("lstrip")?.unwrap_or(false),
            rstrip: flag("rstrip")?.unwrap_or(false),
            normalized: flag("normalized")?.unwrap_or(!special),
            special,
        })
    }

    fn to_added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized)
    }
}

/// A named special token's value, remembering where it came from: transformers' legacy
/// `added_tokens.json` handling compares against `str(value)`, which is the content for strings
/// and `special_tokens_map.json` entries but not for a not-yet-converted config dict.
#[derive(Clone, Debug)]
struct Named {
    token: TokenSpec,
    str_is_content: bool,
}

fn token_value(
    path: &Path,
    key: &str,
    value: &Value,
    force_special: bool,
) -> Result<Option<Named>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => {
            Ok(Some(Named { token: TokenSpec::special_str(s), str_is_content: true }))
        }
        Value::Object(map) => Ok(Some(Named {
            token: TokenSpec::from_dict(path, key, map, force_special)?,
            str_is_content: force_special,
        })),
        other => Err(Error::config(
            path,
            format!("{key} is {other}, expected a string or an AddedToken object"),
        )),
    }
}

fn token_list(path: &Path, key: &str, value: &Value, force_special: bool) -> Result<Vec<Named>> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                out.extend(token_value(path, key, item, force_special)?);
            }
            Ok(out)
        }
        other => Err(Error::config(path, format!("{key} is {other}, expected a list of tokens"))),
    }
}

struct SpecialTokens {
    /// The named special tokens (`bos_token`, ...), by key.
    named: HashMap<&'static str, TokenSpec>,
    /// What to register as added tokens, one entry per content, with its final properties.
    added: Vec<AddedToken>,
}

/// Mirrors transformers 5's `PreTrainedTokenizerBase._from_pretrained` +
/// `TokenizersBackend.__init__` for a `CLIPTokenizer` built from vocab.json/merges.txt.
fn resolve_special_tokens(
    config_path: &Path,
    config: &Map<String, Value>,
    map_path: &Path,
    added_json_path: &Path,
) -> Result<SpecialTokens> {
    // Keys a config file sets (to a token or to null); CLIPTokenizer's defaults fill the others.
    let mut given: HashSet<&'static str> = HashSet::new();
    let mut named: HashMap<&'static str, Named> = HashMap::new();
    let mut extras: Vec<Named> = Vec::new();
    let mut set_named = |key: &'static str, value: Option<Named>| {
        given.insert(key);
        match value {
            Some(v) => named.insert(key, v),
            None => named.remove(key),
        };
    };

    // tokenizer_config.json's named tokens ({"__type": "AddedToken", ...} objects → AddedToken(**obj)).
    for key in SPECIAL_TOKEN_KEYS {
        if let Some(value) = config.get(key) {
            set_named(key, token_value(config_path, key, value, false)?);
        }
    }
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(value) = config.get(key) {
            if !value.is_object() {
                extras = token_list(config_path, key, value, false)?;
            }
        }
    }

    // Explicit added tokens, in id order: `added_tokens_decoder` (newer layout; then
    // special_tokens_map.json is not read at all) or the legacy files.
    let mut decoder: Vec<(u64, TokenSpec)> = Vec::new();
    if let Some(value) = config.get("added_tokens_decoder") {
        let Value::Object(entries) = value else {
            return Err(Error::config(config_path, "added_tokens_decoder is not an object"));
        };
        for (id, entry) in entries {
            let key = "added_tokens_decoder";
            let id: u64 = id.parse().map_err(|_| {
                Error::config(config_path, format!("{key}: key {id:?} is not an id"))
            })?;
            let Value::Object(map) = entry else {
                return Err(Error::config(
                    config_path,
                    format!("{key}: entry {id} is not an AddedToken object"),
                ));
            };
            decoder.push((id, TokenSpec::from_dict(config_path, key, map, false)?));
        }
    } else {
        if let Some(map) = read_optional_json_object(map_path)? {
            for (key, value) in &map {
                if let Some(&key) = SPECIAL_TOKEN_KEYS.iter().find(|k| **k == key.as_str()) {
                    set_named(key, token_value(map_path, key, value, true)?);
                } else if (key == "additional_special_tokens" || key == "extra_special_tokens")
                    && !value.is_object()
                {
                    for tok in token_list(map_path, key, value, true)? {
                        if !extras.iter().any(|e| e.token == tok.token) {
                            extras.push(tok);
                        }
                    }
                }
            }
        }
        if let Some(map) = read_optional_json_object(added_json_path)? {
            let specials: HashSet<&str> = named
                .values()
                .chain(extras.iter())
                .filter(|n| n.str_is_content)
                .map(|n| n.token.content.as_str())
                .collect();
            for (content, id) in &map {
                let id = id.as_u64().ok_or_else(|| {
                    Error::config(
                        added_json_path,
                        format!("{content:?}: id {id} is not an integer"),
                    )
                })?;
                let special = specials.contains(content.as_str());
                let token =
                    TokenSpec { normalized: !special, special, ..TokenSpec::special_str(content) };
                decoder.push((id, token));
            }
        }
    }
    decoder.sort_by_key(|(id, _)| *id);

    // CLIPTokenizer's defaults for what is still unset.
    for (key, default) in CLIP_DEFAULTS {
        let key =
            SPECIAL_TOKEN_KEYS.iter().copied().find(|k| *k == key).expect("a special token key");
        if !given.contains(key) {
            named.insert(
                key,
                Named { token: TokenSpec::special_str(default), str_is_content: true },
            );
        }
    }

    // The backend's tokens_to_add: the explicit ones, then named and extra tokens whose content is
    // not among the explicit ones; a token equal (all properties) to one already listed is skipped.
    let mut seq: Vec<TokenSpec> = decoder.into_iter().map(|(_, t)| t).collect();
    let explicit: HashSet<String> = seq.iter().map(|t| t.content.clone()).collect();
    let ordered_named = SPECIAL_TOKEN_KEYS.iter().filter_map(|k| named.get(k));
    for n in ordered_named.chain(extras.iter()) {
        if !explicit.contains(&n.token.content) && !seq.contains(&n.token) {
            seq.push(n.token.clone());
        }
    }
    let named_contents: HashSet<&str> = named.values().map(|n| n.token.content.as_str()).collect();
    for t in &mut seq {
        if named_contents.contains(t.content.as_str()) {
            t.special = true;
        }
    }

    // Adding the same content twice keeps the last properties (tokenizers >= 0.23, which
    // transformers 5 uses; tokenizers 0.22 would keep the first for special tokens), so
    // collapse here and add each content once.
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, t) in seq.iter().enumerate() {
        last.insert(t.content.as_str(), i);
    }
    let added = seq
        .iter()
        .enumerate()
        .filter(|(i, t)| !t.content.is_empty() && last[t.content.as_str()] == *i)
        .map(|(_, t)| t.to_added_token())
        .collect();

    let named = named.into_iter().map(|(k, n)| (k, n.token)).collect();
    Ok(SpecialTokens { named, added })
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<ClipTokenizer>();
}
