"""The node's shard cache: fetch this rank's shards of one format to local disk.

Every file is downloaded to a temporary name, verified against its checksum (index
files against the manifest, per-sample files against their index, other shard files
against the manifest) and renamed into place. Files already cached and valid are kept;
a corrupted one is fetched again. A file lock per shard lets two agents share one
cache directory. Assignment is deterministic: a split's shards in manifest order form
one sequence of ``n`` samples and rank ``r`` takes ``[r*m, (r+1)*m)``, ``m = n // W``.

Speed (``benchmarks/bench_cache.py``): a file is hashed as it is copied (local stores)
or from the bytes received (object stores), so nothing is read twice; cached files whose
size is already wrong are fetched again without hashing them; the folder is listed once
instead of a failing ``stat`` per missing file. Object stores with an async client
(s3fs) get ``threads`` requests in flight on the client's own event loop, one GET per
small file; other remote file systems use a thread pool.

A full cache disk is a :class:`CacheError` ("cache disk full ..."); a partial download
never takes a file's name, and temporaries left by a killed fill are removed by the
next fill of that shard.
"""

from __future__ import annotations

import errno
import os
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from filelock import FileLock

from node.errors import UsageError
from node.loaders.base import ShardSlice
from shared.fetch import FetchItem, is_tmp_name, unlink_quietly, write_atomic
from shared.manifest import INDEX_FILE, Manifest, ShardEntry
from shared.shards import ShardIndex
from shared.storage import (PathEscapeError, Store, StorageError, check_relative, checksum_bytes,
                            checksum_file, safe_local_path)

VAL_SPLITS = ("val", "validation", "test")

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CacheError(RuntimeError):
    """The cache could not be filled (disk full, checksum keeps failing...)."""


class BadIndex(UsageError):
    """A shard index lists paths outside its shard: the dataset is refused (exit 2)."""


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
    paths: list[str] = field(default_factory=list, repr=False)  # every cached file

    def add(self, other: "CacheStats") -> None:
        self.seconds += other.seconds
        self.bytes_fetched += other.bytes_fetched
        self.bytes_total += other.bytes_total
        self.files_fetched += other.files_fetched
        self.files_total += other.files_total
        self.files_refetched += other.files_refetched
        self.paths.extend(other.paths)


def val_split(manifest: Manifest) -> str | None:
    """The split used for validation: the one prep recorded; in manifests written before
    prep recorded it, ``val``, else ``validation``, else ``test``."""
    if manifest.val_split is not None:
        return manifest.val_split
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


class _Want(NamedTuple):
    """One file of a shard: where it goes, what it must hash to, its size if known."""

    name: str  # normalised, relative to the shard folder
    target: str  # the cached file
    checksum: str
    size: int | None


