//! The GPU check of sd-core's CUDA build (run by `scripts/gpu-check.sh` on a machine with an
//! NVIDIA GPU; needs no network, no weights and no Rust toolchain there).
//!
//! ```sh
//! source scripts/cuda-env.sh
//! cargo build --release --features cuda -p sd-core --example gpu_check
//! target-cuda/release/examples/gpu_check [all|kernels|bench|pipeline|compile] [options]
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
//!
//! One file per part: `args.rs` (the command line), `sd21.rs` (SD 2.1's configs and attention
//! shapes), `kernels.rs`, `bench.rs`, `pipeline.rs` (the sub-commands) and `device.rs` (timing
//! and memory on the GPU). Without the `cuda` feature only the first two are built: the example
//! then only checks its arguments, and `cargo test` runs their unit tests.

mod args;
// Without `cuda` only the unit tests use SD 2.1's configs and shapes.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod sd21;

#[cfg(feature = "cuda")]
mod bench;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod pipeline;

use args::parse_args;

#[cfg(not(feature = "cuda"))]
fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = parse_args(&argv) {
        eprintln!("{e}");
        std::process::exit(2);
    }
    eprintln!(
        "gpu_check was built without the `cuda` feature: build it with `source \
         scripts/cuda-env.sh && cargo build --release --features cuda -p sd-core --example \
         gpu_check`"
    );
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
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("gpu_check: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the sub-commands that `args` asks for; false if a check failed.
#[cfg(feature = "cuda")]
fn run(args: &args::Args) -> anyhow::Result<bool> {
    use anyhow::Context;
    use candle_core::Device;

    if args.compile {
        kernels::compile_kernels(&args.archs)?;
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
        device::gib(total),
        device::gib(free)
    );
    let mut ok = true;
    if args.kernels {
        ok &= kernels::check_kernels(&device)?;
    }
    if args.bench {
        bench::bench_attention(&device, args)?;
    }
    if args.pipeline {
        ok &= pipeline::run_pipeline(&device, args)?;
    }
    println!("{}", if ok { "GPU CHECK PASSED" } else { "GPU CHECK FAILED" });
    Ok(ok)
}
