"""Cache fill against a bare fsspec copy of the same files.

Builds a dataset of one ``png`` shard (20,000 small 32x32 images, one file each) and one
``npy`` shard (written through ``shared.shards.write_shard``, as prep would) in a
temporary folder, then times, interleaved and best of several rounds:

* ``ShardCache.fetch`` of both shards into an empty cache directory (download to a
  temporary name, checksum against the index/manifest, rename), and
* a bare ``fs.get(list_of_files, list_of_destinations)`` of the same files with the same
  concurrency (s3fs's ``batch_size``; the local file system copies one by one),

first from the local store, then from a loopback S3 server (``rclone serve s3``, as the
tests use) serving the same folder. Prints one line per store:

    check: cache fill vs bare fsspec copy [local] | ratio R | limit >= 0.8 | ok | X vs Y MB/s

and exits 1 when a ratio misses its limit.

    python benchmarks/bench_cache.py [--files 20000] [--rounds 3] [--s3-rounds N] [--no-s3]
                                     [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from limits import Check, finish  # noqa: E402 - benchmarks/ is the script's folder
from node.cache import ShardCache, assign  # noqa: E402
from shared.formats import get_format  # noqa: E402
from shared.manifest import INDEX_FILE, FormatEntry, Manifest, SplitEntry  # noqa: E402
from shared.shards import read_index, write_shard  # noqa: E402
from shared.storage import Store  # noqa: E402

LIMIT = 0.8
NAME = "bench"


def build_dataset(root: Path, files: int, npy_samples: int, seed: int) -> Manifest:
    """Write a png shard of ``files`` images and an npy shard; commit a manifest."""
    store = Store.open(str(root))
    dataset = store.sub(NAME)
    rng = np.random.default_rng(seed)
    entries = []
    for fid, n in (("png", files), ("npy", npy_samples)):
        fmt = get_format(fid)
        # Smooth images (as real photos compress): a few KB per PNG.
        base = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        images = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)
        labels = rng.integers(0, 10, n)
        shard = write_shard(dataset, fmt, "train", 0, [f"s{i:06d}" for i in range(n)],
                            images, labels)
        entries.append(FormatEntry(id=fid, kind=fmt.kind.value, params=dict(fmt.params),
                                   shards=(shard,), total_bytes=shard.bytes,
                                   conversion_time_s=0.0))
    manifest = Manifest(name=NAME, source_kind="synthetic", source_url="synthetic",
                        height=32, width=32, channels=3, dtype="uint8", resize="native 32x32",
                        class_names=tuple(str(i) for i in range(10)),
                        splits=(SplitEntry("train", files),), seed=seed,
                        shard_samples=max(files, npy_samples), formats=tuple(entries))
    manifest.save(store)
    return manifest


def shard_files(store_root: Path, manifest: Manifest) -> list[str]:
    """Every file of the dataset's shards, relative to the store root."""
    out = []
    for fmt in manifest.formats:
        for shard in fmt.shards:
            folder = f"{NAME}/{shard.path}"
            out.append(f"{folder}/{INDEX_FILE}")
            out += [f"{folder}/{f.path}" for f in shard.files]
            index = read_index(store_root / folder / INDEX_FILE)
            if "file" in index.column_names:
                out += [f"{folder}/{name}" for name in index.column("file").to_pylist()]
    return out


def cache_fill(store: Store, manifest: Manifest, dest: Path, concurrency: int) -> int:
    cache = ShardCache(store, manifest, dest, threads=concurrency)
    total = 0
    for fmt in manifest.formats:
        _, stats = cache.fetch(assign(manifest, fmt.id, "train"))
        assert stats.files_fetched == stats.files_total, (stats.files_fetched,
                                                           stats.files_total)
        total += stats.bytes_fetched
    return total


def bare_copy(store: Store, rels: list[str], dest: Path, concurrency: int) -> int:
    local = [str(dest / r) for r in rels]
    for folder in sorted({os.path.dirname(p) for p in local}):
        os.makedirs(folder, exist_ok=True)
    store.get_files(rels, local, batch_size=concurrency)
    return sum(os.path.getsize(p) for p in local)


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def compare(label: str, store: Store, manifest: Manifest, rels: list[str], work: Path,
            rounds: int, concurrency: int) -> Check:
    best_cache = best_bare = float("inf")
    size = 0
    for r in range(rounds):
        for kind in (("cache", "bare") if r % 2 == 0 else ("bare", "cache")):
            dest = work / f"{label}-{kind}-{r}"
            os.sync()  # start each from a clean page cache: no write-back of the last copy
            t0 = time.perf_counter()
            if kind == "cache":
                size = cache_fill(store, manifest, dest, concurrency)
                best_cache = min(best_cache, time.perf_counter() - t0)
            else:
                bare_size = bare_copy(store, rels, dest, concurrency)
                best_bare = min(best_bare, time.perf_counter() - t0)
            drop(dest)
    assert size == bare_size, (size, bare_size)
    mb = size / 1e6
    print(f"[{label}] {len(rels):,} files, {mb:.1f} MB; cache {best_cache:.2f} s, "
          f"bare {best_bare:.2f} s", flush=True)
    return Check(f"cache fill vs bare fsspec copy [{label}]", best_bare / best_cache, LIMIT,
                 ">=", f"{mb / best_cache:.1f} MB/s vs {mb / best_bare:.1f} MB/s")


def start_s3(root: Path):  # noqa: ANN201 - the tests' S3Server
    spec = importlib.util.spec_from_file_location("_bench_s3", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.start_s3_server(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000, help="png files in the shard")
    parser.add_argument("--npy-samples", type=int, default=20_000,
                        help="samples in the npy shard (32x32x3 each)")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="parallel transfers of both (cache threads, s3fs batch_size)")
    parser.add_argument("--s3-rounds", type=int, default=None,
                        help="rounds against the S3 server (default: --rounds)")
    parser.add_argument("--no-s3", action="store_true", help="local store only")
    parser.add_argument("--dir", default=None,
                        help="where the store and the copies go (default: the temp folder; "
                             "/dev/shm takes the disk's noise out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    checks = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        store_root = tmp_path / "s3" / "bucket"
        t0 = time.perf_counter()
        manifest = build_dataset(store_root, args.files, args.npy_samples, args.seed)
        rels = shard_files(store_root, manifest)
        print(f"built {len(rels):,} files in {time.perf_counter() - t0:.1f} s")
        work = tmp_path / "work"
        checks.append(compare("local", Store.open(str(store_root)), manifest, rels, work,
                              args.rounds, args.concurrency))
        if not args.no_s3:
            server = start_s3(tmp_path / "s3")
            try:
                store = Store.open("s3://bucket", server.storage_options)
                checks.append(compare("s3", store, manifest, rels, work,
                                      args.s3_rounds or args.rounds, args.concurrency))
            finally:
                server.stop()
    return finish(checks)


if __name__ == "__main__":
    sys.exit(main())
