//! `CLIPTextModel` (transformers), built from `text_encoder/config.json`. Stable Diffusion uses
//! its `last_hidden_state`: every token's embedding after the final layer norm, or with
//! `clip_skip` an earlier layer's output through the same layer norm. Textual-inversion tokens
//! get their embeddings from a small table beside the base one
//! ([`ClipTextModel::add_token_embeddings`]).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use crate::nn::{embedding, layer_norm, linear, Linear};
use serde::Deserialize;

use crate::attention::{attention, AttentionOptions};
use crate::cpu::contiguous;

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}
fn positions() -> usize {
    77
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    /// "quick_gelu" (SD 1.x, the CLIPTextConfig default) or "gelu" (exact erf; SD 2.x).
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            other => candle_core::bail!(
                "unsupported text encoder `hidden_act` = {other:?} (supported: gelu, quick_gelu)"
            ),
        }
    }

    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => crate::nn::gelu_erf(xs),
        }
    }
}

#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    opts: AttentionOptions,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            opts: AttentionOptions {
                causal: true,
                ..AttentionOptions::for_model(d / cfg.num_attention_heads, &vb)
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, seq, d) = xs.dims3()?;
        let head_dim = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            contiguous(&t.reshape((b, seq, self.heads, head_dim))?.transpose(1, 2)?)
        };
        let q = split(self.q_proj.forward(xs)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let out = contiguous(&attention(&q, &k, &v, self.opts)?.transpose(1, 2)?)?
            .reshape((b, seq, d))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, act: Activation) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: layer_norm(d, eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: layer_norm(d, eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (self.self_attn.forward(&self.layer_norm1.forward(xs)?)? + xs)?;
        let h = self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?;
        self.fc2.forward(&h)? + xs
    }
}

#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    /// Rows for ids from `vocab_size` on (textual inversion), `[added, hidden]`; the base table
    /// stays as loaded.
    added_token_embeddings: Option<Tensor>,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` may point at a checkpoint with or without the `text_model.` key prefix.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let act = Activation::parse(&config.hidden_act)?;
        let d = config.hidden_size;
        if config.num_attention_heads == 0 || !d.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "text encoder config: hidden_size {d} is not divisible by num_attention_heads {}",
                config.num_attention_heads
            )
        }
        let emb = vb.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), config, act))
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: embedding(config.vocab_size, d, emb.pp("token_embedding"))?,
            added_token_embeddings: None,
            position_embedding: embedding(
                config.max_position_embeddings,
                d,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: layer_norm(d, config.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The number of token ids the model embeds: the base vocabulary plus added tokens.
    pub fn token_count(&self) -> usize {
        self.config.vocab_size
            + self.added_token_embeddings.as_ref().map_or(0, |t| t.dim(0).unwrap_or(0))
    }

    /// Appends embedding rows `[n, hidden]` for the ids `token_count()..token_count() + n`
    /// (diffusers' `resize_token_embeddings` plus the new rows, without copying the base table).
    pub fn add_token_embeddings(&mut self, rows: &Tensor) -> Result<()> {
        let base = self.token_embedding.embeddings();
        let rows = rows.to_dtype(base.dtype())?.to_device(base.device())?;
        let (_, dim) = rows.dims2()?;
        if dim != self.config.hidden_size {
            candle_core::bail!(
                "token embeddings of size {dim}, expected the text encoder's {}",
                self.config.hidden_size
            )
        }
        self.added_token_embeddings = Some(match self.added_token_embeddings.take() {
            Some(added) => Tensor::cat(&[added, rows], 0)?,
            None => rows,
        });
        Ok(())
    }

    /// `input_ids` `[batch, seq]` (u32 or i64) to `last_hidden_state` `[batch, seq, hidden]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_skipping(input_ids, 0)
    }

    /// diffusers' `clip_skip`: the output of layer `n - clip_skip` of the `n` layers
    /// (`hidden_states[-(clip_skip + 1)]`) through the final layer norm; 0 is [`Self::forward`].
    pub fn forward_skipping(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder input has {seq} tokens, more than max_position_embeddings {}",
                self.config.max_position_embeddings
            )
        }
        let layers = self.layers.len();
        if clip_skip >= layers {
            candle_core::bail!(
                "clip_skip {clip_skip} must be less than the {layers} text encoder layers"
            )
        }
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let positions = Tensor::arange(0u32, seq as u32, input_ids.device())?.unsqueeze(0)?;
        let mut xs = self
            .embed_tokens(&input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        for layer in &self.layers[..layers - clip_skip] {
            xs = layer.forward(&xs)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// The token embeddings of `input_ids`, taking ids past the base vocabulary from the added
    /// rows.
    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let Some(added) = &self.added_token_embeddings else {
            return self.token_embedding.forward(input_ids);
        };
        let base_count = self.config.vocab_size as u32;
        let is_added = input_ids.ge(base_count)?;
        let first_added = Tensor::full(base_count, input_ids.shape(), input_ids.device())?;
        let base_ids = is_added.where_cond(&input_ids.zeros_like()?, input_ids)?;
        let added_ids = (is_added.where_cond(input_ids, &first_added)? - &first_added)?;
        let base = self.token_embedding.forward(&base_ids)?;
        let added = Embedding::new(added.clone(), self.config.hidden_size).forward(&added_ids)?;
        is_added.unsqueeze(2)?.broadcast_as(base.shape())?.where_cond(&added, &base)
    }
}
