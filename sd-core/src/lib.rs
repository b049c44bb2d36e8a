//! # sd-core
//!
//! Stable Diffusion 2.x (and 1.x) text-to-image inference on [candle], numerically matched to
//! HF diffusers. Every stage has a public API of its own:
//!
//! | stage | type |
//! |---|---|
//! | CLIP BPE tokenizer | [`tokenizer::ClipTokenizer`] |
//! | CLIP text encoder | [`models::clip_text::ClipTextModel`] |
//! | UNet | [`models::unet::UNet2DConditionModel`] |
//! | VAE | [`models::vae::AutoencoderKL`] |
//! | schedulers | [`schedulers::Scheduler`] and its implementations |
//! | torch-compatible noise | [`rng::TorchGenerator`] |
//! | the whole pipeline | [`pipeline::StableDiffusionPipeline`] |
//!
//! Every attention call goes through [`attention`], so device-specific kernels plug in there.
//! The CPU kernels under the layers ([`nn`]) and the attention share one low-level layer,
//! [`cpu`]: SIMD dispatch, the GEMM backends (builtin, MKL, AMX) and scratch buffers.

pub mod adapters;
pub mod attention;
pub mod cpu;
pub mod error;
pub mod hub;
pub mod loading;
pub mod metadata;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod prompt;
pub mod rng;
pub mod runtime;
pub mod schedulers;
pub mod tokenizer;

pub use error::{Error, Result};
