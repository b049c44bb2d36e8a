//! The UNet's down, mid and up blocks. A block with attentions is diffusers'
//! `CrossAttn{Down,Up}Block2D`; without, `{Down,Up}Block2D`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::transformer::{Transformer2DConfig, Transformer2DModel};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

fn attentions(
    vb: &VarBuilder,
    n: usize,
    channels: usize,
    cfg: Option<&Transformer2DConfig>,
) -> Result<Vec<Transformer2DModel>> {
    match cfg {
        Some(cfg) => (0..n)
            .map(|i| Transformer2DModel::new(vb.pp(format!("attentions.{i}")), channels, cfg))
            .collect(),
        None => Ok(vec![]),
    }
}

#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        num_layers: usize,
        resnet: ResnetBlock2DConfig,
        transformer: Option<&Transformer2DConfig>,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let out = resnet.out_channels;
        let resnets = (0..num_layers)
            .map(|i| {
                ResnetBlock2D::new(
                    vb.pp(format!("resnets.{i}")),
                    if i == 0 { in_channels } else { out },
                    resnet,
                )
            })
            .collect::<Result<_>>()?;
        let attentions = attentions(&vb, num_layers, out, transformer)?;
        let downsampler = match downsample_padding {
            Some(p) => Some(Downsample2D::new(vb.pp("downsamplers.0"), out, out, p)?),
            None => None,
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and the skip connections it produced (one per layer, plus one after the
    /// downsampler).
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Debug)]
pub struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Transformer2DModel,
    resnet_out: ResnetBlock2D,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        resnet: ResnetBlock2DConfig,
        transformer: &Transformer2DConfig,
    ) -> Result<Self> {
        Ok(Self {
            resnet_in: ResnetBlock2D::new(vb.pp("resnets.0"), channels, resnet)?,
            attention: Transformer2DModel::new(vb.pp("attentions.0"), channels, transformer)?,
            resnet_out: ResnetBlock2D::new(vb.pp("resnets.1"), channels, resnet)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self.resnet_in.forward(xs, Some(temb))?;
        let xs = self.attention.forward(&xs, context)?;
        self.resnet_out.forward(&xs, Some(temb))
    }
}

#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `skip_channels[i]` is the channel count of the skip connection consumed by resnet `i`.
    pub fn new(
        vb: VarBuilder,
        prev_output_channels: usize,
        skip_channels: &[usize],
        resnet: ResnetBlock2DConfig,
        transformer: Option<&Transformer2DConfig>,
        add_upsample: bool,
    ) -> Result<Self> {
        let out = resnet.out_channels;
        let resnets = skip_channels
            .iter()
            .enumerate()
            .map(|(i, skip)| {
                let input = if i == 0 { prev_output_channels } else { out };
                ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), input + skip, resnet)
            })
            .collect::<Result<_>>()?;
        let attentions = attentions(&vb, skip_channels.len(), out, transformer)?;
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), out, out)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, upsampler })
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the end, one per resnet. `upsample_size` forces the upsampler's
    /// output size (needed when the latent size is not a multiple of the total down factor).
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip connections exhausted".into()))?;
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}
