//! `AutoencoderKL`, built from diffusers' `vae/config.json`: the encoder (images to latent
//! distributions, for img2img) and the decoder (latents to images).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{conv2d, group_norm, linear, Conv2d, Conv2dConfig, GroupNorm, Linear};
use serde::Deserialize;

use super::check_act_fn;
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use crate::attention::{attention, AttentionOptions};
use crate::cpu::contiguous;

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn groups_32() -> usize {
    32
}
fn silu() -> String {
    "silu".into()
}
fn sd_scaling_factor() -> f64 {
    0.18215
}

#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    pub latent_channels: usize,
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latents are divided by this before decoding (and multiplied after encoding).
    #[serde(default = "sd_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub use_quant_conv: Option<bool>,
    #[serde(default)]
    pub use_post_quant_conv: Option<bool>,
    #[serde(default)]
    pub mid_block_add_attention: Option<bool>,
}

impl AutoencoderKLConfig {
    /// How many pixels one latent covers per side: 2^(number of blocks - 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!("VAE config: block_out_channels, down_block_types and up_block_types must have the same length")
        }
        check_act_fn(&self.act_fn)?;
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            candle_core::bail!("unsupported VAE config: down_block_types contains `{t}`")
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            candle_core::bail!("unsupported VAE config: up_block_types contains `{t}`")
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            candle_core::bail!("unsupported VAE config: `shift_factor` = {:?}", self.shift_factor)
        }
        // Found by fuzzing: a huge count overflowed `2 * latent_channels`. Real VAEs have 4 to 16.
        if !(1..=1 << 16).contains(&self.latent_channels) {
            candle_core::bail!(
                "unsupported VAE config: `latent_channels` = {}",
                self.latent_channels
            )
        }
        Ok(())
    }

    fn resnet(&self, out_channels: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            out_channels,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        }
    }
}

/// Single-head self attention over all pixels, with its own group norm and residual
/// (the VAE mid-block). Older checkpoints name the projections `query/key/value/proj_attn`.
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    opts: AttentionOptions,
}

impl VaeAttention {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let legacy = vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp(name("to_q", "query")))?,
            to_k: linear(channels, channels, vb.pp(name("to_k", "key")))?,
            to_v: linear(channels, channels, vb.pp(name("to_v", "value")))?,
            to_out: linear(channels, channels, vb.pp(name("to_out.0", "proj_attn")))?,
            opts: AttentionOptions { upcast: true, ..AttentionOptions::for_model(channels, &vb) },
        })
    }
}

impl Module for VaeAttention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens =
            contiguous(&self.group_norm.forward(xs)?.reshape((b, c, h * w))?.transpose(1, 2)?)?;
        let heads = |l: &Linear| -> Result<Tensor> { l.forward(&tokens)?.unsqueeze(1) };
        let (q, k, v) = (heads(&self.to_q)?, heads(&self.to_k)?, heads(&self.to_v)?);
        let out = self.to_out.forward(&attention(&q, &k, &v, self.opts)?.squeeze(1)?)?;
        contiguous(&out.transpose(1, 2)?)?.reshape((b, c, h, w))? + xs
    }
}

/// `UNetMidBlock2D` with attention: resnet, attention, resnet.
#[derive(Debug)]
pub struct VaeMidBlock {
    resnet_in: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet_out: ResnetBlock2D,
}

impl VaeMidBlock {
    fn new(vb: VarBuilder, channels: usize, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let attention = if cfg.mid_block_add_attention.unwrap_or(true) {
            Some(VaeAttention::new(vb.pp("attentions.0"), channels, cfg.norm_num_groups)?)
        } else {
            None
        };
        Ok(Self {
            resnet_in: ResnetBlock2D::new(vb.pp("resnets.0"), channels, cfg.resnet(channels))?,
            attention,
            resnet_out: ResnetBlock2D::new(vb.pp("resnets.1"), channels, cfg.resnet(channels))?,
        })
    }
}

impl Module for VaeMidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet_in.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs)?;
        }
        self.resnet_out.forward(&xs, None)
    }
}

fn conv3(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv2d> {
    conv2d(cin, cout, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb)
}

#[derive(Debug)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<EncoderBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let conv_in = conv3(vb.pp("conv_in"), cfg.in_channels, ch[0])?;
        let mut blocks = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let input = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        vb.pp(format!("resnets.{j}")),
                        if j == 0 { input } else { out },
                        cfg.resnet(out),
                    )
                })
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < ch.len() {
                Some(Downsample2D::new(vb.pp("downsamplers.0"), out, out, 0)?)
            } else {
                None
            };
            blocks.push(EncoderBlock { resnets, downsampler });
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in,
            blocks,
            mid_block: VaeMidBlock::new(vb.pp("mid_block"), last, cfg)?,
            conv_norm_out: group_norm(cfg.norm_num_groups, last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3(vb.pp("conv_out"), last, 2 * cfg.latent_channels)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(down) = &block.downsampler {
                xs = down.forward(&xs)?;
            }
        }
        let xs = self.mid_block.forward(&xs)?;
        self.conv_out.forward_norm_silu(&self.conv_norm_out, &xs)
    }
}

#[derive(Debug)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    blocks: Vec<DecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let conv_in = conv3(vb.pp("conv_in"), cfg.latent_channels, reversed[0])?;
        let mid_block = VaeMidBlock::new(vb.pp("mid_block"), reversed[0], cfg)?;
        let mut blocks = Vec::with_capacity(reversed.len());
        let mut prev = reversed[0];
        for (i, &out) in reversed.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        vb.pp(format!("resnets.{j}")),
                        if j == 0 { prev } else { out },
                        cfg.resnet(out),
                    )
                })
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < reversed.len() {
                Some(Upsample2D::new(vb.pp("upsamplers.0"), out, out)?)
            } else {
                None
            };
            blocks.push(DecoderBlock { resnets, upsampler });
            prev = out;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            blocks,
            conv_norm_out: group_norm(cfg.norm_num_groups, first, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3(vb.pp("conv_out"), first, cfg.out_channels)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_block.forward(&xs)?;
        for block in &self.blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &block.upsampler {
                xs = up.forward(&xs, None)?;
            }
        }
        self.conv_out.forward_norm_silu(&self.conv_norm_out, &xs)
    }
}

/// A diagonal Gaussian over latents, what the encoder returns.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// `mean + std * noise`, with `noise` drawn by the caller (e.g. from a torch-compatible
    /// generator, so img2img matches diffusers).
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std.mul(noise)?)
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        config.validate()?;
        let l = config.latent_channels;
        let quant_conv = if config.use_quant_conv.unwrap_or(true) {
            Some(conv2d(2 * l, 2 * l, 1, Default::default(), vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv.unwrap_or(true) {
            Some(conv2d(l, l, 1, Default::default(), vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Images `[batch, 3, h, w]` in [-1, 1] to the latent distribution (unscaled).
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, std })
    }

    /// Latents `[batch, latent_channels, h, w]` (already divided by `scaling_factor`) to images in
    /// roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }
}
