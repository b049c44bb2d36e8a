# shellcheck shell=bash
# Sets up a CUDA 13.0 toolchain from NVIDIA's PyPI wheels (no GPU, no system CUDA needed) and
# exports what `cargo build --features cuda` needs. Source it from the repository root:
#
#   source scripts/cuda-env.sh && cargo build --release --features cuda -p sd-cli
#
# First use creates a venv under ~/.cache/sd-rs/cuda-venv (about 1 GB of wheels) and a folder of
# link stubs; later uses only export variables. The toolkit is pinned to 13.0.x so that the PTX that
# candle-kernels embeds can be JIT-compiled by a CUDA 13.0 driver (driver 580); a newer toolkit
# writes a PTX ISA that such a driver rejects.
#
# Exports: CUDARC_CUDA_VERSION, CUDA_ROOT/CUDA_PATH/CUDA_HOME, PATH (nvcc), CUDA_COMPUTE_CAP
# (default 90 = Hopper; set 80 before sourcing for Ampere), LIBRARY_PATH (the stubs folder),
# LD_LIBRARY_PATH (the wheels' libraries, for NVRTC) and CARGO_TARGET_DIR (default target-cuda, so
# the CUDA build never invalidates the default build in target/).

SD_CUDA_VENV="${SD_CUDA_VENV:-$HOME/.cache/sd-rs/cuda-venv}"
# The pinned wheels; keep nvcc/nvrtc on the same 13.0.x release.
SD_CUDA_WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)

_sd_cuda_setup() {
  local repo stamp py cu stubs lib
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  stamp="$SD_CUDA_VENV/.sd-rs-wheels"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${SD_CUDA_WHEELS[*]}" ]; then
    echo "cuda-env: installing ${SD_CUDA_WHEELS[*]} into $SD_CUDA_VENV" >&2
    python3 -m venv "$SD_CUDA_VENV" || return 1
    "$SD_CUDA_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${SD_CUDA_WHEELS[@]}" || return 1
    echo "${SD_CUDA_WHEELS[*]}" >"$stamp"
  fi
  py="$SD_CUDA_VENV/bin/python"
  cu="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13" || return 1
  if [ ! -x "$cu/bin/nvcc" ]; then
    echo "cuda-env: no nvcc under $cu" >&2
    return 1
  fi

  # Link stubs: the wheels ship only versioned libraries (libcublas.so.13, ...) and no libcuda at
  # all. The linker wants `libX.so`: symlinks for the toolkit libraries, and for the driver a stub
  # libcuda.so (soname libcuda.so.1, so the binary loads the real driver library at run time)
  # exporting every driver function cudarc declares. Like NVIDIA's own stub, each returns
  # CUDA_ERROR_STUB_LIBRARY (34), so a binary started on it fails cleanly at cuInit.
  stubs="$SD_CUDA_VENV/stubs"
  if ! grep -qs 'return 34;' "$stubs/libcuda_stub.c"; then
    mkdir -p "$stubs" || return 1
    for lib in cublas cublasLt curand cudart nvrtc; do
      local real
      real="$(find "$cu/lib" -maxdepth 1 -name "lib$lib.so.*" | sort | head -n 1)"
      if [ -z "$real" ]; then
        echo "cuda-env: lib$lib.so.* not found in $cu/lib" >&2
        return 1
      fi
      ln -sf "$real" "$stubs/lib$lib.so"
    done
    local src
    src="$(_sd_cuda_driver_bindings)" || return 1
    grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$src" | awk '{print $4}' | sort -u |
      awk '{print "int " $1 "(void) { return 34; }"}' >"$stubs/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c" || return 1
  fi
  # The same stub as libcuda.so.1, in a folder of its own: only for starting a CUDA binary on a
  # machine without a driver (NVRTC-only work such as `gpu_check compile`). Never put it on
  # LD_LIBRARY_PATH where a real driver is installed.
  if [ ! -e "$SD_CUDA_VENV/stub-driver/libcuda.so.1" ]; then
    mkdir -p "$SD_CUDA_VENV/stub-driver" && ln -sf "$stubs/libcuda.so" "$SD_CUDA_VENV/stub-driver/libcuda.so.1"
  fi

  export CUDARC_CUDA_VERSION=13000
  export CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_HOME="$cu"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  case ":$PATH:" in *":$cu/bin:"*) ;; *) export PATH="$cu/bin:$PATH" ;; esac
  export LIBRARY_PATH="$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$cu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target-cuda}"
  export SD_CUDA_ROOT="$cu" SD_CUDA_VENV
  echo "cuda-env: CUDA 13.0 wheels at $cu; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; CARGO_TARGET_DIR=$CARGO_TARGET_DIR" >&2
}

# The file of cudarc's driver bindings (the crate is fetched by cargo first if needed).
_sd_cuda_driver_bindings() {
  local f
  f="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/*' -name '*.rs' 2>/dev/null | sort | tail -n 1)"
  if [ -z "$f" ]; then
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo fetch -q) >&2 || return 1
    f="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/*' -name '*.rs' 2>/dev/null | sort | tail -n 1)"
  fi
  [ -n "$f" ] || { echo "cuda-env: cudarc sources not found" >&2; return 1; }
  echo "$f"
}

_sd_cuda_setup