class ShardCache:
    """A local cache directory for one dataset of one store.

    Args:
        threads: parallel transfers from an object store. Files from a local store are
            copied one by one per shard: each copy is a few system calls, and threads
            creating files in one folder only contend for its lock (measured slower).
        on_file: called with a count as files are checked or fetched (progress bars).
    """

    def __init__(self, store: Store, manifest: Manifest, cache_dir: str | os.PathLike[str],
                 *, threads: int = 8,
                 on_file: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.manifest = manifest
        self.root = Path(cache_dir) / manifest.name
        self.threads = max(1, threads)
        self.on_file = on_file

    def shard_dir(self, entry: ShardEntry) -> Path:
        return safe_local_path(self.root, entry.path)

    def fetch(self, ranges: Sequence[ShardRange]) -> tuple[list[ShardSlice], CacheStats]:
        """Make every shard of ``ranges`` present and valid locally; return read slices.

        Raises:
            CacheError: the cache disk is full, or a file still fails its checksum after
                being fetched twice (the store's copy is bad).
        """
        stats = CacheStats()
        t0 = time.perf_counter()
        slices = []
        for rng in ranges:
            local, index, shard_stats = self._fetch_shard(rng.entry)
            stats.add(shard_stats)
            slices.append(_slice(local, index, rng))
        stats.seconds = time.perf_counter() - t0
        return slices, stats

    # ------------------------------------------------------------------ one shard

    def _fetch_shard(self, entry: ShardEntry) -> tuple[Path, ShardIndex, CacheStats]:
        rel = f"{self.manifest.name}/{entry.path}"
        try:
            local = self.shard_dir(entry)
            local.mkdir(parents=True, exist_ok=True)
            with FileLock(str(local) + ".lock"):
                # Only the lock holder writes into this folder: temporaries found now are
                # leftovers of a killed fill.
                present = _scan(local)
                stats = CacheStats()
                # The index first: it is verified against the manifest and lists the rest.
                index_data = self._ensure_index(entry, local, stats)
                try:
                    index = ShardIndex.parse(index_data)
                    wants = self._wants(entry, local, index)
                except PathEscapeError as exc:
                    raise BadIndex(f"{rel}/{INDEX_FILE}: {exc}; refusing the dataset") from None
                missing = self._check_cached(wants, present, stats)
                if missing:
                    self._fetch_files(rel, missing, stats)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise self._disk_full(rel) from None
            raise
        return local, index, stats

    def _disk_full(self, rel: str) -> CacheError:
        return CacheError(f"cache disk full (no space left on device) while fetching {rel} "
                          f"into {self.root}: free space or use another --cache")

    def _ensure_index(self, entry: ShardEntry, local: Path, stats: CacheStats) -> bytes:
        """The shard's verified index bytes, cached (fetched again when bad or missing)."""
        target = str(local / INDEX_FILE)
        stats.files_total += 1
        stats.paths.append(target)
        try:
            with open(target, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None
        if data is not None:
            if checksum_bytes(data) == entry.index_checksum:
                stats.bytes_total += len(data)
                return data
            stats.files_refetched += 1
        rel = f"{self.manifest.name}/{entry.path}/{INDEX_FILE}"
        for _ in range(2):
            data = self.store.read_bytes(rel)
            if checksum_bytes(data) == entry.index_checksum:
                # Not fsynced: a cached file is checksummed before every use.
                write_atomic(target, data, point="cache-download", durable=False)
                stats.files_fetched += 1
                stats.bytes_fetched += len(data)
                stats.bytes_total += len(data)
                self._progress(1)
                return data
        raise CacheError(f"{rel}: checksum mismatch after two downloads "
                         "(the store's copy does not match its manifest)")

    def _wants(self, entry: ShardEntry, local: Path, index: ShardIndex) -> list[_Want]:
        """Every data file of the shard, paths checked to stay inside its folder."""
        items: list[tuple[str, str, int | None]] = [(f.path, f.checksum, f.bytes)
                                                    for f in entry.files]
        items += index.sample_files()
        parents: dict[str, str] = {"": str(local)}
        out = []
        for name, checksum, size in items:
            norm = check_relative(name)
            head, tail = posixpath.split(norm)
            folder = parents.get(head)
            if folder is None:  # resolved once per folder: no symlink leads outside
                path = safe_local_path(local, head)
                path.mkdir(parents=True, exist_ok=True)
                folder = parents[head] = str(path)
            out.append(_Want(norm, f"{folder}/{tail}", checksum, size))
        return out

    def _check_cached(self, wants: list[_Want], present: set[str],
                      stats: CacheStats) -> list[_Want]:
        """Count the valid cached files; return the missing and bad ones."""
        missing = []
        valid = 0
        for want in wants:
            stats.files_total += 1
            stats.paths.append(want.target)
            if want.name not in present:
                missing.append(want)
                continue
            try:
                size = os.stat(want.target).st_size
            except FileNotFoundError:
                missing.append(want)
                continue
            if (want.size is None or size == want.size) and \
                    checksum_file(want.target) == want.checksum:
                stats.bytes_total += size
                valid += 1
            else:
                stats.files_refetched += 1
                missing.append(want)
        self._progress(valid)
        return missing

    def _fetch_files(self, rel: str, wants: list[_Want], stats: CacheStats) -> None:
        """Download, verify and rename ``wants``; a file that fails its checksum is
        fetched once more before giving up."""
        for _attempt in range(2):
            items = [FetchItem(f"{rel}/{w.name}", w.target, w.checksum, w.size) for w in wants]
            sizes = self.store.fetch_many(items, threads=self.threads, on_file=self._progress)
            bad = []
            for want, size in zip(wants, sizes):
                if size is None:
                    bad.append(want)
                else:
                    stats.files_fetched += 1
                    stats.bytes_fetched += size
                    stats.bytes_total += size
            if not bad:
                return
            wants = bad
        raise CacheError(f"{rel}/{wants[0].name}: checksum mismatch after two downloads "
                         "(the store's copy does not match its manifest)")

    def _progress(self, n: int) -> None:
        if self.on_file and n:
            self.on_file(n)


def _scan(folder: Path) -> set[str]:
    """Files below ``folder`` (relative POSIX paths); deletes the temporaries that a
    killed fill left."""
    present = set()
    for dirpath, _dirs, files in os.walk(folder):
        prefix = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        prefix = "" if prefix == "." else prefix + "/"
        for name in files:
            if is_tmp_name(name):
                unlink_quietly(os.path.join(dirpath, name))
            else:
                present.add(prefix + name)
    return present


def _slice(location: str | Path, index: ShardIndex, rng: ShardRange) -> ShardSlice:
    """The read slice of one shard at ``location`` (a cached folder or a store URL)."""
    return ShardSlice(location=str(location), labels=index.labels, files=index.files,
                      start=rng.start, stop=rng.stop, keys=index.keys)


def remote_slices(store: Store, manifest: Manifest,
                  ranges: Sequence[ShardRange]) -> list[ShardSlice]:
    """Read slices that point at the store itself (``--no-cache``): only indexes are read."""
    out = []
    for rng in ranges:
        rel = f"{manifest.name}/{rng.entry.path}"
        data = store.read_bytes(f"{rel}/{INDEX_FILE}")
        if checksum_bytes(data) != rng.entry.index_checksum:
            raise CacheError(f"{rel}/{INDEX_FILE}: checksum does not match the manifest")
        try:
            index = ShardIndex.parse(data)
        except PathEscapeError as exc:
            raise BadIndex(f"{rel}/{INDEX_FILE}: {exc}; refusing the dataset") from None
        out.append(_slice(store.url_of(rel), index, rng))
    return out


__all__ = ["CacheError", "CacheStats", "ShardCache", "ShardRange", "StorageError", "assign",
           "remote_slices", "val_split"]
