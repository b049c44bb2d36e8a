//! The GPU check of sd-core's CUDA build (run by `scripts/gpu-check.sh` on a machine with an
//! NVIDIA GPU; needs no network, no weights and no Rust toolchain there).
//!
//! ```sh
//! source scripts/cuda-env.sh && cargo build --release --features cuda -p sd-core --example gpu_check
//! target-cuda/release/examples/gpu_check [all|kernels|bench|pipeline] [options]
//! ```
//!
//! * `kernels`: NVRTC-compiles the flash-attention kernels for the device (f16, bf16) and checks
//!   them against an f32 reference computed on the CPU from the same inputs, on shapes covering
//!   every head dim, causal and not, ragged lengths, strided and offset inputs and large scores
//!   (max error normalised by max |reference|). Exit code 1 on any mismatch.
//! * `bench`: times the attention calls of one SD 2.1 UNet step at `--size` (batch 2, as with
//!   classifier-free guidance), the VAE's and CLIP's, with the kernels and with the reference path.
//! * `pipeline`: builds the full SD 2.1 architecture with random weights on the GPU, writes it as a
//!   diffusers folder (f16 safetensors, about 2.6 GB) under `--work`, loads it with
//!   `StableDiffusionPipeline::from_folder`, generates at `--size` for `--steps` steps and prints
//!   the time per step, the stage times, a UNet step with the kernels vs the reference path, and
//!   the peak GPU memory.
//!
//! * `compile`: only NVRTC-compiles the kernels for `--arch` (default `sm_80,sm_90`) through
//!   sd-core's own compile path; needs libnvrtc but no GPU.
//!
//! Options: `--steps N` (4), `--size PX` (768), `--dtype f16|bf16` (f16), `--device N` (0),
//! `--tokenizer DIR` (tests/fixtures/pipelines/sd2-tiny/tokenizer), `--work DIR` (a temporary
//! folder, removed at the end unless `--keep`).

use std::path::PathBuf;

/// The parsed command line.
#[derive(Debug, Clone, PartialEq)]
struct Args {
    /// `compile`: only NVRTC-compile the kernels for `archs` (no GPU needed).
    compile: bool,
    archs: Vec<String>,
    kernels: bool,
    bench: bool,
    pipeline: bool,
    steps: usize,
    size: usize,
    dtype: String,
    device: usize,
    tokenizer: PathBuf,
    work: Option<PathBuf>,
    keep: bool,
}

