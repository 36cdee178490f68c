"""Run every benchmark and print one table of ratio against limit.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--script PATH ...]

Each benchmark runs in its own process (so one's memory and threads don't affect the
next) and prints ``check:`` lines (``limits.py``); this runner collects them into one
table and exits 1 when any benchmark exits non-zero or any ratio misses its limit.
``--script`` runs other benchmark scripts in the same way (instead of the built-in ones).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from limits import Check, parse, table

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "numpy_mmap": "bench_numpy_mmap.py",
    "convert": "bench_convert.py",
    "cache": "bench_cache.py",
    "peers": "peers.py",
    "packed": "bench_packed.py",
    "scale": "bench_scale.py",
}
# Smaller runs of the same measurements, for a first look on a shared machine.
QUICK_ARGS = {
    "numpy_mmap": ["--samples", "10000", "--rounds", "2"],
    "convert": ["--rounds", "1", "--ray-rounds", "1", "--images", "32", "--ray-images", "120"],
    "cache": ["--files", "2000", "--npy-samples", "2000", "--rounds", "2"],
    "peers": ["--samples", "10000"],
    "packed": ["--samples", "10000", "--samples-512", "200", "--rounds", "2"],
    "scale": ["--images", "40", "--counts", "10,20"],
}


def run_one(name: str, cmd: Sequence[str]) -> tuple[int, list[Check]]:
    """Run one benchmark, echo its output; its exit status and its checks."""
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), text=True, capture_output=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-2000:])
    print(f"== {name}: {time.perf_counter() - t0:.0f} s, exit {proc.returncode}\n", flush=True)
    return proc.returncode, parse(proc.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs of each benchmark")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run only these (repeatable)")
    parser.add_argument("--script", action="append", type=Path, metavar="PATH",
                        help="run this benchmark script instead (repeatable)")
    args = parser.parse_args(argv)
    if args.script:
        jobs = {str(p): [sys.executable, str(p)] for p in args.script}
    else:
        jobs = {name: [sys.executable, str(HERE / BENCHMARKS[name]),
                       *(QUICK_ARGS[name] if args.quick else [])]
                for name in args.only or BENCHMARKS}
    rows: list[tuple[str, Check | None, str]] = []
    failed = False
    for name, cmd in jobs.items():
        code, checks = run_one(name, cmd)
        rows += [(name, c, "") for c in checks]
        if code != 0 and all(c.ok for c in checks):  # a crash, not a missed limit
            rows.append((name, None, f"exit {code}" + ("" if checks else ", no ratio")))
        failed = failed or code != 0 or not checks or not all(c.ok for c in checks)
    print("ratio vs limit:")
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
