//! Textual inversion as diffusers' `load_textual_inversion` (loaders/textual_inversion.py) does
//! it for `.safetensors` files: the tokenizer gains the token(s) as added tokens, the text encoder
//! gains one embedding row per vector, and a multi-vector token `<tok>` is written out in prompts
//! as `<tok> <tok>_1 ... <tok>_{n-1}` (diffusers' `maybe_convert_prompt`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::pipeline::StableDiffusionPipeline;
use crate::{Error, Result};

/// A1111's layout stores `string_to_param: {"*": tensor}`; flattened in safetensors.
const A1111_KEY: &str = "string_to_param.*";

/// An embedding read from a file: its token and its vectors `[n, hidden]`.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    pub token: String,
    pub vectors: Tensor,
}

impl TextualInversion {
    /// Reads a `.safetensors` embedding: diffusers' one-tensor layout (`{"<tok>": t}`, also
    /// A1111's `{"emb_params": t}`), whose token is the key unless `token` is given; or A1111's
    /// `string_to_param.*`, whose token is `token`, else the file's `name` metadata, else its file
    /// stem (A1111 names embeddings after their file). The tensor is `[hidden]` or `[n, hidden]`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a pickle file (`.pt`, `.bin`, `.ckpt`: not loaded, they can
    /// run code), another layout or shape; [`Error::Weights`] for an unreadable file.
    pub fn from_file(path: &Path, token: Option<&str>) -> Result<Self> {
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if ["pt", "bin", "ckpt", "pth"].contains(&extension.to_ascii_lowercase().as_str()) {
            return Err(Error::invalid(format!(
                "{}: pickle files are not loaded (unpickling can run arbitrary code); convert the \
                 embedding to .safetensors",
                path.display()
            )));
        }
        let weights_error = |msg: String| Error::Weights { path: path.to_path_buf(), msg };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| weights_error(format!("not a safetensors file: {e}")))?;
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|e| weights_error(e.to_string()))?;
        let (token, vectors) = if let Some(vectors) = tensors.remove(A1111_KEY) {
            let name = metadata.metadata().as_ref().and_then(|m| m.get("name").cloned());
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            (token.map(str::to_string).or(name).or(stem).unwrap_or_default(), vectors)
        } else if tensors.len() == 1 {
            let (key, vectors) = tensors.into_iter().next().expect("one tensor");
            (token.map_or(key, str::to_string), vectors)
        } else {
            let mut keys: Vec<_> = tensors.keys().cloned().collect();
            keys.sort();
            return Err(Error::invalid(format!(
                "{}: not a textual inversion embedding: expected one tensor or `{A1111_KEY}`, \
                 found {keys:?}",
                path.display()
            )));
        };
        let vectors = match vectors.rank() {
            1 => vectors.unsqueeze(0)?,
            2 => vectors,
            _ => {
                return Err(Error::invalid(format!(
                    "{}: embedding of shape {:?}, expected [hidden] or [vectors, hidden]",
                    path.display(),
                    vectors.dims()
                )))
            }
        };
        Ok(Self { token, vectors })
    }

    /// The tokens the vectors get: `token`, then `token_1` ... (diffusers'
    /// `_extend_tokens_and_embeddings`).
    pub fn tokens(&self) -> Vec<String> {
        let n = self.vectors.dim(0).unwrap_or(1);
        std::iter::once(self.token.clone())
            .chain((1..n).map(|i| format!("{}_{i}", self.token)))
            .collect()
    }
}

/// A loaded multi-vector token: its id and the tokens it expands to (itself first).
#[derive(Debug, Clone)]
pub(crate) struct MultiVectorToken {
    id: u32,
    tokens: Vec<String>,
}

impl StableDiffusionPipeline {
    /// diffusers' `load_textual_inversion(path, token=token)` for a `.safetensors` file (see
    /// [`TextualInversion::from_file`]); returns the tokens added.
    ///
    /// # Errors
    /// Those of [`TextualInversion::from_file`]; [`Error::InvalidArgument`] for a token already in
    /// the tokenizer (diffusers' error) or vectors whose size is not the text encoder's.
    pub fn load_textual_inversion(
        &mut self,
        path: &Path,
        token: Option<&str>,
    ) -> Result<Vec<String>> {
        let embedding = TextualInversion::from_file(path, token)?;
        let (vectors, found) = embedding.vectors.dims2()?;
        let expected = self.text_encoder.config().hidden_size;
        if found != expected {
            return Err(Error::invalid(format!(
                "{}: embedding vectors of size {found}, expected {expected} (the text encoder's \
                 hidden size: an embedding for another model?)",
                path.display()
            )));
        }
        let tokens = embedding.tokens();
        let first_id = self.text_encoder.token_count();
        // On a copy, so that a refused load leaves the tokenizer as it was.
        let mut tokenizer = self.tokenizer.clone();
        let ids = tokenizer.add_tokens(&tokens)?;
        if ids.first() != Some(&(first_id as u32)) {
            return Err(Error::invalid(format!(
                "the tokenizer gives the new token id {:?}, the text encoder expects {first_id}",
                ids.first()
            )));
        }
        self.text_encoder.add_token_embeddings(&embedding.vectors)?;
        self.tokenizer = tokenizer;
        if vectors > 1 {
            self.multi_vector_tokens.push(MultiVectorToken { id: ids[0], tokens: tokens.clone() });
        }
        Ok(tokens)
    }

    /// diffusers' `maybe_convert_prompt`: each loaded multi-vector token that the prompt tokenizes
    /// to is replaced (as text) by `<tok> <tok>_1 ... <tok>_{n-1}`.
    pub fn expand_multi_vector_tokens(&self, prompt: &str) -> Result<String> {
        if self.multi_vector_tokens.is_empty() {
            return Ok(prompt.to_string());
        }
        let ids = self.tokenizer.tokenize(prompt)?;
        let mut prompt = prompt.to_string();
        for multi in self.multi_vector_tokens.iter().filter(|m| ids.contains(&m.id)) {
            prompt = prompt.replace(&multi.tokens[0], &multi.tokens.join(" "));
        }
        Ok(prompt)
    }
}
