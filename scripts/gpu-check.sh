#!/usr/bin/env bash
# GPU check of the CUDA build, in two halves:
#
#   bash scripts/gpu-check.sh stage      # here (no GPU): build with --features cuda; strip and xz
#                                        # the binaries into .gpu-bin/ (git-ignored, ~15 MiB) with
#                                        # the CLIP tokenizer fixture and this script
#   bash scripts/gpu-check.sh run        # on the GPU machine, from the repository root, with
#                                        # .gpu-bin/ carried along (no network, no Rust needed)
#
# The run half, one PASS/FAIL line per check and a summary at the end:
#  1. finds the CUDA libraries the binaries link (libcuda.so.1 from the driver; libcublas,
#     libcublasLt, libcurand, libcudart, libnvrtc: the NVIDIA wheels next to torch, or a toolkit);
#     without a driver it stops there ("no NVIDIA driver"), which is what it does on a machine
#     without a GPU;
#  2. gpu_check kernels:  NVRTC compiles the flash-attention kernels for the device's arch; every
#                         kernel against an f32 CPU reference (f16, bf16, every head dim, causal,
#                         ragged, strided, offset);
#  3. gpu_check bench:    the attention calls of an SD 2.1 UNet step, the VAE and CLIP, kernels vs
#                         the reference path, at each size in f16 and bf16;
#  4. gpu_check pipeline: the full SD 2.1 architecture with random weights built on the GPU, end to
#                         end in each dtype at each size: time per step, peak GPU memory, finite
#                         latents, a UNet step and a VAE decode with the kernels vs the reference;
#  5. sd-cli generate --device cuda on that random model, in each dtype (the CLI binary on the GPU).
# SD_CUDA_ATTENTION=require is set throughout, so an f16/bf16 attention call falling back to the
# reference path is an error (f32 takes the reference path by design). The log and the sd-cli
# images go to $OUT when it is set, else to ./gpu-check-out. Exit code 1 on any FAIL. Options for
# the run half in the environment: STEPS=4 SIZES=512,768 DTYPES=f32,f16,bf16.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=.gpu-bin
TOKENIZER=tests/fixtures/pipelines/sd2-tiny/tokenizer

