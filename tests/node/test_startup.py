"""`node-agent` answers --help, flag errors and `loaders` without importing torch or any
loader's library, and the loader registry describes each loader as its class does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "cupy", "kvikio", "nvidia.dali", "h5py", "zarr", "ray")

PROBE = """
import sys
from node.cli import cli
try:
    cli.main(args={args!r}, prog_name="node-agent")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = [m for m in {heavy!r} if m in sys.modules]
print("EXIT", code, "HEAVY", ",".join(heavy) or "-", file=sys.stderr)
"""


def probe(*args: str) -> tuple[int, str, str]:
    """Run the CLI in a fresh interpreter; its exit code, the heavy modules it imported."""
    code = PROBE.format(args=list(args), heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    _, exit_code, _, heavy = last.split()
    return int(exit_code), heavy, proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [
    ("--help",), ("run", "--help"), ("matrix", "--help"),
    ("run", "--store", "s", "--dataset", "d", "--format", "npy", "--loader", "file",
     "--epochs", "-1"),
    ("run", "--stor", "s"),  # a typo'd flag
    ("loaders",),
])
def test_cli_answers_without_torch(args: tuple[str, ...]) -> None:
    exit_code, heavy, output = probe(*args)
    assert heavy == "-", f"{args} imported {heavy}"
    expected = 0 if args in (("--help",), ("run", "--help"), ("matrix", "--help"),
                             ("loaders",)) else 2
    assert exit_code == expected, output


def test_import_cli_leaves_torch_out() -> None:
    code = "import sys, node.cli; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=REPO, check=True).stdout.strip()
    assert out == "False"


def test_specs_describe_their_classes() -> None:
    from node.loaders import LOADER_SPECS

    for name, spec in LOADER_SPECS.items():
        cls = spec.load()
        assert (cls.name, cls.device_kind, cls.formats_help, cls.summary) == (
            name, spec.device_kind, spec.formats_help, spec.summary), name


def test_quick_check_agrees_with_full_check_on_availability() -> None:
    from node.loaders import LOADER_SPECS

    for name, spec in LOADER_SPECS.items():
        quick, full = spec.quick_reason(), spec.load().unavailable_reason()
        if quick is not None:  # what the quick check refuses, the full check refuses too
            assert full is not None, name
            assert quick.startswith(f"{name}: ") and "\n" not in quick


def test_usage_mistakes_in_run_are_answered_without_torch(tmp_path: Path) -> None:
    for command in ("run", "bench"):
        exit_code, heavy, output = probe(command, "--store", str(tmp_path), "--dataset", "nope",
                                         "--format", "npy", "--loader", "file")
        assert (exit_code, heavy) == (2, "-"), output
        assert f"dataset 'nope' not found in {tmp_path}" in output
