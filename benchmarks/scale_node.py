"""The node side of benchmarks/bench_scale.py: ``node-agent cache`` and ``bench`` at 512 px.

For each (loader, format) pair: the cache fill's time and bytes, then ``node-agent
bench`` (loader alone, CPU) at each batch size with the fewest workers and at each
worker count with the smallest batch, reading each
run's ``throughput_img_s`` and ``peak_ram_bytes`` from the results store, printed next
to the loader's host staging bound (node/loaders/staging.py) and with how the peak grows
from the smallest to the largest batch and from none to the most workers.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = (("file", "jpeg-q95"), ("file", "webp-q90"), ("numpy_mmap", "npy"),
         ("hdf5", "hdf5"), ("zarr", "zarr"), ("file", "npy-files"))
MIB = 1 << 20


def node_agent(*args: str, timeout: float = 600) -> float:
    """Run ``node-agent ARGS`` (exit 0 required); its wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "node.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"node-agent {' '.join(args[:1])} failed ({proc.returncode}): "
                         f"{proc.stderr.strip().splitlines()[-1:] or proc.stdout[-500:]}")
    return time.perf_counter() - t0


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def staging_mib(loader: str, batch: int, workers: int, size: int) -> float:
    from node.loaders.staging import batch_bytes, mmap_bound, worker_bound

    bound = mmap_bound if loader == "numpy_mmap" else worker_bound
    return bound(batch_bytes(batch, (size, size, 3)), workers, pinned=False).total_bytes / MIB


def bench_pair(store: Path, cache: Path, results: Path, loader: str, fmt: str,
               grid: list[tuple[int, int]]) -> None:
    common = ["--store", str(store), "--dataset", "photos", "--format", fmt,
              "--cache", str(cache)]
    fill_s = node_agent("cache", *common)
    cached = folder_bytes(cache)
    for batch, workers in grid:
        node_agent("bench", *common, "--loader", loader, "--results", str(results),
                   "--epochs", "2", "--batch-size", str(batch), "--workers", str(workers),
                   "--device", "cpu")
    print(f"cache {loader}/{fmt}: {fill_s:.1f} s (node-agent cache, process start included), "
          f"{cached / MIB:.0f} MiB", flush=True)


def bench_node(store: Path, work: Path, args: argparse.Namespace) -> None:
    """Every pair over the grid; prints one table."""
    import pandas as pd

    batches = [int(b) for b in args.node_batches.split(",")]
    workers = [int(w) for w in args.node_workers.split(",")]
    # growth with the batch at the fewest workers, with workers at the smallest batch
    grid = sorted({(b, min(workers)) for b in batches} | {(min(batches), w) for w in workers})
    results = work / "node-results"
    shutil.rmtree(results, ignore_errors=True)
    for loader, fmt in PAIRS:
        cache = work / f"cache-{fmt}"
        shutil.rmtree(cache, ignore_errors=True)
        bench_pair(store, cache, results, loader, fmt, grid)
        shutil.rmtree(cache, ignore_errors=True)
    runs = pd.read_parquet(results / "runs")
    print(f"\n{'loader/format':<22}{'batch':>6}{'workers':>8}{'img/s':>9}{'peak RAM MiB':>14}"
          f"{'staging bound MiB':>19}")
    for (loader, fmt), group in runs.groupby(["loader", "format"], sort=False):
        for r in group.sort_values(["batch_size", "workers"]).itertuples():
            print(f"{loader + '/' + fmt:<22}{r.batch_size:>6}{r.workers:>8}"
                  f"{r.throughput_img_s:>9.1f}{r.peak_ram_bytes / MIB:>14.0f}"
                  f"{staging_mib(loader, r.batch_size, r.workers, args.size):>19.0f}")
        by = group.set_index(["batch_size", "workers"])["peak_ram_bytes"]
        w0 = min(workers)
        grow_b = by[(max(batches), w0)] / by[(min(batches), w0)]
        grow_w = by[(min(batches), max(workers))] / by[(min(batches), w0)]
        print(f"{'':<22}peak RAM x{grow_b:.2f} from batch {min(batches)} to {max(batches)}, "
              f"x{grow_w:.2f} from {w0} to {max(workers)} workers")