stage() {
  # shellcheck source=scripts/cuda-env.sh
  source scripts/cuda-env.sh
  echo "== building with --features cuda in $CARGO_TARGET_DIR"
  nice -n 15 cargo build --release --features cuda -p sd-cli
  nice -n 15 cargo build --release --features cuda -p sd-core --example gpu_check
  rm -rf "$BIN_DIR"
  mkdir -p "$BIN_DIR"
  for bin in "$CARGO_TARGET_DIR/release/sd-cli" "$CARGO_TARGET_DIR/release/examples/gpu_check"; do
    name="$(basename "$bin")"
    strip -o "$BIN_DIR/$name" "$bin"
    # xz shrinks the embedded PTX about 8x (gzip 4x): two binaries plus the tree fit in 64 MiB.
    xz -9 -T0 "$BIN_DIR/$name"
  done
  cp -r "$TOKENIZER" "$BIN_DIR/tokenizer"
  cp scripts/gpu-check.sh "$BIN_DIR/"
  if ! git check-ignore -q "$BIN_DIR"; then
    echo "warning: $BIN_DIR is not git-ignored" >&2
  fi
  du -sb "$BIN_DIR"/* | awk '{printf "%-32s %6.1f MiB\n", $2, $1 / 1048576}'
  # What travels to the GPU machine: the tracked and untracked-not-ignored files, and the bundle.
  local bundle tree
  bundle="$(du -sb "$BIN_DIR" | cut -f1)"
  tree="$( (git ls-files -z; git ls-files -z -o --exclude-standard) | xargs -0 du -cb 2>/dev/null |
    awk '$2 == "total" {t += $1} END {print t + 0}')"
  awk -v b="$bundle" -v t="$tree" 'BEGIN {
    printf "bundle %.1f MiB + tree %.1f MiB = %.1f MiB to carry (limit 64 MiB)\n",
      b / 1048576, t / 1048576, (b + t) / 1048576 }'
  if [ $((bundle + tree)) -gt $((64 * 1048576)) ]; then
    echo "FAIL: the bundle and the tree are over the 64 MiB that can travel" >&2
    exit 1
  fi
  echo "staged; on the GPU machine (carry $BIN_DIR): bash scripts/gpu-check.sh run"
}

# Every file on the machine that looks like a CUDA library (one pass of find over /).
list_cuda_libs() {
  find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o \
    \( -name 'libcublas*.so*' -o -name 'libcurand.so*' -o -name 'libcudart.so*' -o -name 'libnvrtc*.so*' \
    -o -name 'libcuda.so.1' \) \
    -print 2>/dev/null | sort
}

# The binaries from the bundle, unpacked into $1.
unpack() {
  local dest="$1" name
  for name in gpu_check sd-cli; do
    if [ -f "$BIN_DIR/$name.xz" ]; then
      if command -v xz >/dev/null 2>&1; then
        xz -dc "$BIN_DIR/$name.xz" >"$dest/$name"
      else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
          "$BIN_DIR/$name.xz" "$dest/$name"
      fi
    elif [ -f "$BIN_DIR/$name" ]; then
      cp "$BIN_DIR/$name" "$dest/$name"
    else
      echo "FAIL bundle: $BIN_DIR/$name(.xz) missing: run 'bash scripts/gpu-check.sh stage' where it builds and carry $BIN_DIR"
      return 1
    fi
    chmod +x "$dest/$name"
  done
}

# The shared libraries `$1` loads and where from, as `ldd` prints them (the dynamic loader's own
# trace where `ldd` is not installed).
deps() {
  if command -v ldd >/dev/null 2>&1; then
    ldd "$1"
  else
    LD_TRACE_LOADED_OBJECTS=1 "$1"
  fi
}

# Finds the NVIDIA driver and a GPU, then the CUDA 13 libraries, and puts their folders on
# LD_LIBRARY_PATH; a PASS/FAIL line each. Without a driver or a GPU it fails at once (the rest
# cannot run); a missing library fails after all of them are listed.
find_libraries() {
  local bin="$1" lib dir found all best status=0
  all="$(list_cuda_libs)"
  # The driver library normally comes with the driver's own search path; else take one found on
  # disk, never a link stub (such as scripts/cuda-env.sh's, which answers every call with
  # CUDA_ERROR_STUB_LIBRARY).
  found="$(deps "$bin" | awk '$1 == "libcuda.so.1" && $3 ~ /^\// {print $3}')"
  if [ -n "$found" ] && readlink -f "$found" | grep -q stub; then
    found=""
  fi
  if [ -z "$found" ]; then
    found="$(grep '/libcuda.so.1$' <<<"$all" | while read -r f; do
      readlink -f "$f" | grep -qv stub && echo "$f"
    done | head -n 1 || true)"
    [ -z "$found" ] || export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  if [ -z "$found" ]; then
    echo "FAIL NVIDIA driver: libcuda.so.1 not found: no NVIDIA driver, so no CUDA device on this machine"
    return 1
  fi
  echo "PASS NVIDIA driver: $found"
  if command -v nvidia-smi >/dev/null 2>&1; then
    if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
      echo "FAIL CUDA device: nvidia-smi lists no GPU: no CUDA device on this machine"
      return 1
    fi
    echo "PASS CUDA device: $(nvidia-smi -L | head -n 1)"
  fi

  # The toolkit libraries from one folder where possible (libcublas and libcublasLt, libnvrtc and
  # its builtins must be of the same release): the folder holding most of them first.
  local libs=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13 libnvrtc-builtins.so.13)
  best="$(for lib in "${libs[@]}"; do (grep -F "/$lib" <<<"$all" || true) | xargs -r -n 1 dirname | sort -u; done |
    sort | uniq -c | sort -k1,1nr -k2 | awk 'NR == 1 {print $2}')"
  local dirs=()
  for lib in "${libs[@]}"; do
    found="$( (ls "$best/$lib"* 2>/dev/null || true; grep -F "/$lib" <<<"$all" || true) | head -n 1)"
    if [ -n "$found" ]; then
      dir="$(dirname "$found")"
      echo "PASS library $lib: $found"
      case " ${dirs[*]-} " in *" $dir "*) ;; *) dirs+=("$dir") ;; esac
    else
      echo "FAIL library $lib: not found (install NVIDIA's CUDA 13 wheels or a toolkit)"
      status=1
    fi
  done
  local joined
  joined="$(IFS=:; echo "${dirs[*]-}")"
  export LD_LIBRARY_PATH="${joined}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local name
  for name in gpu_check sd-cli; do
    if deps "$(dirname "$bin")/$name" | grep 'not found'; then
      echo "FAIL libraries of $name: the above are missing"
      status=1
    fi
  done
  return "$status"
}

run() {
  local out="$1" t0=$SECONDS
  local steps="${STEPS:-4}" sizes="${SIZES:-512,768}" dtypes="${DTYPES:-f32,f16,bf16}"
  local work=/tmp/sd-gpu-check
  rm -rf "$work"
  mkdir -p "$work/bin"
  local tokenizer="$BIN_DIR/tokenizer"
  [ -d "$tokenizer" ] || tokenizer="$TOKENIZER"
  export SD_CUDA_ATTENTION=require

  echo "== 1. bundle and CUDA libraries"
  unpack "$work/bin" || return 1
  local failed=0 lines
  # Into a file, not a pipe: LD_LIBRARY_PATH must stay set in this shell.
  find_libraries "$work/bin/gpu_check" >"$work/libraries.log" || failed=1
  cat "$work/libraries.log"
  if [ "$failed" = 1 ]; then
    echo "GPU CHECK FAILED"
    return 1
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

  echo "== 2-4. gpu_check kernels, bench, pipeline ($((SECONDS - t0)) s so far)"
  local status
  timeout 330 "$work/bin/gpu_check" all --steps "$steps" --size "$sizes" --dtype "$dtypes" \
    --tokenizer "$tokenizer" --work "$work" --keep | tee "$work/gpu_check.log"
  status="${PIPESTATUS[0]}"
  lines="$(cat "$work/libraries.log" "$work/gpu_check.log" | grep -E '^(PASS|FAIL) ' || true)"
  # gpu_check prints its own FAIL lines; a crash or the timeout (status 124) prints none.
  if [ "$status" != 0 ]; then
    failed=1
    grep -q '^FAIL ' "$work/gpu_check.log" ||
      lines+=$'\n'"FAIL gpu_check: exit status $status$([ "$status" = 124 ] && echo ' (over its 330 s)') without a summary: see the log above"
  fi

  echo "== 5. sd-cli generate --device cuda ($((SECONDS - t0)) s so far)"
  local dtype started
  for dtype in ${dtypes//,/ }; do
    if [ ! -d "$work/sd21-random" ]; then
      lines+=$'\n'"FAIL sd-cli $dtype: no random model (the pipeline step failed)"
      failed=1
      continue
    fi
    started=$SECONDS
    if timeout 120 "$work/bin/sd-cli" generate --model "$work/sd21-random" --device cuda \
      --dtype "$dtype" --height 512 --width 512 --steps 2 --seed 1 --prompt "a red cube" \
      --out "$out/sd-cli-$dtype.png"; then
      lines+=$'\n'"PASS sd-cli generate --device cuda --dtype $dtype, 512 px, 2 steps: $((SECONDS - started)) s"
    else
      lines+=$'\n'"FAIL sd-cli generate --device cuda --dtype $dtype"
      failed=1
    fi
  done
  rm -rf "$work"

  echo
  echo "== summary ($((SECONDS - t0)) s)"
  sed '/^$/d' <<<"$lines"
  grep -q '^FAIL ' <<<"$lines" && failed=1
  echo "GPU CHECK $([ "$failed" = 0 ] && echo PASSED || echo FAILED)"
  return "$failed"
}

case "${1:-run}" in
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
    echo "usage: bash scripts/gpu-check.sh stage|run" >&2
    exit 2
    ;;
esac
