//! `UNet2DConditionModel`, built from diffusers' `unet/config.json`.

mod blocks;
mod embeddings;
mod transformer;

pub use blocks::{DownBlock, MidBlock, UpBlock};
pub use embeddings::{timestep_features, TimestepEmbedding};
pub use transformer::{
    BasicTransformerBlock, CrossAttention, FeedForward, Transformer2DConfig, Transformer2DModel,
};

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm};
use serde::Deserialize;

use crate::models::check_act_fn;
use crate::models::resnet::ResnetBlock2DConfig;

/// A config value given once for all blocks or once per block (`attention_head_dim: 8` or
/// `[5, 10, 20, 20]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    pub fn get(&self, i: usize) -> T {
        match self {
            PerBlock::All(v) => *v,
            PerBlock::Each(v) => v[i.min(v.len() - 1)],
        }
    }

    fn check_len(&self, key: &str, n: usize) -> Result<()> {
        match self {
            PerBlock::Each(v) if v.len() != n => candle_core::bail!(
                "config `{key}` has {} entries, expected {n} (one per block)",
                v.len()
            ),
            _ => Ok(()),
        }
    }
}

fn one<T: From<u8>>() -> T {
    T::from(1)
}
fn yes() -> bool {
    true
}
fn four() -> usize {
    4
}
fn groups_32() -> Option<usize> {
    Some(32)
}
fn eps_1e5() -> f64 {
    1e-5
}
fn silu() -> String {
    "silu".into()
}
fn default_str() -> String {
    "default".into()
}
fn mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn positional() -> String {
    "positional".into()
}
fn three() -> usize {
    3
}

/// The keys of diffusers' `UNet2DConditionModel` config that SD 1.x/2.x use. Structural keys are
/// required (a guess would only turn into a confusing shape error later); the rest take
/// diffusers' defaults. Unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "mid_block_type")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: PerBlockBool,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "groups_32")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "eps_1e5")]
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    #[serde(default = "transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Legacy diffusers naming: in SD configs this is the number of heads, not their size.
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
}

fn transformer_layers() -> PerBlock<usize> {
    PerBlock::All(1)
}

/// `only_cross_attention` may be a bool or a per-block list of bools.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlockBool {
    All(bool),
    Each(Vec<bool>),
}

impl Default for PerBlockBool {
    fn default() -> Self {
        PerBlockBool::All(false)
    }
}