const USAGE: &str = "usage: gpu_check [all|kernels|bench|pipeline|compile]... [--steps N] [--size PX] [--dtype f16|bf16] \
[--device N] [--tokenizer DIR] [--work DIR] [--keep] [--arch sm_80,sm_90]";

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args {
        compile: false,
        archs: vec!["sm_80".into(), "sm_90".into()],
        kernels: false,
        bench: false,
        pipeline: false,
        steps: 4,
        size: 768,
        dtype: "f16".into(),
        device: 0,
        tokenizer: PathBuf::from("tests/fixtures/pipelines/sd2-tiny/tokenizer"),
        work: None,
        keep: false,
    };
    let mut it = argv.iter();
    let number = |name: &str, v: Option<&String>| -> Result<usize, String> {
        let v = v.ok_or_else(|| format!("{name} needs a value"))?;
        v.parse::<usize>().map_err(|_| format!("{name}: `{v}` is not a non-negative integer"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "all" => (args.kernels, args.bench, args.pipeline) = (true, true, true),
            "kernels" => args.kernels = true,
            "bench" => args.bench = true,
            "pipeline" => args.pipeline = true,
            "compile" => args.compile = true,
            "--arch" => {
                let v = it.next().ok_or("--arch needs a value")?;
                args.archs = v.split(',').map(str::to_string).collect();
                if args
                    .archs
                    .iter()
                    .any(|a| !a.starts_with("sm_") || a[3..].parse::<u32>().is_err())
                {
                    return Err(format!("--arch: `{v}` is not a list like sm_80,sm_90"));
                }
            }
            "--steps" => args.steps = number("--steps", it.next())?,
            "--size" => args.size = number("--size", it.next())?,
            "--device" => args.device = number("--device", it.next())?,
            "--dtype" => {
                let v = it.next().ok_or("--dtype needs a value")?;
                match v.as_str() {
                    "f16" | "bf16" => args.dtype = v.clone(),
                    _ => return Err(format!("--dtype: `{v}` is not f16 or bf16")),
                }
            }
            "--tokenizer" => {
                args.tokenizer = PathBuf::from(it.next().ok_or("--tokenizer needs a value")?)
            }
            "--work" => args.work = Some(PathBuf::from(it.next().ok_or("--work needs a value")?)),
            "--keep" => args.keep = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if !(args.compile || args.kernels || args.bench || args.pipeline) {
        (args.kernels, args.bench, args.pipeline) = (true, true, true);
    }
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    if args.size == 0 || args.size % 64 != 0 {
        return Err(format!("--size must be a positive multiple of 64, got {}", args.size));
    }
    Ok(args)
}

/// One attention call of a model: `count` calls of `[batch, heads, seq_q, head_dim]` against
/// `seq_k` keys.
#[derive(Debug, Clone, Copy, PartialEq)]
struct AttnShape {
    what: &'static str,
    batch: usize,
    heads: usize,
    seq_q: usize,
    seq_k: usize,
    head_dim: usize,
    causal: bool,
    count: usize,
}

/// The attention calls of one SD 2.x UNet step (self and cross attention of every transformer)
/// at `size` pixels with `batch` latents, for the SD 2.1 UNet config below.
fn sd21_unet_attention(size: usize, batch: usize) -> Vec<AttnShape> {
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

/// SD 2.1's configs (stabilityai/stable-diffusion-2-1), for the random-weight model.
mod sd21 {
    pub const MODEL_INDEX: &str = r#"{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
 "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": false,
 "safety_checker": [null, null], "scheduler": ["diffusers", "DDIMScheduler"],
 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}"#;
    pub const SCHEDULER: &str = r#"{"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
 "prediction_type": "v_prediction", "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
 "trained_betas": null}"#;
    pub const TEXT_ENCODER: &str = r#"{"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
 "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0,
 "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
 "model_type": "clip_text_model", "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
 "projection_dim": 512, "torch_dtype": "float32", "transformers_version": "4.25.0.dev0", "vocab_size": 49408}"#;
    pub const UNET: &str = r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
 "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
 "center_input_sample": false, "cross_attention_dim": 1024,
 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
 "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
 "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
 "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4, "sample_size": 96,
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
 "use_linear_projection": true, "upcast_attention": true}"#;
    pub const VAE: &str = r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
 "block_out_channels": [128, 256, 512, 512],
 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
 "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
 "sample_size": 768}"#;
}

