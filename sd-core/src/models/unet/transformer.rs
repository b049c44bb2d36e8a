//! `Transformer2DModel`: the spatial transformer of the UNet's cross-attention blocks, with its
//! `BasicTransformerBlock`s (self attention, cross attention, GEGLU feed-forward).

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::nn::{
    conv2d, geglu, group_norm, layer_norm, linear, linear_no_bias, Conv2d, GroupNorm, Linear,
};

use crate::attention::{attention, AttentionOptions};
use crate::cpu::contiguous;

#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub num_heads: usize,
    pub head_dim: usize,
    pub depth: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

/// Multi-head attention with separate q/k/v projections (diffusers' `Attention`).
#[derive(Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    opts: AttentionOptions,
}

impl CrossAttention {
    /// `context_dim` is `None` for self attention.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            opts: AttentionOptions { upcast, ..AttentionOptions::for_model(head_dim, &vb) },
        })
    }

    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, seq, inner) = xs.dims3()?;
        contiguous(&xs.reshape((b, seq, self.heads, inner / self.heads))?.transpose(1, 2)?)
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.split_heads(&self.to_q.forward(xs)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = attention(&q, &k, &v, self.opts)?;
        let (b, _, seq, _) = out.dims4()?;
        self.to_out.forward(&contiguous(&out.transpose(1, 2)?)?.reshape((b, seq, ()))?)
    }
}

/// GEGLU feed-forward: `Linear(dim, 2 * 4 dim)`, value * gelu(gate), `Linear(4 dim, dim)`.
#[derive(Debug)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&geglu(&self.proj_in.forward(xs)?)?)
    }
}

#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(vb: VarBuilder, dim: usize, cfg: &Transformer2DConfig) -> Result<Self> {
        let (h, d, up) = (cfg.num_heads, cfg.head_dim, cfg.upcast_attention);
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, None, h, d, up)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(
                vb.pp("attn2"),
                dim,
                Some(cfg.cross_attention_dim),
                h,
                d,
                up,
            )?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, Some(context))? + &xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// Input and output projections: linear over tokens (SD 2.x) or 1x1 convolutions (SD 1.x).
#[derive(Debug)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, in_channels: usize, cfg: &Transformer2DConfig) -> Result<Self> {
        let inner = cfg.num_heads * cfg.head_dim;
        let norm = group_norm(cfg.norm_num_groups, in_channels, 1e-6, vb.pp("norm"))?;
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Projection::Linear(linear(in_channels, inner, vb.pp("proj_in"))?),
                Projection::Linear(linear(inner, in_channels, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(conv2d(
                    in_channels,
                    inner,
                    1,
                    Default::default(),
                    vb.pp("proj_in"),
                )?),
                Projection::Conv(conv2d(
                    inner,
                    in_channels,
                    1,
                    Default::default(),
                    vb.pp("proj_out"),
                )?),
            )
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                BasicTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), inner, cfg)
            })
            .collect::<Result<_>>()?;
        Ok(Self { norm, proj_in, blocks, proj_out })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            contiguous(&t.permute((0, 2, 3, 1))?)?.reshape((b, h * w, c))
        };
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&xs)?)?,
            Projection::Conv(conv) => to_tokens(&conv.forward(&xs)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            contiguous(&t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?)
        };
        let out = match &self.proj_out {
            Projection::Linear(l) => to_image(&l.forward(&tokens)?)?,
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        out + residual
    }
}
