#!/usr/bin/env bash
# The project's test command (README, .ci/run). Runs on a fresh 2-core machine with the Rust
# toolchain; installs what else it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null 2>&1; then
  echo "== installing a C compiler (rustls' ring crate and the CUDA kernel emulator build C/C++)"
  apt-get update -qq && apt-get install -y -qq build-essential
fi

# Disk: CI's machine has had less than 10 GB free. No pip cache (every wheel would be stored
# twice) and no incremental cargo artifacts (rebuilt from scratch there anyway); the dev profile
# keeps line tables only (Cargo.toml). Each stage prints what is left, so a full disk is plain.
export PIP_NO_CACHE_DIR=1
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
stage() { echo "== $* [$(df -h --output=avail . | tail -1 | tr -d ' ') free on disk]"; }

stage "format and lints: cargo fmt --check, cargo clippy -D warnings (sd-py too)"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
cargo fmt --all --check
# sd-py's pyo3 build script needs a Python 3 interpreter on PATH (the one the stages below use);
# without one, PYO3_NO_PYTHON=1 PYO3_BUILD_EXTENSION_MODULE=1 lets it check the abi3 module.
cargo clippy --workspace --all-targets --locked -- -D warnings

stage "Intel MKL from PyPI (sd-core loads it at run time: the f32 GEMM on Intel CPUs, bf16 with the packed kernels off)"
export SD_MKL_WHEEL=mkl==2026.2.0
python3 -m pip install -q --disable-pip-version-check --user --no-deps "$SD_MKL_WHEEL"
# Tests that measure the MKL paths fail instead of skipping if MKL cannot be loaded.
export SD_REQUIRE_MKL=1
# Likewise the AMX tile GEMM, on CPUs that have AMX (this project's machines do).
if grep -q amx_bf16 /proc/cpuinfo 2>/dev/null; then
  export SD_REQUIRE_AMX=1
fi

stage "cargo test (workspace)"
cargo test --workspace --locked

# sd-core's default f32 GEMM is MKL on Intel CPUs and the builtin one elsewhere: the run above
# used that one, this pass the other (the builtin pass also checks that nothing needs MKL).
# --workspace (not -p sd-core) keeps the feature set of the run above, so nothing recompiles.
if grep -q GenuineIntel /proc/cpuinfo 2>/dev/null; then other_gemm=builtin; else other_gemm=mkl; fi
stage "cargo test: sd-core's layers and parity with the other f32 GEMM (SD_CPU_GEMM=$other_gemm)"
if [ "$other_gemm" = builtin ]; then unset_mkl=(-u SD_REQUIRE_MKL); else unset_mkl=(); fi
SD_CPU_GEMM=$other_gemm env "${unset_mkl[@]}" cargo test --workspace --locked --lib --test parity_pipeline --test parity_stages --test loading --test lora

stage "CUDA kernels: NVRTC compile for sm_80/sm_90 (no GPU needed)"
bash scripts/ci/check-cuda-kernels.sh

stage "Python: sd_py wheel, API, Ray Serve, Gradio"
bash scripts/ci/test-python.sh

stage "all tests passed"
