//! Building blocks shared by the UNet and the VAE: `ResnetBlock2D`, `Downsample2D`, `Upsample2D`
//! (diffusers' `resnet.py`, `downsampling.py`, `upsampling.py`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{
    add_residual, conv2d, group_norm, linear, Conv2d, Conv2dConfig, GroupNorm, Linear,
};

#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    pub out_channels: usize,
    /// Channels of the time embedding; `None` in the VAE, which has no time input.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    time_emb_proj: Option<Linear>,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, in_channels: usize, cfg: ResnetBlock2DConfig) -> Result<Self> {
        let out = cfg.out_channels;
        let conv3 = Conv2dConfig { padding: 1, ..Default::default() };
        let norm1 = group_norm(cfg.groups, in_channels, cfg.eps, vb.pp("norm1"))?;
        let conv1 = conv2d(in_channels, out, 3, conv3, vb.pp("conv1"))?;
        let norm2 = group_norm(cfg.groups, out, cfg.eps, vb.pp("norm2"))?;
        let conv2 = conv2d(out, out, 3, conv3, vb.pp("conv2"))?;
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(linear(t, out, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if in_channels != out {
            Some(conv2d(in_channels, out, 1, Default::default(), vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            norm2,
            conv2,
            time_emb_proj,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` is the (already SiLU-free) time embedding `[batch, temb_channels]`, or `None`.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward_norm_silu(&self.norm1, xs)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&candle_nn::ops::silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward_norm_silu(&self.norm2, &h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = add_residual(h, &shortcut)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// A stride-2 3x3 convolution. With `padding == 0` (the VAE encoder) the input is first padded by
/// one on the right and bottom only, as diffusers does.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig { stride: 2, padding };
        let conv = conv2d(channels, out_channels, 3, cfg, vb.pp("conv"))?;
        Ok(Self { conv, asymmetric_pad: padding == 0 })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling (x2, or to an explicit size) followed by a 3x3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        let conv = conv2d(
            channels,
            out_channels,
            3,
            Conv2dConfig { padding: 1, ..Default::default() },
            vb.pp("conv"),
        )?;
        Ok(Self { conv })
    }

    /// `size` is the target `(height, width)`; `None` doubles both.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        match size {
            Some((th, tw)) if (th, tw) != (2 * h, 2 * w) => {
                self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
            }
            _ => self.conv.forward_upsampled(xs),
        }
    }
}
