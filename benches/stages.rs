//! Per-stage CPU benches on the full SD 2.1 architecture with random weights: the text encoder,
//! one UNet call with classifier-free guidance (batch 2) at 256 and 512 px, the VAE decode at
//! 512 px, and the layers that dominate them, ours against candle-nn's: a 3x3 convolution and
//! GroupNorm+SiLU at the UNet's first level. Attention has its own bench (`attention`).
//!
//! The model folder is made once by `cargo run --release -p sd-core --example make_random_model`
//! (default `~/.cache/sd-rs/sd21-random`; `SD_BENCH_MODEL` overrides). `SD_BENCH_DTYPE=bf16`
//! loads the models in bf16 (bf16 GEMMs on the packed kernels, AMX tiles or AVX512_BF16, or on
//! MKL with those switched off by `SD_CPU_AMX=0 SD_CPU_AVX512BF16=0`; f32 activations). What runs
//! (`sd_core::cpu::describe`: the f32 GEMM backend, see `SD_CPU_GEMM`, and the bf16 kernel) is
//! printed first.
//!
//! `layers_bf16`: the same convolution and the 16x16 level's 1280-channel one with bf16 weights,
//! on the packed kernel or MKL (the entry names say which).
//!
//! `cargo bench -p sd-core --bench stages [-- FILTER]`, e.g. `-- unet_256` or `-- layers`.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sd_core::nn::{conv2d, group_norm, Conv2dConfig};
use sd_core::pipeline::StableDiffusionPipeline;

fn model_dir() -> PathBuf {
    std::env::var_os("SD_BENCH_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/sd-rs/sd21-random")
    })
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut g = sd_core::rng::TorchGenerator::new(seed);
    let n = shape.iter().product();
    Tensor::from_vec(g.randn(n), shape, &Device::Cpu).unwrap()
}

fn stages(c: &mut Criterion) {
    let dir = model_dir();
    if !dir.join("model_index.json").is_file() {
        panic!(
            "{} is missing: run `cargo run --release -p sd-core --example make_random_model` first",
            dir.display()
        );
    }
    let dtype = match std::env::var("SD_BENCH_DTYPE").as_deref() {
        Ok("bf16") => DType::BF16,
        _ => DType::F32,
    };
    sd_core::runtime::init_cpu(None).unwrap();
    eprintln!("dtype {dtype:?}\n{}", sd_core::cpu::describe(dtype));
    let pipe = StableDiffusionPipeline::from_folder(&dir, dtype, &Device::Cpu, None).unwrap();
    let context = pipe
        .encode_prompts(&[
            "".to_string(),
            "a photograph of an astronaut riding a horse".to_string(),
        ])
        .unwrap();

    let mut g = c.benchmark_group("stages");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(20));
    let prompts = vec!["".to_string(), "a photograph of an astronaut riding a horse".to_string()];
    g.bench_function("text_encoder", |b| b.iter(|| pipe.encode_prompts(&prompts).unwrap()));
    for px in [256usize, 512] {
        let latents = randn(&[2, 4, px / 8, px / 8], 1);
        g.bench_function(format!("unet_{px}"), |b| {
            b.iter(|| pipe.unet.forward(&latents, 999.0, &context).unwrap())
        });
    }
    let latents = randn(&[1, 4, 64, 64], 2);
    g.bench_function("vae_decode_512", |b| b.iter(|| pipe.vae.decode(&latents).unwrap()));
    g.finish();
}

/// The UNet's first level at 512 px with CFG: `[2, 320, 64, 64]`.
fn layers(c: &mut Criterion) {
    sd_core::runtime::init_cpu(None).unwrap();
    let dev = Device::Cpu;
    let x = randn(&[2, 320, 64, 64], 3);
    let weights = candle_nn::VarBuilder::from_tensors(
        [
            ("conv.weight".to_string(), (randn(&[320, 320, 3, 3], 4) * 0.02).unwrap()),
            ("conv.bias".to_string(), randn(&[320], 5)),
            ("norm.weight".to_string(), randn(&[320], 6)),
            ("norm.bias".to_string(), randn(&[320], 7)),
        ]
        .into_iter()
        .collect(),
        DType::F32,
        &dev,
    );
    let ours_conv =
        conv2d(320, 320, 3, Conv2dConfig { padding: 1, stride: 1 }, weights.pp("conv")).unwrap();
    let candle_conv = candle_nn::conv2d(
        320,
        320,
        3,
        candle_nn::Conv2dConfig { padding: 1, ..Default::default() },
        weights.pp("conv"),
    )
    .unwrap();
    let ours_norm = group_norm(32, 320, 1e-5, weights.pp("norm")).unwrap();
    let candle_norm = candle_nn::group_norm(32, 320, 1e-5, weights.pp("norm")).unwrap();

    let mut g = c.benchmark_group("layers");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    g.bench_function("conv3x3_320_64x64/ours", |b| b.iter(|| ours_conv.forward(&x).unwrap()));
    g.bench_function("conv3x3_320_64x64/candle", |b| b.iter(|| candle_conv.forward(&x).unwrap()));
    g.bench_function("group_norm_silu_320_64x64/ours", |b| {
        b.iter(|| ours_norm.forward_silu(&x).unwrap())
    });
    g.bench_function("group_norm_silu_320_64x64/candle", |b| {
        b.iter(|| candle_nn::ops::silu(&candle_norm.forward(&x).unwrap()).unwrap())
    });
    g.finish();
}

/// bf16 3x3 convolutions with CFG at the UNet's first (`[2, 320, 64, 64]`) and third
/// (`[2, 1280, 16, 16]`) levels at 512 px, where MKL's per-call repacking of the weight costs most.
fn layers_bf16(c: &mut Criterion) {
    sd_core::runtime::init_cpu(None).unwrap();
    let path = if let Some(kernel) = sd_core::cpu::packed::kernel() {
        match kernel {
            sd_core::cpu::packed::Kernel::AmxTiles => "amx",
            sd_core::cpu::packed::Kernel::Avx512Bf16 => "avx512bf16",
        }
    } else if sd_core::cpu::blas::mkl().is_ok() {
        "mkl"
    } else {
        eprintln!("layers_bf16 skipped: no packed kernel and no MKL");
        return;
    };
    let mut g = c.benchmark_group("layers_bf16");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for (channels, size) in [(320usize, 64usize), (1280, 16), (1280, 8)] {
        let x = randn(&[2, channels, size, size], 3);
        let weights = candle_nn::VarBuilder::from_tensors(
            [
                ("weight".to_string(), (randn(&[channels, channels, 3, 3], 4) * 0.02).unwrap()),
                ("bias".to_string(), randn(&[channels], 5)),
            ]
            .into_iter()
            .collect(),
            DType::BF16,
            &Device::Cpu,
        );
        let conv =
            conv2d(channels, channels, 3, Conv2dConfig { padding: 1, stride: 1 }, weights).unwrap();
        g.bench_function(format!("conv3x3_{channels}_{size}x{size}/{path}"), |b| {
            b.iter(|| conv.forward(&x).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, layers, layers_bf16, stages);
criterion_main!(benches);
