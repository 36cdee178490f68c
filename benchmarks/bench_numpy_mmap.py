"""numpy_mmap against a bare NumPy gather of the same batches from the same files.

Builds a CIFAR-10-sized ``npy`` dataset (random 32x32x3 images, sharded as prep would,
written through ``shared.shards.write_shard``) in a temporary folder, then times two
epochs of each, interleaved, best of several rounds. The bare gather is what a hand
written loop would do per batch: sort the batch, ``np.take`` each shard's part from its
memory map. Small images make per-batch overhead dominate, which is what this checks.

    python benchmarks/bench_numpy_mmap.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limits import Check, finish  # noqa: E402 - benchmarks/ is the script's folder
from node.loaders.base import LoaderConfig, ShardSlice, epoch_batches  # noqa: E402
from node.loaders.numpy_mmap import NumpyMmapLoader  # noqa: E402
from shared.formats import get_format  # noqa: E402
from shared.shards import read_index, shard_path, write_shard  # noqa: E402
from shared.storage import Store  # noqa: E402

LIMIT = 0.5


def build_dataset(root: Path, samples: int, shard_samples: int, seed: int) -> list[ShardSlice]:
    """Write ``samples`` random 32x32 RGB images as ``npy`` shards; return their slices."""
    fmt = get_format("npy")
    store = Store.open(str(root))
    rng = np.random.default_rng(seed)
    shards = []
    for index, start in enumerate(range(0, samples, shard_samples)):
        n = min(shard_samples, samples - start)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        keys = [f"sample-{start + i}" for i in range(n)]
        write_shard(store, fmt, "train", index, keys, images, labels)
        folder = root / shard_path(fmt.id, "train", index)
        table = read_index(folder / "index.parquet")
        shards.append(ShardSlice(location=str(folder),
                                 labels=table.column("label").to_numpy(),
                                 files=None, start=0, stop=n))
    return shards


def bare_epoch(arrays: list[np.ndarray], bounds: np.ndarray, batches: list[np.ndarray]) -> int:
    """The reference: per batch, sort and ``np.take`` each shard's part."""
    count = 0
    for batch in batches:
        positions = np.sort(batch)
        cuts = np.searchsorted(positions, bounds)
        for k, array in enumerate(arrays):
            if cuts[k + 1] > cuts[k]:
                np.take(array, positions[cuts[k]:cuts[k + 1]] - bounds[k], axis=0)
        count += len(batch)
    return count


def loader_epoch(loader: NumpyMmapLoader, epoch: int) -> int:
    return sum(len(batch.positions) for batch in loader.epoch(epoch))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--shard-samples", type=int, default=21_845,
                        help="samples per shard (default: ~64 MiB of 32x32x3, as prep)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="the loader's prefetch threads")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-numpy-mmap-") as tmp:
        shards = build_dataset(Path(tmp), args.samples, args.shard_samples, args.seed)
        config = LoaderConfig(fmt=get_format("npy"), shards=tuple(shards),
                              batch_size=args.batch_size, workers=args.workers,
                              seed=args.seed, device=torch.device("cpu"),
                              image_shape=(32, 32, 3))
        loader = NumpyMmapLoader(config)
        arrays = [np.asarray(np.load(Path(s.location) / "images.npy", mmap_mode="r",
                                     allow_pickle=False)) for s in shards]
        bounds = np.cumsum([0] + [len(s) for s in shards])
        plans = {e: epoch_batches(args.samples, args.batch_size, args.seed, e)
                 for e in range(args.epochs)}

        def run_bare() -> int:
            return sum(bare_epoch(arrays, bounds, plans[e]) for e in range(args.epochs))

        def run_loader() -> int:
            return sum(loader_epoch(loader, e) for e in range(args.epochs))

        run_bare()  # page the files in: both sides then read from memory
        run_loader()
        best = {"bare": float("inf"), "loader": float("inf")}
        for _ in range(args.rounds):
            for name, run in (("bare", run_bare), ("loader", run_loader)):
                t0 = time.perf_counter()
                count = run()
                best[name] = min(best[name], time.perf_counter() - t0)
                assert count == args.samples * args.epochs, (name, count)
        loader.close()

    total = args.samples * args.epochs
    bare_rate, loader_rate = total / best["bare"], total / best["loader"]
    return finish([Check("numpy_mmap vs bare numpy gather", loader_rate / bare_rate, LIMIT,
                         ">=", f"{loader_rate:,.0f} img/s vs {bare_rate:,.0f} img/s")])


if __name__ == "__main__":
    sys.exit(main())
