#!/usr/bin/env bash
# GPU check of the CUDA build, in two halves:
#
#   bash scripts/gpu-check.sh stage      # here (no GPU): build with --features cuda, strip and
#                                        # xz the binaries into .gpu-bin/ (git-ignored, ~15 MiB)
#   bash scripts/gpu-check.sh [run]      # on the GPU machine, from the repository root, with
#                                        # .gpu-bin/ carried along (no network, no Rust needed)
#
# The run half finds the CUDA libraries the binaries link (libcublas, libcublasLt, libcurand,
# libcudart, libnvrtc: the NVIDIA wheels next to torch, or a toolkit) with `find`, then
#  1. gpu_check kernels:  the flash-attention kernels (NVRTC-compiled for this GPU) against an f32
#                         CPU reference, f16 and bf16, every head dim, causal, ragged, strided;
#  2. gpu_check bench:    the attention calls of an SD 2.1 UNet step, the VAE and CLIP at 768 px,
#                         kernels vs the reference path;
#  3. gpu_check pipeline: the full SD 2.1 architecture with random weights built on the GPU, end
#                         to end at 768 px for a few steps: time per step, stage times, a UNet step
#                         with the kernels vs the reference path, peak GPU memory;
#  4. sd-cli generate --device cuda on that random model (the CLI binary on the GPU).
# The log (and the image) go to $OUT when it is set, else to ./gpu-check-out. Exit code 1 if a
# step fails. Options for the run half: STEPS=4 SIZE=768 DTYPE=f16 in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=.gpu-bin
mode="${1:-run}"

stage() {
  # shellcheck source=scripts/cuda-env.sh
  source scripts/cuda-env.sh
  echo "== building with --features cuda in $CARGO_TARGET_DIR"
  nice -n 19 cargo build --release --features cuda -p sd-cli
  nice -n 19 cargo build --release --features cuda -p sd-core --example gpu_check
  rm -rf "$BIN_DIR"
  mkdir -p "$BIN_DIR"
  for bin in "$CARGO_TARGET_DIR/release/sd-cli" "$CARGO_TARGET_DIR/release/examples/gpu_check"; do
    name="$(basename "$bin")"
    strip -o "$BIN_DIR/$name" "$bin"
    # xz shrinks the embedded PTX about 8x (gzip 4x): two binaries plus the tree fit in 64 MiB.
    xz -9 -T0 "$BIN_DIR/$name"
  done
  if ! grep -qx '/.gpu-bin' .gitignore && ! git check-ignore -q "$BIN_DIR"; then
    echo "warning: $BIN_DIR is not git-ignored" >&2
  fi
  du -b "$BIN_DIR"/* | awk '{printf "%-32s %6.1f MiB\n", $2, $1 / 1048576}'
  local total
  total="$(du -cb "$BIN_DIR"/* | tail -n 1 | cut -f1)"
  if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "FAIL: $BIN_DIR is $((total / 1048576)) MiB, over what can travel (64 MiB with the tree)" >&2
    exit 1
  fi
  echo "staged; on the GPU machine (carry $BIN_DIR): bash scripts/gpu-check.sh"
}

# Every file on the machine that looks like a CUDA library (one pass of find over /).
list_cuda_libs() {
  find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o \
    \( -name 'libcublas*.so*' -o -name 'libcurand.so*' -o -name 'libcudart.so*' -o -name 'libnvrtc*.so*' \
    -o -name 'libcuda.so.1' \) \
    -print 2>/dev/null | sort
}

run() {
  local out="$1"
  local bins="$PWD/$BIN_DIR"
  for name in gpu_check sd-cli; do
    if [ -f "$bins/$name.xz" ]; then
      if command -v xz >/dev/null 2>&1; then
        xz -dc "$bins/$name.xz" >"/tmp/$name"
      else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
          "$bins/$name.xz" "/tmp/$name"
      fi
    elif [ -f "$bins/$name" ]; then
      cp "$bins/$name" "/tmp/$name"
    else
      echo "FAIL: $bins/$name(.xz) missing: run 'bash scripts/gpu-check.sh stage' where it builds and carry $BIN_DIR" >&2
      exit 1
    fi
    chmod +x "/tmp/$name"
  done

  echo "== CUDA libraries"
  local dirs=() lib dir found all
  all="$(list_cuda_libs)"
  for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13 libnvrtc-builtins.so.13; do
    found="$(grep -F "/$lib" <<<"$all" | head -n 1 || true)"
    if [ -n "$found" ]; then
      dir="$(dirname "$found")"
      echo "$lib: $found"
      case " ${dirs[*]-} " in *" $dir "*) ;; *) dirs+=("$dir") ;; esac
    else
      echo "$lib: not found"
    fi
  done
  local joined
  joined="$(IFS=:; echo "${dirs[*]-}")"
  export LD_LIBRARY_PATH="${joined}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # The driver library normally comes with the driver's own search path; else take one found
  # on disk (never a link stub).
  if ldd /tmp/gpu_check | grep -q 'libcuda.so.1 => not found'; then
    found="$(grep '/libcuda.so.1$' <<<"$all" | while read -r f; do
      readlink -f "$f" | grep -qv stub && echo "$f"
    done | head -n 1 || true)"
    if [ -n "$found" ]; then
      echo "libcuda.so.1: $found"
      dir="$(dirname "$found")"
      export LD_LIBRARY_PATH="$dir:$LD_LIBRARY_PATH"
    fi
  fi
  if ldd /tmp/gpu_check | grep 'not found'; then
    echo "FAIL: libraries missing (above)" >&2
    exit 1
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

  local steps="${STEPS:-4}" size="${SIZE:-768}" dtype="${DTYPE:-f16}" failed=0
  local work=/tmp/sd-gpu-check
  rm -rf "$work"
  mkdir -p "$work"
  local t0=$SECONDS

  echo "== 1. kernels"
  /tmp/gpu_check kernels || failed=1
  echo "== 2. attention benchmark (${SECONDS}s so far)"
  /tmp/gpu_check bench --size "$size" --dtype "$dtype" || failed=1
  echo "== 3. pipeline (${SECONDS}s so far)"
  /tmp/gpu_check pipeline --steps "$steps" --size "$size" --dtype "$dtype" --work "$work" --keep || failed=1
  [ -f "$work/sd21-random.png" ] && cp "$work/sd21-random.png" "$out/"

  echo "== 4. sd-cli on the GPU (${SECONDS}s so far)"
  if [ -d "$work/sd21-random" ]; then
    if /tmp/sd-cli generate --model "$work/sd21-random" --device cuda --dtype "$dtype" --steps 2 \
      --seed 1 --prompt "a red cube" --out "$work/cli.png"; then
      echo "ok   sd-cli generate --device cuda"
    else
      echo "FAIL sd-cli generate --device cuda"
      failed=1
    fi
  else
    echo "skipped: no random model (the pipeline step failed)"
    failed=1
  fi
  rm -rf "$work"
  echo "== done in $((SECONDS - t0)) s: $([ "$failed" = 0 ] && echo PASSED || echo FAILED)"
  return "$failed"
}

case "$mode" in
  stage) stage ;;
  run)
    out="${OUT:-$PWD/gpu-check-out}"
    mkdir -p "$out"
    set +e
    run "$out" 2>&1 | tee "$out/gpu-check.log"
    status="${PIPESTATUS[0]}"
    set -e
    exit "$status"
    ;;
  *)
    echo "usage: bash scripts/gpu-check.sh [stage|run]" >&2
    exit 2
    ;;
esac
