"""The committed type stubs (`py_src/sd_py/*.pyi`) are what `sd-py/scripts/gen_stubs.py` writes
from the installed module, and declare every scheduler class to type checkers."""

import ast
import difflib
import importlib.util
import subprocess
import sys

import pytest

import sd_py
from conftest import REPO

GENERATOR = REPO / "sd-py" / "scripts" / "gen_stubs.py"
PACKAGE = REPO / "sd-py" / "py_src" / "sd_py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_stubs", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh_stubs(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubs")
    _generator().main(["--out", str(out)])
    return {path.name: path.read_text(encoding="utf-8") for path in out.iterdir()}


def test_committed_stubs_are_current(fresh_stubs):
    assert set(fresh_stubs) == {"__init__.pyi", "_sd_py.pyi"}
    stale = []
    for name, fresh in sorted(fresh_stubs.items()):
        committed = (PACKAGE / name).read_text(encoding="utf-8")
        if committed != fresh:
            diff = difflib.unified_diff(
                committed.splitlines(keepends=True), fresh.splitlines(keepends=True), f"committed/{name}", f"generated/{name}"
            )
            stale.append("".join(diff))
    if stale:
        pytest.fail("stale type stubs; regenerate them with `python sd-py/scripts/gen_stubs.py`:\n" + "\n".join(stale))


def test_stubs_declare_every_public_name(fresh_stubs):
    tree = ast.parse(fresh_stubs["__init__.pyi"])
    declared = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    declared |= {alias.asname for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert set(sd_py.scheduler_classes()) <= declared
    assert set(sd_py.__all__) <= declared
    native = ast.parse(fresh_stubs["_sd_py.pyi"])
    native_names = {getattr(node, "name", None) for node in native.body}
    assert {"_Pipeline", "GenerateResult", "read_model_file", "scheduler_classes"} <= native_names


def test_mypy_sees_every_scheduler_class(tmp_path):
    """Type-checks code using every scheduler class against the installed package: no error but
    the one for a class that does not exist."""
    lines = ["import sd_py", "from sd_py import SchedulerMixin, StableDiffusionPipeline"]
    lines += [f"s{i}: SchedulerMixin = sd_py.{name}.from_config({{}})" for i, name in enumerate(sd_py.scheduler_classes())]
    lines += ["pipe = StableDiffusionPipeline.from_pretrained('model', scheduler=s0)", "size: int = pipe.vae_scale_factor"]
    lines += ["sd_py.NoSuchScheduler"]
    (tmp_path / "use.py").write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert errors == [f'use.py:{len(lines)}: error: Module has no attribute "NoSuchScheduler"  [attr-defined]'], out.stdout + out.stderr
