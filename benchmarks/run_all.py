"""Run every benchmark and print their ratio lines together.

    python benchmarks/run_all.py [--quick]

Each benchmark runs in its own process (so one's memory and threads don't affect the
next) and prints lines of the form "... measured vs limit/baseline, ratio R (...)";
this runner repeats those lines at the end as one table.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "numpy_mmap": ["bench_numpy_mmap.py"],
    "convert": ["bench_convert.py"],
    "cache": ["bench_cache.py"],
    "peers": ["peers.py"],
}
QUICK_ARGS = {"peers": ["--samples", "10000"]}
RATIO = re.compile(r"(ratio|speed-up)\s+[0-9.]+", re.I)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller peers benchmark")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run only these (repeatable)")
    args = parser.parse_args()
    lines: list[tuple[str, str]] = []
    failed = []
    for name in args.only or BENCHMARKS:
        cmd = [sys.executable, str(HERE / BENCHMARKS[name][0])]
        if args.quick:
            cmd += QUICK_ARGS.get(name, [])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, text=True, capture_output=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            failed.append(name)
            sys.stdout.write(proc.stderr[-2000:])
        lines += [(name, ln.strip()) for ln in proc.stdout.splitlines() if RATIO.search(ln)]
        print(f"== {name}: {time.perf_counter() - t0:.0f} s, exit {proc.returncode}\n")
    print("summary (measured vs limit/baseline, ratio):")
    for name, line in lines:
        print(f"  {name:>10}: {line}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
