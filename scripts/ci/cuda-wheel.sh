#!/usr/bin/env bash
# Builds the CUDA wheel of sd_py as deploy/Dockerfile does (without Docker; no GPU needed) and
# checks it on this machine, which has no GPU and no NVIDIA driver:
#  1. the wheel: its size, its platform tag, the libraries its extension links;
#  2. no driver, no CUDA libraries: `import sd_py` and `import sd_py.serve` work (they do not load
#     the extension); the first use of the extension is an ImportError naming what is missing;
#  3. the CUDA libraries and a stand-in driver that, like NVIDIA's stub, answers every call with
#     CUDA_ERROR_STUB_LIBRARY (scripts/cuda-env.sh's stub-driver): the extension loads,
#     `device="cuda"` is a RuntimeError ("no usable CUDA device or driver"), and the tiny fixture
#     model runs on the CPU.
# Too slow for scripts/test.sh (the first build compiles candle's CUDA kernels: 20+ minutes on 2
# cores); run by hand: `bash scripts/ci/cuda-wheel.sh`. SD_CUDA_WHEEL_VENV: the scratch venv (where
# it has Ray Serve, `import sd_py.serve` is checked too); SD_CUDA_WHEEL: check this wheel instead of
# building one.
set -euo pipefail
cd "$(dirname "$0")/../.."

# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
venv="${SD_CUDA_WHEEL_VENV:-$HOME/.cache/sd-rs/cuda-wheel-venv}"
wheels="$CARGO_TARGET_DIR/cuda-wheels"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# Installed only where missing: a venv may see maturin and numpy from elsewhere.
"$venv/bin/maturin" --version 2>/dev/null | grep -qx 'maturin 1.16.0' ||
  "$venv/bin/pip" install -q --disable-pip-version-check maturin==1.16.0
"$venv/bin/python" -c 'import numpy, PIL' 2>/dev/null ||
  "$venv/bin/pip" install -q --disable-pip-version-check numpy pillow

echo "== 1. maturin build (as deploy/Dockerfile)"
if [ -n "${SD_CUDA_WHEEL:-}" ]; then
  wheel="$SD_CUDA_WHEEL"
  echo "not built: checking $wheel (SD_CUDA_WHEEL)"
else
  rm -rf "$wheels"
  started=$SECONDS
  nice -n 15 "$venv/bin/maturin" build --release --strip --features cuda --auditwheel skip \
    --compatibility linux -m sd-py/Cargo.toml -o "$wheels"
  wheel="$(ls "$wheels"/sd_py-*.whl)"
  echo "built in $((SECONDS - started)) s"
fi
echo "wheel $(basename "$wheel"): $(du -h "$wheel" | cut -f1), tag $(unzip -p "$wheel" '*.dist-info/WHEEL' | awk '/^Tag:/ {print $2}')"
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
ext="$("$venv/bin/python" -c 'import importlib.util as u; print(u.find_spec("sd_py._sd_py").origin)')"
echo "the extension links: $(readelf -d "$ext" | awk '/NEEDED/ {gsub(/[][]/, "", $5); print $5}' | tr '\n' ' ')"

echo "== 2. no NVIDIA driver, no CUDA libraries"
env -u LD_LIBRARY_PATH "$venv/bin/python" - <<'EOF'
import importlib.util

import sd_py

if importlib.util.find_spec("ray") and importlib.util.find_spec("fastapi"):
    import sd_py.serve

    print(f"import sd_py, sd_py.serve: ok (sd_py {sd_py.__version__})")
else:
    print(f"import sd_py: ok (sd_py {sd_py.__version__}); sd_py.serve not checked: no Ray Serve here")
try:
    sd_py.StableDiffusionPipeline
except ImportError as e:
    assert "CUDA build" in str(e) and "libc" in str(e), e
    print(f"first use: ImportError: {e}")
else:
    raise SystemExit("FAIL: the CUDA extension loaded without the CUDA libraries")
EOF

echo "== 3. the CUDA libraries and a stub driver (every call: CUDA_ERROR_STUB_LIBRARY)"
# RUST_BACKTRACE=1: candle then attaches a backtrace to its errors, which must not reach the message.
LD_LIBRARY_PATH="$SD_CUDA_VENV/stub-driver:$SD_CUDA_ROOT/lib" RUST_BACKTRACE=1 "$venv/bin/python" - <<'EOF'
import sd_py

model = "tests/fixtures/pipelines/sd2-tiny"
assert sd_py.cuda_is_available(), "the wheel is the CUDA build"
try:
    sd_py.StableDiffusionPipeline.from_pretrained(model, device="cuda")
except RuntimeError as e:
    assert "no usable CUDA device or driver" in str(e) and "\n" not in str(e), e
    print(f'device="cuda": RuntimeError: {e}')
else:
    raise SystemExit('FAIL: device="cuda" worked on a stub driver')
pipe = sd_py.StableDiffusionPipeline.from_pretrained(model, device="cpu")
image = pipe("a red cube", num_inference_steps=2, generator=0).images[0]
print(f'device="cpu": ok, one {image.size[0]}x{image.size[1]} image')
EOF
echo "CUDA WHEEL CHECK PASSED"