#[cfg(not(feature = "cuda"))]
fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = parse_args(&argv) {
        eprintln!("{e}");
        std::process::exit(2);
    }
    eprintln!("gpu_check was built without the `cuda` feature: build it with `source scripts/cuda-env.sh && cargo build --release --features cuda -p sd-core --example gpu_check`");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match gpu::run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("gpu_check: error: {e:#}");
            std::process::exit(1);
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use candle_core::{DType, Device, Shape, Tensor};
    use candle_nn::var_builder::SimpleBackend;
    use candle_nn::VarBuilder;
    use sd_core::attention::cuda::{self as fa, HalfType, KERNELS};
    use sd_core::attention::{attention, reference_attention, AttentionOptions};
    use sd_core::models::clip_text::{ClipTextConfig, ClipTextModel};
    use sd_core::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
    use sd_core::models::vae::{AutoencoderKL, AutoencoderKLConfig};
    use sd_core::pipeline::{
        parse_dtype, GenerateParams, RunHooks, StableDiffusionPipeline, StepControl, StepProgress,
    };

    use super::{sd21, sd21_unet_attention, Args, AttnShape};

    pub fn run(args: &Args) -> anyhow::Result<bool> {
        if args.compile {
            for arch in &args.archs {
                for ty in [HalfType::F16, HalfType::Bf16] {
                    let (cubin, report) = fa::compile_cubin(arch, ty)?;
                    println!(
                        "NVRTC {arch} {}: {} bytes of cubin in {:.2} s{}",
                        ty.name(),
                        cubin.len(),
                        report.compile_time.as_secs_f64(),
                        if report.log.is_empty() {
                            String::new()
                        } else {
                            format!("\n{}", report.log)
                        }
                    );
                }
            }
            if !(args.kernels || args.bench || args.pipeline) {
                return Ok(true);
            }
        }
        let device = Device::new_cuda(args.device).context("opening the CUDA device")?;
        let Device::Cuda(cuda) = &device else { unreachable!() };
        let ctx = cuda.cuda_stream().context().clone();
        let (major, minor) = ctx.compute_capability()?;
        let (free, total) = ctx.mem_get_info()?;
        println!(
            "device {}: {} (sm_{major}{minor}), {:.1} GiB, {:.1} GiB free",
            args.device,
            ctx.name()?,
            total as f64 / (1u64 << 30) as f64,
            free as f64 / (1u64 << 30) as f64
        );
        let mut ok = true;
        if args.kernels {
            ok &= check_kernels(&device)?;
        }
        if args.bench {
            bench_attention(&device, args)?;
        }
        if args.pipeline {
            ok &= run_pipeline(&device, args)?;
        }
        println!("{}", if ok { "GPU CHECK PASSED" } else { "GPU CHECK FAILED" });
        Ok(ok)
    }

    fn sync(device: &Device) -> anyhow::Result<()> {
        device.synchronize()?;
        Ok(())
    }

    /// Max |a - b| / max(1, max |b|), in f32 on the CPU; NaN when `a` has a NaN or infinity.
    fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if a.iter().any(|x| !x.is_finite()) {
            return Ok(f32::NAN);
        }
        let max_err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let max_ref = b.iter().map(|y| y.abs()).fold(1f32, f32::max);
        Ok(max_err / max_ref)
    }

    #[derive(Clone, Copy)]
    enum Layout {
        Contiguous,
        /// `[b, seq, h, d]` transposed to `[b, h, seq, d]`, as the models make them.
        Transposed,
        /// A narrow at an offset that is not a multiple of 8 elements (copied by the launcher).
        Offset,
    }

    fn make_input(
        b: usize,
        h: usize,
        s: usize,
        d: usize,
        std: f64,
        dtype: DType,
        layout: Layout,
        dev: &Device,
    ) -> anyhow::Result<Tensor> {
        // Convert first: to_dtype makes a fresh contiguous tensor.
        let random = |shape: &[usize]| Tensor::randn(0f32, std as f32, shape, dev)?.to_dtype(dtype);
        Ok(match layout {
            Layout::Contiguous => random(&[b, h, s, d])?,
            Layout::Transposed => random(&[b, s, h, d])?.transpose(1, 2)?,
            Layout::Offset => {
                random(&[b * h * s * d + 3])?.narrow(0, 3, b * h * s * d)?.reshape((b, h, s, d))?
            }
        })
    }

    fn check_kernels(dev: &Device) -> anyhow::Result<bool> {
        println!("\n== flash-attention kernels vs an f32 reference on the CPU");
        let Device::Cuda(cuda) = dev else { unreachable!() };
        for ty in [HalfType::F16, HalfType::Bf16] {
            let report = fa::prepare(cuda, ty)?;
            println!(
                "NVRTC {} {}: compiled in {:.2} s, cubin {} KiB{}",
                report.arch,
                ty.name(),
                report.compile_time.as_secs_f64(),
                report.cubin_bytes / 1024,
                if report.log.is_empty() { String::new() } else { format!("\n{}", report.log) }
            );
        }
        // (b, h, seq_q, seq_k, d, causal, std, layout)
        let mut cases: Vec<(usize, usize, usize, usize, usize, bool, f64, Layout)> = vec![
            (1, 16, 77, 77, 64, true, 1.0, Layout::Transposed), // CLIP text encoder
            (2, 5, 1024, 77, 64, false, 1.0, Layout::Transposed), // UNet cross attention
            (2, 5, 1024, 1024, 64, false, 1.0, Layout::Contiguous),
            (1, 3, 333, 129, 40, false, 1.0, Layout::Transposed),
            (2, 8, 1024, 77, 40, false, 1.0, Layout::Contiguous),
            (1, 2, 257, 300, 80, false, 1.0, Layout::Offset),
            (1, 2, 200, 200, 128, true, 1.0, Layout::Contiguous),
            (1, 2, 150, 190, 160, false, 1.0, Layout::Transposed),
            (1, 1, 1024, 1024, 512, false, 1.0, Layout::Contiguous), // VAE mid-block (32x32 latents)
            (1, 1, 300, 300, 512, true, 1.0, Layout::Offset),
            (1, 2, 100, 1, 64, false, 1.0, Layout::Contiguous),
            (1, 1, 1, 100, 64, true, 1.0, Layout::Contiguous),
            // Large scores (|q.k| ~ 1e5): half-precision scores would overflow.
            (2, 5, 512, 512, 64, false, 20.0, Layout::Contiguous),
        ];
        for spec in KERNELS {
            if !cases.iter().any(|c| c.4 == spec.head_dim) {
                cases.push((1, 2, 100, 100, spec.head_dim, false, 1.0, Layout::Contiguous));
            }
        }
        let mut ok = true;
        for dtype in [DType::F16, DType::BF16] {
            let tol = if dtype == DType::F16 { 4e-3 } else { 3e-2 };
            for &(b, h, sq, sk, d, causal, std, layout) in &cases {
                let q = make_input(b, h, sq, d, std, dtype, layout, dev)?;
                let k = make_input(b, h, sk, d, std, dtype, layout, dev)?;
                let v = make_input(b, h, sk, d, 1.0, dtype, layout, dev)?;
                let opts = AttentionOptions { causal, upcast: true, ..AttentionOptions::new(d) };
                let out = fa::flash_attention(&q, &k, &v, opts)?;
                let cpu = |t: &Tensor| -> anyhow::Result<Tensor> {
                    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
                };
                let reference = reference_attention(&cpu(&q)?, &cpu(&k)?, &cpu(&v)?, opts)?;
                let err = rel_err(&out, &reference)?;
                let pass = err <= tol; // false for NaN
                ok &= pass;
                println!(
                    "{} {:?} b={b} h={h:<2} seq_q={sq:<5} seq_k={sk:<5} d={d:<3} causal={} std={std:<3} layout={:<10} err {err:.2e} (tol {tol:.0e})",
                    if pass { "ok  " } else { "FAIL" },
                    dtype,
                    causal as u8,
                    match layout {
                        Layout::Contiguous => "contiguous",
                        Layout::Transposed => "transposed",
                        Layout::Offset => "offset",
                    }
                );
            }
        }
        // The dispatch: attention() on CUDA f16 takes the kernel (same numbers as calling it).
        let q = make_input(2, 5, 256, 64, 1.0, DType::F16, Layout::Transposed, dev)?;
        let opts = AttentionOptions { upcast: true, ..AttentionOptions::new(64) };
        let via_dispatch = attention(&q, &q, &q, opts)?;
        let direct = fa::flash_attention(&q, &q, &q, opts)?;
        let same = rel_err(&via_dispatch, &direct)? == 0.0;
        ok &= same;
        println!(
            "{} attention() dispatches f16 CUDA tensors to the kernel",
            if same { "ok  " } else { "FAIL" }
        );
        Ok(ok)
    }

    /// Median wall time of `f` over `iters` runs after one warm-up, synchronised.
    fn time_it(
        dev: &Device,
        iters: usize,
        mut f: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Duration> {
        f()?;
        sync(dev)?;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            f()?;
            sync(dev)?;
            times.push(t.elapsed());
        }
        times.sort();
        Ok(times[times.len() / 2])
    }

    /// Time of one call per shape with the kernels and with the reference path.
    fn time_shape(
        dev: &Device,
        s: &AttnShape,
        dtype: DType,
    ) -> anyhow::Result<(Duration, Duration)> {
        let q =
            make_input(s.batch, s.heads, s.seq_q, s.head_dim, 1.0, dtype, Layout::Transposed, dev)?;
        let k =
            make_input(s.batch, s.heads, s.seq_k, s.head_dim, 1.0, dtype, Layout::Transposed, dev)?;
        let v =
            make_input(s.batch, s.heads, s.seq_k, s.head_dim, 1.0, dtype, Layout::Transposed, dev)?;
        let opts = AttentionOptions {
            causal: s.causal,
            upcast: true,
            ..AttentionOptions::new(s.head_dim)
        };
        let iters = if s.seq_q * s.seq_k >= 1 << 24 { 5 } else { 20 };
        fa::set_enabled(true);
        let flash = time_it(dev, iters, || {
            attention(&q, &k, &v, opts)?;
            Ok(())
        })?;
        fa::set_enabled(false);
        let reference = time_it(dev, iters.min(5), || {
            attention(&q, &k, &v, opts)?;
            Ok(())
        });
        fa::set_enabled(true);
        Ok((flash, reference?))
    }

    fn bench_attention(dev: &Device, args: &Args) -> anyhow::Result<()> {
        let dtype = parse_dtype(&args.dtype)?;
        println!("\n== attention at {} px, {:?}, batch 2 (classifier-free guidance): kernels vs the reference path", args.size, dtype);
        println!(
            "{:<15} {:>5} {:>6} {:>6} {:>4} {:>3} {:>5} {:>10} {:>8} {:>10} {:>8}",
            "call",
            "heads",
            "seq_q",
            "seq_k",
            "d",
            "c",
            "count",
            "flash ms",
            "TFLOP/s",
            "ref ms",
            "speedup"
        );
        let latent = args.size / 8;
        let mut shapes = sd21_unet_attention(args.size, 2);
        shapes.push(AttnShape {
            what: "vae mid",
            batch: 1,
            heads: 1,
            seq_q: latent * latent,
            seq_k: latent * latent,
            head_dim: 512,
            causal: false,
            count: 1,
        });
        shapes.push(AttnShape {
            what: "clip",
            batch: 2,
            heads: 16,
            seq_q: 77,
            seq_k: 77,
            head_dim: 64,
            causal: true,
            count: 23,
        });
        let (mut unet_flash, mut unet_ref) = (Duration::ZERO, Duration::ZERO);
        for s in &shapes {
            let (f, r) = time_shape(dev, s, dtype)?;
            let flops = 4.0 * (s.batch * s.heads * s.seq_q * s.seq_k * s.head_dim) as f64
                / if s.causal { 2.0 } else { 1.0 };
            println!(
                "{:<15} {:>5} {:>6} {:>6} {:>4} {:>3} {:>5} {:>10.3} {:>8.1} {:>10.3} {:>7.1}x",
                s.what,
                s.heads,
                s.seq_q,
                s.seq_k,
                s.head_dim,
                s.causal as u8,
                s.count,
                f.as_secs_f64() * 1e3,
                flops / f.as_secs_f64() / 1e12,
                r.as_secs_f64() * 1e3,
                r.as_secs_f64() / f.as_secs_f64()
            );
            if s.what.starts_with("unet") {
                unet_flash += f * s.count as u32;
                unet_ref += r * s.count as u32;
            }
        }
        println!(
            "attention per UNet step (sum of the calls above x count): flash {:.1} ms, reference {:.1} ms",
            unet_flash.as_secs_f64() * 1e3,
            unet_ref.as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Samples the device's used memory every millisecond while alive.
    struct MemPeak {
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicUsize>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl MemPeak {
        fn start(dev: &Device) -> Self {
            let Device::Cuda(cuda) = dev else { unreachable!() };
            let ctx = cuda.cuda_stream().context().clone();
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicUsize::new(0));
            let (s, p) = (stop.clone(), peak.clone());
            let thread = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Ok((free, total)) = ctx.mem_get_info() {
                        p.fetch_max(total - free, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            Self { stop, peak, thread: Some(thread) }
        }

        fn finish(mut self) -> usize {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            self.peak.load(Ordering::Relaxed)
        }
    }

    fn used_memory(dev: &Device) -> anyhow::Result<usize> {
        let Device::Cuda(cuda) = dev else { unreachable!() };
        let (free, total) = cuda.cuda_stream().context().mem_get_info()?;
        Ok(total - free)
    }

    fn gib(bytes: usize) -> f64 {
        bytes as f64 / (1u64 << 30) as f64
    }

    /// A VarBuilder backend that makes up every tensor a model asks for: random on the device
    /// (std 1/sqrt(fan_in) for matrices and convolutions, ones for norm weights, zeros for
    /// biases), kept in `made` so that they can be saved.
    struct RandomWeights {
        made: Arc<Mutex<HashMap<String, Tensor>>>,
    }

    impl SimpleBackend for RandomWeights {
        fn get(
            &self,
            shape: Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let dims = shape.dims();
            let t = if dims.len() == 1 {
                if name.ends_with("bias") {
                    Tensor::zeros(dims, dtype, dev)?
                } else {
                    Tensor::ones(dims, dtype, dev)?
                }
            } else {
                let fan_in: usize = dims[1..].iter().product();
                Tensor::randn(0f32, 1.0 / (fan_in as f32).sqrt(), dims, dev)?.to_dtype(dtype)?
            };
            self.made.lock().unwrap().insert(name.to_string(), t.clone());
            Ok(t)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("random weights: no shape for `{name}`")
        }

        /// Optional layouts (a `text_model.` prefix, the VAE's legacy attention names) are
        /// never present, so the models take their default names; loading the saved file
        /// again takes the same branch.
        fn contains_tensor(&self, _: &str) -> bool {
            false
        }
    }

    /// Builds one component with random f16 weights on `dev` and saves them as `dir/file`, with
    /// its config. Returns the number of parameters.
    fn write_component(
        dir: &Path,
        file: &str,
        config: &str,
        dev: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
    ) -> anyhow::Result<usize> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("config.json"), config)?;
        let made = Arc::new(Mutex::new(HashMap::new()));
        build(VarBuilder::from_backend(
            Box::new(RandomWeights { made: made.clone() }),
            DType::F16,
            dev.clone(),
        ))?;
        let tensors = std::mem::take(&mut *made.lock().unwrap());
        let params = tensors.values().map(|t| t.elem_count()).sum();
        candle_core::safetensors::save(&tensors, dir.join(file))
            .with_context(|| format!("writing {}", dir.join(file).display()))?;
        Ok(params)
    }

    /// Writes SD 2.1 (configs above, random weights, the CLIP tokenizer from `tokenizer`) as a
    /// diffusers folder.
    fn write_random_sd21(model: &Path, tokenizer: &Path, dev: &Device) -> anyhow::Result<()> {
        let started = Instant::now();
        std::fs::create_dir_all(model.join("scheduler"))?;
        std::fs::create_dir_all(model.join("tokenizer"))?;
        std::fs::write(model.join("model_index.json"), sd21::MODEL_INDEX)?;
        std::fs::write(model.join("scheduler/scheduler_config.json"), sd21::SCHEDULER)?;
        for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
        {
            std::fs::copy(tokenizer.join(name), model.join("tokenizer").join(name)).with_context(
                || {
                    format!(
                        "copying the tokenizer file {} (pass --tokenizer DIR)",
                        tokenizer.join(name).display()
                    )
                },
            )?;
        }
        let clip: ClipTextConfig = serde_json::from_str(sd21::TEXT_ENCODER)?;
        let te = write_component(
            &model.join("text_encoder"),
            "model.safetensors",
            sd21::TEXT_ENCODER,
            dev,
            |vb| ClipTextModel::new(vb, &clip).map(drop),
        )?;
        let unet_cfg: UNet2DConditionConfig = serde_json::from_str(sd21::UNET)?;
        let unet = write_component(
            &model.join("unet"),
            "diffusion_pytorch_model.safetensors",
            sd21::UNET,
            dev,
            |vb| UNet2DConditionModel::new(vb, &unet_cfg).map(drop),
        )?;
        let vae_cfg: AutoencoderKLConfig = serde_json::from_str(sd21::VAE)?;
        let vae = write_component(
            &model.join("vae"),
            "diffusion_pytorch_model.safetensors",
            sd21::VAE,
            dev,
            |vb| AutoencoderKL::new(vb, &vae_cfg).map(drop),
        )?;
        println!(
            "random SD 2.1 written to {} in {:.1} s: text encoder {:.1} M, UNet {:.1} M, VAE {:.1} M parameters (f16)",
            model.display(),
            started.elapsed().as_secs_f64(),
            te as f64 / 1e6,
            unet as f64 / 1e6,
            vae as f64 / 1e6
        );
        Ok(())
    }

    fn run_pipeline(dev: &Device, args: &Args) -> anyhow::Result<bool> {
        let dtype = parse_dtype(&args.dtype)?;
        let size = args.size;
        println!("\n== SD 2.1 architecture, random weights, end to end at {size} px, {} steps, {dtype:?}", args.steps);
        let work = args.work.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("sd-gpu-check-{}", std::process::id()))
        });
        let model = work.join("sd21-random");
        let result = (|| -> anyhow::Result<bool> {
            let before = used_memory(dev)?;
            write_random_sd21(&model, &args.tokenizer, dev)?;
            sync(dev)?;

            let started = Instant::now();
            let pipe = StableDiffusionPipeline::from_folder(&model, dtype, dev, None)?;
            sync(dev)?;
            let loaded = used_memory(dev)?;
            println!(
                "loaded with StableDiffusionPipeline::from_folder in {:.1} s; GPU memory in use {:.2} GiB ({:.2} GiB before)",
                started.elapsed().as_secs_f64(),
                gib(loaded),
                gib(before)
            );

            let mut params = GenerateParams::new("a photograph of an astronaut riding a horse");
            params.height = Some(size);
            params.width = Some(size);
            params.seeds = vec![42];
            params.num_inference_steps = 1;
            let started = Instant::now();
            pipe.generate(&params)?;
            sync(dev)?;
            println!(
                "warm-up run (1 step; includes NVRTC and candle's kernel loading): {:.1} s",
                started.elapsed().as_secs_f64()
            );

            params.num_inference_steps = args.steps;
            let peak = MemPeak::start(dev);
            let mut step_times = Vec::new();
            let mut last = Instant::now();
            let mut on_step_end = |_: &StepProgress, _: &mut Tensor| {
                let _ = dev.synchronize();
                let now = Instant::now();
                step_times.push(now - last);
                last = now;
                StepControl::Continue
            };
            let started = Instant::now();
            let out = pipe.generate_with(
                &params,
                RunHooks { on_step_end: Some(&mut on_step_end), ..Default::default() },
            )?;
            sync(dev)?;
            let total = started.elapsed();
            let peak = peak.finish();
            let mut sorted = step_times.clone();
            sorted.sort();
            let median = sorted[sorted.len() / 2];
            println!(
                "run: {:.2} s total; text encoder {:.0} ms, denoising {:.0} ms, VAE decode {:.0} ms",
                total.as_secs_f64(),
                out.timings.text_encoder.as_secs_f64() * 1e3,
                out.timings.denoise.as_secs_f64() * 1e3,
                out.timings.vae_decode.as_secs_f64() * 1e3
            );
            println!(
                "time per step (batch 2 with guidance): median {:.1} ms; each: {} (the first includes the text encoder)",
                median.as_secs_f64() * 1e3,
                step_times.iter().map(|t| format!("{:.1}", t.as_secs_f64() * 1e3)).collect::<Vec<_>>().join(", ")
            );
            println!(
                "peak GPU memory during the run: {:.2} GiB ({:.2} GiB above the loaded weights)",
                gib(peak),
                gib(peak.saturating_sub(loaded))
            );
            let mut ok = true;
            let finite = out.latents.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
            let image_ok =
                out.images.len() == 1 && out.images[0].dimensions() == (size as u32, size as u32);
            println!("{} final latents finite", if finite { "ok  " } else { "FAIL" });
            println!("{} one {size}x{size} image", if image_ok { "ok  " } else { "FAIL" });
            ok &= finite && image_ok;
            if let Some(dir) = &args.work {
                let png = dir.join("sd21-random.png");
                out.images[0].save(&png)?;
                println!("image written to {}", png.display());
            }

            // The attention kernels' share: one UNet step and one VAE decode with the kernels
            // and with the reference path.
            let latents =
                Tensor::randn(0f32, 1.0, (2, 4, size / 8, size / 8), dev)?.to_dtype(dtype)?;
            let context = pipe.encode_prompts(&["".to_string(), params.prompts[0].clone()])?;
            let unet_step = |flash: bool| -> anyhow::Result<(Duration, usize)> {
                fa::set_enabled(flash);
                let peak = MemPeak::start(dev);
                let t = time_it(dev, 3, || {
                    pipe.unet.forward(&latents, 500.0, &context)?;
                    Ok(())
                });
                let p = peak.finish();
                fa::set_enabled(true);
                Ok((t?, p))
            };
            let (flash_t, flash_mem) = unet_step(true)?;
            let (ref_t, ref_mem) = unet_step(false)?;
            println!(
                "UNet step (batch 2): {:.1} ms with the kernels, {:.1} ms with the reference path: attention kernels save {:.1} ms ({:.0}% of the reference step); peak memory {:.2} vs {:.2} GiB",
                flash_t.as_secs_f64() * 1e3,
                ref_t.as_secs_f64() * 1e3,
                (ref_t.as_secs_f64() - flash_t.as_secs_f64()) * 1e3,
                100.0 * (ref_t.as_secs_f64() - flash_t.as_secs_f64()) / ref_t.as_secs_f64(),
                gib(flash_mem),
                gib(ref_mem)
            );
            let one = latents.narrow(0, 0, 1)?.to_dtype(DType::F32)?;
            let vae = |flash: bool| -> anyhow::Result<(Duration, usize)> {
                fa::set_enabled(flash);
                let peak = MemPeak::start(dev);
                let t = time_it(dev, 2, || {
                    pipe.decode_latents(&one)?;
                    Ok(())
                });
                let p = peak.finish();
                fa::set_enabled(true);
                Ok((t?, p))
            };
            let (vf, vfm) = vae(true)?;
            let (vr, vrm) = vae(false)?;
            println!(
                "VAE decode (1 image): {:.1} ms with the kernels, {:.1} ms with the reference path; peak memory {:.2} vs {:.2} GiB",
                vf.as_secs_f64() * 1e3,
                vr.as_secs_f64() * 1e3,
                gib(vfm),
                gib(vrm)
            );
            Ok(ok)
        })();
        if !args.keep {
            let _ = std::fs::remove_dir_all(&model);
            if args.work.is_none() {
                let _ = std::fs::remove_dir_all(&work);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, String> {
        parse_args(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_run_everything() {
        let a = parse("").unwrap();
        assert!(a.kernels && a.bench && a.pipeline);
        assert_eq!(
            (a.steps, a.size, a.dtype.as_str(), a.device, a.keep),
            (4, 768, "f16", 0, false)
        );
        assert_eq!(a.tokenizer, PathBuf::from("tests/fixtures/pipelines/sd2-tiny/tokenizer"));
        assert_eq!(parse("all").unwrap(), a);
    }

    #[test]
    fn subcommands_and_options() {
        let a = parse("kernels pipeline --steps 2 --size 512 --dtype bf16 --device 1 --work /tmp/w --keep --tokenizer tok").unwrap();
        assert!(a.kernels && !a.bench && a.pipeline);
        assert_eq!(
            (a.steps, a.size, a.dtype.as_str(), a.device, a.keep),
            (2, 512, "bf16", 1, true)
        );
        assert_eq!(a.work, Some(PathBuf::from("/tmp/w")));
        assert_eq!(a.tokenizer, PathBuf::from("tok"));
    }

    #[test]
    fn compile_only() {
        let a = parse("compile --arch sm_86,sm_90").unwrap();
        assert!(a.compile && !a.kernels && !a.bench && !a.pipeline);
        assert_eq!(a.archs, vec!["sm_86".to_string(), "sm_90".to_string()]);
        assert_eq!(parse("compile").unwrap().archs, vec!["sm_80".to_string(), "sm_90".to_string()]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        for bad in [
            "--steps",
            "--steps x",
            "--steps 0",
            "--size 700",
            "--size 0",
            "--dtype f32",
            "--frobnicate",
            "kernels --work",
        ] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
        assert!(parse("--help").unwrap_err().starts_with("usage:"));
        for bad in ["compile --arch", "compile --arch 90", "compile --arch sm_x"] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
    }

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
        for c in [sd21::MODEL_INDEX, sd21::SCHEDULER, sd21::TEXT_ENCODER, sd21::UNET, sd21::VAE] {
            serde_json::from_str::<serde_json::Value>(c).unwrap();
        }
        let unet: sd_core::models::unet::UNet2DConditionConfig =
            serde_json::from_str(sd21::UNET).unwrap();
        assert_eq!(unet.block_out_channels, vec![320, 640, 1280, 1280]);
        let _: sd_core::models::vae::AutoencoderKLConfig = serde_json::from_str(sd21::VAE).unwrap();
        let _: sd_core::models::clip_text::ClipTextConfig =
            serde_json::from_str(sd21::TEXT_ENCODER).unwrap();
    }
}