impl UNet2DConditionConfig {
    /// The number of attention heads per down block (diffusers uses `attention_head_dim` for it
    /// when `num_attention_heads` is unset).
    pub fn heads(&self) -> &PerBlock<usize> {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim)
    }

    /// Rejects the options this implementation does not cover, with the key that was the reason.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "config has {} block_out_channels, {} down_block_types and {} up_block_types; they must match",
                n, self.down_block_types.len(), self.up_block_types.len()
            )
        }
        self.layers_per_block.check_len("layers_per_block", n)?;
        self.heads().check_len("attention_head_dim", n)?;
        self.transformer_layers_per_block.check_len("transformer_layers_per_block", n)?;
        check_act_fn(&self.act_fn)?;
        let unsupported = |key: &str, value: &dyn std::fmt::Debug| -> Result<()> {
            candle_core::bail!("unsupported UNet config: `{key}` = {value:?}")
        };
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                unsupported("down_block_types", t)?
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                unsupported("up_block_types", t)?
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            unsupported("mid_block_type", &self.mid_block_type)?
        }
        if self.only_cross_attention != PerBlockBool::All(false)
            && self.only_cross_attention != PerBlockBool::Each(vec![false; n])
        {
            unsupported("only_cross_attention", &self.only_cross_attention)?
        }
        if self.dual_cross_attention {
            unsupported("dual_cross_attention", &true)?
        }
        if self.resnet_time_scale_shift != "default" {
            unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift)?
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            unsupported("class_embed_type", &self.class_embed_type)?
        }
        if self.addition_embed_type.is_some() {
            unsupported("addition_embed_type", &self.addition_embed_type)?
        }
        if self.time_embedding_type != "positional" {
            unsupported("time_embedding_type", &self.time_embedding_type)?
        }
        if self.norm_num_groups.is_none() {
            unsupported("norm_num_groups", &None::<usize>)?
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            unsupported(
                "conv_in_kernel/conv_out_kernel",
                &(self.conv_in_kernel, self.conv_out_kernel),
            )?
        }
        // Found by fuzzing: 0 heads divided by zero, and a huge padding overflowed the
        // convolution's output size. The downsamplers' 3x3 kernels use padding 0 or 1.
        if (0..n).any(|i| self.heads().get(i) == 0) {
            unsupported("attention_head_dim", self.heads())?
        }
        if self.downsample_padding > 1 {
            unsupported("downsample_padding", &self.downsample_padding)?
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNet2DConditionConfig,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNet2DConditionConfig) -> Result<Self> {
        config.validate()?;
        let cfg = config;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let groups = cfg.norm_num_groups.unwrap_or(32);
        let time_embed_dim = channels[0] * 4;
        let conv_in = conv2d(
            cfg.in_channels,
            channels[0],
            cfg.conv_in_kernel,
            Conv2dConfig { padding: cfg.conv_in_kernel / 2, ..Default::default() },
            vb.pp("conv_in"),
        )?;
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], time_embed_dim)?;
        let resnet = |out_channels, output_scale_factor| ResnetBlock2DConfig {
            out_channels,
            temb_channels: Some(time_embed_dim),
            groups,
            eps: cfg.norm_eps,
            output_scale_factor,
        };
        let transformer = |block: usize, channels: usize| {
            let heads = cfg.heads().get(block);
            Transformer2DConfig {
                num_heads: heads,
                head_dim: channels / heads,
                depth: cfg.transformer_layers_per_block.get(block),
                cross_attention_dim: cfg.cross_attention_dim,
                norm_num_groups: groups,
                use_linear_projection: cfg.use_linear_projection,
                upcast_attention: cfg.upcast_attention,
            }
        };

        // Down path; `skip_channels` tracks the channels of every skip connection it produces.
        let mut skip_channels = vec![channels[0]];
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let input = if i == 0 { channels[0] } else { channels[i - 1] };
            let layers = cfg.layers_per_block.get(i);
            let is_final = i == n - 1;
            let t = (cfg.down_block_types[i] == "CrossAttnDownBlock2D")
                .then(|| transformer(i, channels[i]));
            let padding = (!is_final).then_some(cfg.downsample_padding);
            down_blocks.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                input,
                layers,
                resnet(channels[i], 1.0),
                t.as_ref(),
                padding,
            )?);
            skip_channels.extend(std::iter::repeat_n(channels[i], layers + usize::from(!is_final)));
        }

        let mid_channels = channels[n - 1];
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            mid_channels,
            resnet(mid_channels, cfg.mid_block_scale_factor),
            &transformer(n - 1, mid_channels),
        )?;

        // Up path: block i mirrors down block n-1-i and takes `layers + 1` skips from the end.
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_output = mid_channels;
        for i in 0..n {
            let mirror = n - 1 - i;
            let out = channels[mirror];
            let layers = cfg.layers_per_block.get(mirror) + 1;
            let mut skips: Vec<usize> = skip_channels.split_off(skip_channels.len() - layers);
            skips.reverse();
            let t =
                (cfg.up_block_types[i] == "CrossAttnUpBlock2D").then(|| transformer(mirror, out));
            up_blocks.push(UpBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                prev_output,
                &skips,
                resnet(out, 1.0),
                t.as_ref(),
                i != n - 1,
            )?);
            prev_output = out;
        }

        let conv_norm_out = group_norm(groups, channels[0], cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(
            channels[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            Conv2dConfig { padding: cfg.conv_out_kernel / 2, ..Default::default() },
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Predicts noise (or v) for `sample` `[batch, in_channels, h, w]` at `timestep`, conditioned on
    /// `encoder_hidden_states` `[batch, seq, cross_attention_dim]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        self.forward_with_timesteps(sample, &vec![timestep; batch], encoder_hidden_states)
    }

    /// [`Self::forward`] with a timestep per sample (diffusers' `timestep` tensor of shape
    /// `[batch]`): samples of runs at different steps share one call (step-level batching).
    pub fn forward_with_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let (batch, _, height, width) = sample.dims4()?;
        if timesteps.len() != batch {
            candle_core::bail!(
                "the UNet got {} timesteps for a batch of {batch} samples",
                timesteps.len()
            );
        }
        let dtype = sample.dtype();
        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };

        let t = timestep_features(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            sample.device(),
        )?;
        let temb = self.time_embedding.forward(&embeddings::to_dtype_of(t, dtype)?)?;

        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&xs, &temb, encoder_hidden_states)?;
            xs = out;
            skips.extend(block_skips);
        }
        xs = self.mid_block.forward(&xs, &temb, encoder_hidden_states)?;

        // When the latent size is not a multiple of the total down factor, each upsampler must
        // land on the size of the skip connection it meets next.
        let up_factor = 1usize << (self.up_blocks.len() - 1);
        let forward_upsample_size = height % up_factor != 0 || width % up_factor != 0;
        for block in &self.up_blocks {
            let upsample_size = if forward_upsample_size {
                let next = skips.len().checked_sub(block.num_layers() + 1).map(|i| &skips[i]);
                next.map(|s| s.dims4().map(|(_, _, h, w)| (h, w))).transpose()?
            } else {
                None
            };
            xs = block.forward(&xs, &mut skips, &temb, encoder_hidden_states, upsample_size)?;
        }
        self.conv_out.forward_norm_silu(&self.conv_norm_out, &xs)
    }
}
