//! What the checks know of SD 2.1: its configs (built into the binary from
//! `tests/fixtures/sd21-configs`, for the random-weight model) and the attention calls of its
//! UNet.

// The files of stabilityai/stable-diffusion-2-1, one constant each.
pub const MODEL_INDEX: &str = include_str!("../../tests/fixtures/sd21-configs/model_index.json");
pub const SCHEDULER: &str =
    include_str!("../../tests/fixtures/sd21-configs/scheduler/scheduler_config.json");
pub const TEXT_ENCODER: &str =
    include_str!("../../tests/fixtures/sd21-configs/text_encoder/config.json");
pub const UNET: &str = include_str!("../../tests/fixtures/sd21-configs/unet/config.json");
pub const VAE: &str = include_str!("../../tests/fixtures/sd21-configs/vae/config.json");

/// One attention call of a model: `count` calls of `[batch, heads, seq_q, head_dim]` against
/// `seq_k` keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub what: &'static str,
    pub batch: usize,
    pub heads: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub count: usize,
}

/// The attention calls of one SD 2.x UNet step (self and cross attention of every transformer)
/// at `size` pixels with `batch` latents, for the SD 2.1 UNet config (`UNET`).
pub fn sd21_unet_attention(size: usize, batch: usize) -> Vec<AttnShape> {
    // block_out_channels [320, 640, 1280, 1280], heads [5, 10, 20, 20], layers_per_block 2;
    // cross-attention in the first three down blocks, the mid block and the last three up blocks.
    let latent = size / 8;
    let mut out = Vec::new();
    let levels = [(320usize, 5usize), (640, 10), (1280, 20)];
    for (i, &(ch, heads)) in levels.iter().enumerate() {
        let seq = (latent >> i) * (latent >> i);
        // 2 transformers going down, 3 coming up.
        let count = 2 + 3;
        out.push(AttnShape {
            what: "unet self",
            batch,
            heads,
            seq_q: seq,
            seq_k: seq,
            head_dim: ch / heads,
            causal: false,
            count,
        });
        out.push(AttnShape {
            what: "unet cross",
            batch,
            heads,
            seq_q: seq,
            seq_k: 77,
            head_dim: ch / heads,
            causal: false,
            count,
        });
    }
    let seq = (latent >> 3) * (latent >> 3);
    out.push(AttnShape {
        what: "unet mid self",
        batch,
        heads: 20,
        seq_q: seq,
        seq_k: seq,
        head_dim: 64,
        causal: false,
        count: 1,
    });
    out.push(AttnShape {
        what: "unet mid cross",
        batch,
        heads: 20,
        seq_q: seq,
        seq_k: 77,
        head_dim: 64,
        causal: false,
        count: 1,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_attention_calls_of_sd21_at_768() {
        let calls = sd21_unet_attention(768, 2);
        // 16 transformers (2 down + 3 up per level, 1 mid), self + cross each.
        assert_eq!(calls.iter().map(|c| c.count).sum::<usize>(), 2 * 16);
        let first = calls[0];
        assert_eq!((first.heads, first.seq_q, first.seq_k, first.head_dim), (5, 9216, 9216, 64));
        assert!(calls.iter().all(|c| c.head_dim == 64 && c.batch == 2));
        assert!(calls.iter().any(|c| c.seq_q == 144 && c.heads == 20));
    }

    #[test]
    fn embedded_configs_parse() {
        for c in [MODEL_INDEX, SCHEDULER, TEXT_ENCODER, UNET, VAE] {
            serde_json::from_str::<serde_json::Value>(c).unwrap();
        }
        let unet: sd_core::models::unet::UNet2DConditionConfig =
            serde_json::from_str(UNET).unwrap();
        assert_eq!(unet.block_out_channels, vec![320, 640, 1280, 1280]);
        let _: sd_core::models::vae::AutoencoderKLConfig = serde_json::from_str(VAE).unwrap();
        let _: sd_core::models::clip_text::ClipTextConfig =
            serde_json::from_str(TEXT_ENCODER).unwrap();
    }
}
