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
//! * `bench`: times the attention calls of one SD 2.1 UNet step at each `--size` (batch 2, as
//!   with classifier-free guidance), the VAE's and CLIP's, with the kernels and with the reference
//!   path, in each 16-bit `--dtype`.
//! * `pipeline`: builds the full SD 2.1 architecture with random weights on the GPU, writes it as a
//!   diffusers folder (f16 safetensors, about 2.6 GB) under `--work`, loads it with
//!   `StableDiffusionPipeline::from_folder` in each `--dtype` and generates at each `--size` for
//!   `--steps` steps: time per step, stage times, peak GPU memory, finite latents, and in f16/bf16
//!   a UNet step and a VAE decode with the kernels vs the reference path. f32 takes the reference
//!   attention path by design.
//!
//! * `compile`: only NVRTC-compiles the kernels for `--arch` (default `sm_80,sm_90`) through
//!   sd-core's own compile path; needs libnvrtc but no GPU.
//!
//! Options: `--steps N` (4), `--size PX,...` (512,768), `--dtype f32,f16,bf16` (all three),
//! `--device N` (0), `--tokenizer DIR` (tests/fixtures/pipelines/sd2-tiny/tokenizer), `--work DIR`
//! (a temporary folder, removed at the end unless `--keep`).
//!
//! It ends with a summary, one `PASS`/`FAIL` line per check, including one that fails when any
//! f16/bf16 attention call fell back to the reference path (`attention::cuda::fallback_count`);
//! a check that errors is a `FAIL` line and the others still run. Exit code 1 on any `FAIL`.
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
    let mut summary = Summary::default();
    summary.record("gpu_check", |summary| run(&args, summary));
    if !summary.print() {
        std::process::exit(1);
    }
}

/// The `PASS`/`FAIL` lines printed at the end, one per check.
#[cfg(feature = "cuda")]
#[derive(Default)]
pub struct Summary(Vec<(bool, String)>);

#[cfg(feature = "cuda")]
impl Summary {
    pub fn add(&mut self, pass: bool, line: String) {
        self.0.push((pass, line));
    }

    /// Runs `check`; an error becomes a `FAIL` line for `what` (so the next checks still run).
    pub fn record(&mut self, what: &str, check: impl FnOnce(&mut Self) -> anyhow::Result<()>) {
        if let Err(e) = check(self) {
            eprintln!("{what}: error: {e:#}");
            self.add(false, format!("{what}: error: {e:#}"));
        }
    }

    /// Prints the summary; true when every line passed.
    fn print(&self) -> bool {
        println!("\n== summary");
        for (pass, line) in &self.0 {
            println!("{} {line}", if *pass { "PASS" } else { "FAIL" });
        }
        let passed = self.0.iter().all(|(pass, _)| *pass);
        println!("{}", if passed { "GPU CHECK PASSED" } else { "GPU CHECK FAILED" });
        passed
    }
}

/// Runs the sub-commands that `args` asks for, each adding its lines to `summary`.
#[cfg(feature = "cuda")]
fn run(args: &args::Args, summary: &mut Summary) -> anyhow::Result<()> {
    use anyhow::Context;
    use candle_core::{DType, Device};
    use sd_core::attention::cuda::fallback_count;
    use sd_core::pipeline::parse_dtype;

    if args.compile {
        summary.record("NVRTC compile", |_| kernels::compile_kernels(&args.archs));
        if !(args.kernels || args.bench || args.pipeline) {
            return Ok(());
        }
    }
    let device = Device::new_cuda(args.device)
        .context("opening the CUDA device (no GPU, or no NVIDIA driver?)")?;
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
    if args.kernels {
        summary.record("kernels", |summary| kernels::check_kernels(&device, summary));
    }
    if args.bench {
        for &size in &args.sizes {
            for name in &args.dtypes {
                let dtype = parse_dtype(name)?;
                if dtype != DType::F32 {
                    summary.record(&format!("bench {dtype:?} {size} px"), |summary| {
                        bench::bench_attention(&device, size, dtype, summary)
                    });
                }
            }
        }
    }
    if args.pipeline {
        summary.record("pipeline", |summary| pipeline::run_pipeline(&device, args, summary));
    }
    let fallbacks = fallback_count();
    summary.add(
        fallbacks == 0,
        format!("{fallbacks} f16/bf16 attention calls fell back to the reference path"),
    );
    Ok(())
}
