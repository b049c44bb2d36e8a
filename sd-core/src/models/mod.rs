//! The networks of a Stable Diffusion pipeline, one file per model part, each configured by the
//! upstream `config.json` of its diffusers subfolder.

pub mod clip_text;
pub mod resnet;
pub mod unet;
pub mod vae;

use candle_core::Result;

/// Parses diffusers' `act_fn` names; SD uses "silu" everywhere.
pub(crate) fn check_act_fn(act_fn: &str) -> Result<()> {
    match act_fn {
        "silu" | "swish" => Ok(()),
        other => candle_core::bail!("unsupported act_fn `{other}` (supported: silu)"),
    }
}
