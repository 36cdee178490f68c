"""The node's shard cache: fetch this rank's shards of one format to local disk.

Every file is downloaded to a temporary name, verified against its checksum (index
files against the manifest, per-sample files against their index, other shard files
against the manifest) and renamed into place. Files already cached and valid are kept;
a corrupted one is fetched again. A file lock per shard lets two agents share one
cache directory. Assignment is deterministic: a split's shards in manifest order form
one sequence of ``n`` samples and rank ``r`` takes ``[r*m, (r+1)*m)``, ``m = n // W``.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from node.loaders.base import ShardSlice
from shared.manifest import INDEX_FILE, Manifest, ShardEntry
from shared.shards import read_index
from shared.storage import Store, StorageError, checksum_bytes, checksum_file, safe_local_path

TRAIN_SPLIT = "train"
VAL_SPLITS = ("val", "validation", "test")


class CacheError(RuntimeError):
    """The cache could not be filled (disk full, checksum keeps failing...)."""


@dataclass(frozen=True)
class ShardRange:
    """A rank's part of one shard: samples ``[start, stop)``."""

    entry: ShardEntry
    start: int
    stop: int


@dataclass
class CacheStats:
    """Figures of one cache fill, for the run record."""

    seconds: float = 0.0
    bytes_fetched: int = 0
    bytes_total: int = 0
    files_fetched: int = 0
    files_total: int = 0
    files_refetched: int = 0  # cached but failed their checksum
    paths: list[Path] = field(default_factory=list)

    def add(self, other: "CacheStats") -> None:
        self.seconds += other.seconds
        self.bytes_fetched += other.bytes_fetched
        self.bytes_total += other.bytes_total
        self.files_fetched += other.files_fetched
        self.files_total += other.files_total
        self.files_refetched += other.files_refetched
        self.paths.extend(other.paths)


def val_split(manifest: Manifest) -> str | None:
    """The split used for validation: ``val``, else ``validation``, else ``test``."""
    for name in VAL_SPLITS:
        if name in manifest.split_names:
            return name
    return None


def assign(manifest: Manifest, format_id: str, split: str, rank: int = 0,
           world_size: int = 1) -> list[ShardRange]:
    """The shard ranges of ``split`` that rank ``rank`` of ``world_size`` reads.

    Every rank gets ``n // world_size`` samples; the remainder is left out.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    shards = sorted(manifest.format(format_id).split_shards(split), key=lambda s: s.index)
    n = sum(s.samples for s in shards)
    per_rank = n // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    out, offset = [], 0
    for shard in shards:
        start, stop = max(lo, offset), min(hi, offset + shard.samples)
        if start < stop:
            out.append(ShardRange(shard, start - offset, stop - offset))
        offset += shard.samples
    return out


class ShardCache:
    """A local cache directory for one dataset of one store."""

    def __init__(self, store: Store, manifest: Manifest, cache_dir: str | os.PathLike[str],
                 *, threads: int = 8,
                 on_file: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.manifest = manifest
        self.root = Path(cache_dir) / manifest.name
        self.threads = threads
        self.on_file = on_file

    def shard_dir(self, entry: ShardEntry) -> Path:
        return safe_local_path(self.root, entry.path)

    def fetch(self, ranges: Sequence[ShardRange]) -> tuple[list[ShardSlice], CacheStats]:
        """Make every shard of ``ranges`` present and valid locally; return read slices."""
        stats = CacheStats()
        t0 = time.perf_counter()
        slices = []
        with ThreadPoolExecutor(self.threads, thread_name_prefix="cache") as pool:
            for rng in ranges:
                local, shard_stats = self._fetch_shard(rng.entry, pool)
                stats.add(shard_stats)
                slices.append(_slice(local, rng))
        stats.seconds = time.perf_counter() - t0
        return slices, stats

    def _fetch_shard(self, entry: ShardEntry,
                     pool: ThreadPoolExecutor) -> tuple[Path, CacheStats]:
        local = self.shard_dir(entry)
        local.mkdir(parents=True, exist_ok=True)
        stats = CacheStats()
        with FileLock(str(local) + ".lock"):
            # The index first: it is verified against the manifest and lists the rest.
            self._ensure(entry.path, INDEX_FILE, entry.index_checksum, stats)
            index = read_index(local / INDEX_FILE)
            wanted = [(f.path, f.checksum) for f in entry.files]
            if "file" in index.column_names:
                wanted += list(zip(index.column("file").to_pylist(),
                                   index.column("checksum").to_pylist()))
            results = pool.map(lambda fc: self._ensure_counted(entry.path, fc[0], fc[1]),
                               wanted)
            for r in results:
                stats.add(r)
        return local, stats

    def _ensure_counted(self, shard_rel: str, name: str, checksum: str) -> CacheStats:
        stats = CacheStats()
        self._ensure(shard_rel, name, checksum, stats)
        if self.on_file:
            self.on_file(1)
        return stats

    def _ensure(self, shard_rel: str, name: str, checksum: str, stats: CacheStats) -> None:
        """Keep a valid cached copy of ``shard_rel/name`` or fetch and verify a new one."""
        target = safe_local_path(self.root / shard_rel, name)
        stats.files_total += 1
        stats.paths.append(target)
        if target.exists():
            if checksum_file(target) == checksum:
                stats.bytes_total += target.stat().st_size
                return
            stats.files_refetched += 1
        rel = f"{self.manifest.name}/{shard_rel}/{name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
            try:
                self.store.get_file(rel, tmp)
                if checksum_file(tmp) == checksum:
                    size = tmp.stat().st_size
                    os.replace(tmp, target)
                    stats.files_fetched += 1
                    stats.bytes_fetched += size
                    stats.bytes_total += size
                    return
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise CacheError(f"cache disk full while fetching {rel} into "
                                     f"{self.root}: free space or use another --cache") from None
                raise
            finally:
                _unlink_quietly(tmp)
        raise CacheError(f"{rel}: checksum mismatch after two downloads "
                         "(the store's copy does not match its manifest)")


def _slice(local: Path, rng: ShardRange) -> ShardSlice:
    index = read_index(local / INDEX_FILE)
    files = tuple(index.column("file").to_pylist()) if "file" in index.column_names else None
    return ShardSlice(location=str(local),
                      labels=np.asarray(index.column("label").to_numpy(), dtype=np.int64),
                      files=files, start=rng.start, stop=rng.stop,
                      keys=tuple(index.column("key").to_pylist()))


def remote_slices(store: Store, manifest: Manifest,
                  ranges: Sequence[ShardRange]) -> list[ShardSlice]:
    """Read slices that point at the store itself (``--no-cache``): only indexes are read."""
    out = []
    for rng in ranges:
        rel = f"{manifest.name}/{rng.entry.path}"
        data = store.read_bytes(f"{rel}/{INDEX_FILE}")
        if checksum_bytes(data) != rng.entry.index_checksum:
            raise CacheError(f"{rel}/{INDEX_FILE}: checksum does not match the manifest")
        index = read_index(data)
        files = tuple(index.column("file").to_pylist()) if "file" in index.column_names else None
        out.append(ShardSlice(location=store.url_of(rel),
                              labels=np.asarray(index.column("label").to_numpy(),
                                                dtype=np.int64),
                              files=files, start=rng.start, stop=rng.stop,
                              keys=tuple(index.column("key").to_pylist())))
    return out


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


__all__ = ["CacheError", "CacheStats", "ShardCache", "ShardRange", "StorageError", "assign",
           "remote_slices", "val_split"]
