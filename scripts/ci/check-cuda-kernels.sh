#!/usr/bin/env bash
# CI check of sd-core's CUDA kernels, without a GPU and without the (slow) candle CUDA build:
#  1. NVRTC compiles every kernel source (sd-core/src/attention/kernels/*.cu, the very files the
#     `cuda` build embeds) for sm_80 and sm_90 into cubins; any compile error fails the check. One
#     line per kernel and architecture: registers, stack, spills.
#  2. The kernels run on the CPU through a host emulator of the PTX instructions they use
#     (scripts/ci/fa_emulator.h) and are compared with a double-precision reference.
# Installs what it needs: the pinned nvidia-cuda-nvrtc wheel (libnvrtc only; the kernels include no
# CUDA headers) into a venv under ~/.cache/sd-rs, and g++ if missing. About a minute when cached.
set -euo pipefail
cd "$(dirname "$0")/../.."

NVRTC_WHEEL="nvidia-cuda-nvrtc==13.0.88"
ARCHS=(sm_80 sm_90)
VENV="${SD_NVRTC_VENV:-$HOME/.cache/sd-rs/nvrtc-venv}"

if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "== installing python3 and venv"
  apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
fi
if ! command -v g++ >/dev/null 2>&1; then
  echo "== installing g++"
  apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi

if [ "$(cat "$VENV/.sd-rs-wheels" 2>/dev/null)" != "$NVRTC_WHEEL" ]; then
  echo "== installing $NVRTC_WHEEL into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$NVRTC_WHEEL"
  echo "$NVRTC_WHEEL" >"$VENV/.sd-rs-wheels"
fi
NVRTC="$(find "$VENV" -name 'libnvrtc.so.13' -print -quit)"
if [ -z "$NVRTC" ]; then
  echo "FAIL: libnvrtc.so.13 not found under $VENV" >&2
  exit 1
fi

shopt -s nullglob
SOURCES=(sd-core/src/attention/kernels/*.cu sd-core/src/ops/kernels/*.cu)
shopt -u nullglob
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "FAIL: no kernel sources found" >&2
  exit 1
fi

echo "== NVRTC: compiling ${SOURCES[*]} for ${ARCHS[*]}"
arch_args=()
for a in "${ARCHS[@]}"; do arch_args+=(--arch "$a"); done
# libnvrtc loads libnvrtc-builtins from its own folder.
LD_LIBRARY_PATH="$(dirname "$NVRTC")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  python3 scripts/ci/nvrtc_compile.py --nvrtc "$NVRTC" "${arch_args[@]}" "${SOURCES[@]}"
# sd-core compiles one element type per module at run time: check those configurations too.
LD_LIBRARY_PATH="$(dirname "$NVRTC")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  python3 scripts/ci/nvrtc_compile.py --nvrtc "$NVRTC" "${arch_args[@]}" \
  --variant=-DSD_FA_ONLY_F16 --variant=-DSD_FA_ONLY_BF16 sd-core/src/attention/kernels/flash_attn.cu

echo "== flash attention kernels on the host emulator vs a float64 reference"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
g++ -std=c++20 -O2 -I scripts/ci -o "$tmp/fa_emulate" scripts/ci/fa_emulate.cpp
"$tmp/fa_emulate"
