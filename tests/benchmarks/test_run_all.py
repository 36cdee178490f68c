"""``benchmarks/run_all.py`` fails when one benchmark misses its limit or crashes.

The benchmarks here are tiny real scripts run as real subprocesses, in the same way
``run_all.py`` runs the real ones; only their measurements are made up.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

_SCRIPT = """
import sys
sys.path.insert(0, {benchmarks!r})
from limits import Check, finish
sys.exit(finish([Check({name!r}, {ratio}, {limit}, {op!r}, "made up")]))
"""


def _bench(tmp_path: Path, name: str, ratio: float, limit: float, op: str = ">=") -> Path:
    path = tmp_path / f"bench_{name.replace(' ', '_')}.py"
    path.write_text(_SCRIPT.format(benchmarks=str(BENCHMARKS), name=name, ratio=ratio,
                                   limit=limit, op=op))
    return path


def _run_all(*scripts: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(BENCHMARKS / "run_all.py")]
    for script in scripts:
        cmd += ["--script", str(script)]
    return subprocess.run(cmd, text=True, capture_output=True, timeout=120)


def _table(stdout: str) -> list[list[str]]:
    """The rows of the final ratio-vs-limit table, split on runs of two spaces."""
    lines = stdout.split("ratio vs limit:\n", 1)[1].strip().splitlines()
    return [[c.strip() for c in ln.split("  ") if c.strip()] for ln in lines[2:]]


def test_every_limit_met_exits_zero(tmp_path: Path) -> None:
    fast = _bench(tmp_path, "fast enough", 1.30, 1.0)
    small = _bench(tmp_path, "small enough", 0.90, 1.15, "<=")
    proc = _run_all(fast, small)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table(proc.stdout)
    assert [r[1:] for r in rows] == [["fast enough", "1.30", ">= 1", "ok"],
                                     ["small enough", "0.90", "<= 1.15", "ok"]]


def test_one_missed_limit_fails_the_whole_run(tmp_path: Path) -> None:
    good = _bench(tmp_path, "fast enough", 1.30, 1.0)
    slow = _bench(tmp_path, "too slow", 0.40, 0.8)
    direct = subprocess.run([sys.executable, str(slow)], text=True, capture_output=True)
    assert direct.returncode == 1  # the benchmark itself fails, not only the runner
    proc = _run_all(good, slow)
    assert proc.returncode == 1, proc.stdout
    rows = {r[1]: r[2:] for r in _table(proc.stdout)}
    assert rows == {"fast enough": ["1.30", ">= 1", "ok"],
                    "too slow": ["0.40", ">= 0.8", "MISSED"]}


def test_a_crashed_benchmark_fails_and_is_listed(tmp_path: Path) -> None:
    good = _bench(tmp_path, "fast enough", 1.30, 1.0)
    crash = tmp_path / "bench_crash.py"
    crash.write_text("raise SystemExit('no data here')\n")
    proc = _run_all(good, crash)
    assert proc.returncode == 1
    rows = _table(proc.stdout)
    assert rows[-1] == [str(crash), "exit 1, no ratio", "-", "-", "FAILED"]
