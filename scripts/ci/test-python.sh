#!/usr/bin/env bash
# Python side of the test suite (run by scripts/test.sh after `cargo test --workspace`):
# builds the sd_py wheel with maturin, installs it with Ray Serve, Gradio and Playwright into a
# venv, and runs sd-py/tests (API, parity with diffusers and sd-cli, threads, the blueprint app
# under a real local Ray Serve, the packaged Serve app, the deploy files, the Gradio UI in headless
# Chromium, the type stubs against sd-py/scripts/gen_stubs.py and mypy). Needs Python >= 3.9 with
# venv and pip; installs Debian's chromium if it is missing.
#
# Environment: SD_PY_VENV (default .venv-ci in the repo), SD_PY_PROFILE (cargo profile of the
# wheel; default dev, which reuses the dependencies `cargo test` built: the workspace compiles
# them with opt-level 3 even in dev), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"

venv="${SD_PY_VENV:-$repo/.venv-ci}"
profile="${SD_PY_PROFILE:-dev}"
python="${PYTHON:-python3}"
started=$(date +%s)
step() { echo "== test-python: $* ($(( $(date +%s) - started ))s)"; }

step "venv $venv"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check -r sd-py/requirements-test.txt
# Found in the venv's lib/ by sd_py at import. The same pin as scripts/test.sh.
"$py" -m pip install -q --disable-pip-version-check --no-deps "${SD_MKL_WHEEL:-mkl==2026.2.0}"

if ! command -v chromium >/dev/null 2>&1; then
  step "installing Debian's chromium (for the Gradio UI test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi

step "building the sd_py wheel (cargo profile $profile)"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/maturin" build --locked -m sd-py/Cargo.toml --profile "$profile" --out "$wheels" --interpreter "$py"
"$py" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheels"/sd_py-*.whl

step "pytest sd-py/tests"
export RAY_USAGE_STATS_ENABLED=0 GRADIO_ANALYTICS_ENABLED=False
# Run from the tests folder against the installed wheel (not the source tree).
set +e
(cd sd-py && "$py" -m pytest tests -p no:cacheprovider -ra ${PYTEST_ARGS:-})
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test-python: pytest collected no tests" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "test-python: pytest failed (exit $rc)" >&2
  exit "$rc"
fi
step "done"
