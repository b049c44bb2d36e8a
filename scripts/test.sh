#!/usr/bin/env bash
# The project's test command (README, .ci/run). Runs on a fresh 2-core machine with the Rust
# toolchain; installs what else it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null 2>&1; then
  echo "== installing a C compiler (rustls' ring crate and the CUDA kernel emulator build C/C++)"
  apt-get update -qq && apt-get install -y -qq build-essential
fi

echo "== cargo test (workspace)"
cargo test --workspace --locked

echo "== CUDA kernels: NVRTC compile for sm_80/sm_90 (no GPU needed)"
bash scripts/ci/check-cuda-kernels.sh

echo "== Python: sd_py wheel, API, Ray Serve, Gradio"
bash scripts/ci/test-python.sh

echo "== all tests passed"
