"""scripts/gpu-check.sh --plan: every step's timeout fits the limit, the summary always has time."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"


def plan(limit: int) -> list[tuple[str, int, int, int]]:
    out = subprocess.run(["bash", str(SCRIPT), "--plan", "--limit-s", str(limit)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    steps = []
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] != "plan" or parts[1] == "total":
            continue
        fields = dict(p.split("=") for p in parts[2:])
        steps.append((parts[1], int(fields["start"]), int(fields["timeout"]), int(fields["end"])))
    return steps


@pytest.mark.parametrize("limit", [30, 60, 150, 300, 540, 600])
def test_plan_never_exceeds_the_limit(limit: int) -> None:
    steps = plan(limit)
    assert steps[-1][0] == "summary"  # the summary is always planned, last
    cursor = 0
    for name, start, timeout, end in steps:
        assert start == cursor and end == start + timeout and timeout > 0, name
        cursor = end
    assert cursor <= limit


def test_plan_runs_every_step_given_time() -> None:
    names = [name for name, *_ in plan(100_000)]
    assert names[:7] == ["wheels", "machine", "datagen-cifar", "datagen-photos",
                         "convert-cifar", "convert-photos", "pytest-gpu-loaders"]
    assert sum(n.startswith("run-") for n in names) == 12
    assert names[-2:] == ["pytest-gpu-all", "summary"]


def test_bad_limit_is_one_line() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--plan", "--limit-s", "soon"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
