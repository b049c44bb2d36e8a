//! The error type of sd-core: every failure says which file, tensor or argument it is about.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder that should be there is not.
    #[error("{path}: not found")]
    NotFound { path: PathBuf },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A config file that does not parse or lacks a required key.
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },

    /// A weight file that is truncated or corrupt, or a tensor that is missing or mis-shaped.
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },

    /// A LoRA file with keys in no LoRA layout we read, or naming modules the model does not
    /// have: `count` keys, the first few of them listed.
    #[error("{path}: {count} LoRA keys match no layer of the model: {}{}", keys.join(", "), if *count > keys.len() { ", ..." } else { "" })]
    UnknownLoraKeys { path: PathBuf, count: usize, keys: Vec<String> },

    /// A caller passed a value the pipeline cannot use (size, steps, dtype, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("unknown scheduler `{name}`; valid names: {valid}")]
    UnknownScheduler { name: String, valid: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Downloading or resolving a model on the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),

    /// A stage of a run produced NaN or infinite values (an f16 VAE overflowing, NaN weights, an
    /// absurd guidance scale): the run stops there instead of writing a black image. `stage`
    /// says where ("after step 3 of 20 of the UNet"), `hint` what may help.
    #[error("non-finite values (NaN or inf) {stage}{}", colon_hint(hint))]
    NonFinite { stage: String, hint: Option<String> },

    /// The run was cancelled through its progress callback or cancel token.
    #[error("cancelled")]
    Cancelled,

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source }
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), msg: msg.to_string() }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// `": hint"`, or nothing without a hint.
fn colon_hint(hint: &Option<String>) -> String {
    hint.as_deref().map(|h| format!(": {h}")).unwrap_or_default()
}
