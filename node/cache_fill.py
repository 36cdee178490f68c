"""A rank's cache fill: which shard ranges this rank reads of one format (its part of
the train split and, on rank 0, the validation split), fetched into the cache by
:class:`node.cache.ShardCache` (or, with ``--no-cache``, pointed at the store), and the
body of ``node-agent cache``."""

from __future__ import annotations

import time
from dataclasses import dataclass

from node.cache import (CacheStats, ShardCache, ShardRange, assign, format_entry, remote_slices,
                        val_split)
from node.checks import open_dataset
from node.config import resolve_rank
from node.errors import UsageError
from node.loaders.base import ShardSlice
from node.progress import transfer_bar
from shared.manifest import Manifest
from shared.storage import Store


@dataclass(frozen=True)
class RankShards:
    """The shard ranges one rank reads of one format: its part of the train split and,
    on rank 0, the whole validation split (``val_split`` None when it reads none)."""

    format_id: str
    rank: int
    world_size: int
    train: tuple[ShardRange, ...]
    val: tuple[ShardRange, ...]
    val_split: str | None


def rank_shards(manifest: Manifest, format_id: str, rank: int, world_size: int, *,
                with_val: bool | None = None) -> RankShards:
    """What rank ``rank`` of ``world_size`` reads (the val split by default on rank 0).

    Raises:
        UsageError: the dataset has no train split.
    """
    if "train" not in manifest.split_names:
        raise UsageError(f"dataset {manifest.name!r} has no train split "
                         f"(splits: {', '.join(manifest.split_names)})")
    val_name = val_split(manifest)
    with_val = (rank == 0) if with_val is None else with_val
    train = assign(manifest, format_id, "train", rank, world_size)
    val = assign(manifest, format_id, val_name) if (val_name and with_val) else []
    return RankShards(format_id, rank, world_size, tuple(train), tuple(val),
                      val_name if val else None)


@dataclass
class CacheFill:
    """The rank's read slices after caching, and the figures of the fill."""

    train: list[ShardSlice]
    val: list[ShardSlice]
    val_split: str | None
    stats: CacheStats


def fill_cache(store: Store, manifest: Manifest, shards: RankShards, cache_dir: str, *,
               no_cache: bool = False, progress: bool = False) -> CacheFill:
    """Fetch the rank's shards to ``cache_dir``; a live bar on a terminal with ``progress``.

    With ``no_cache`` nothing is fetched: the slices point at the store itself and only
    the indexes are read.
    """
    if no_cache:
        t0 = time.perf_counter()
        train = remote_slices(store, manifest, shards.train)
        val = remote_slices(store, manifest, shards.val)
        return CacheFill(train, val, shards.val_split,
                         CacheStats(seconds=time.perf_counter() - t0))
    total_files = _count_files(manifest, shards)
    bar, on_file = transfer_bar(progress, total_files,
                                f"cache {manifest.name}/{shards.format_id}")
    cache = ShardCache(store, manifest, cache_dir, on_file=on_file)
    try:
        train, stats = cache.fetch(shards.train)
        val, val_stats = cache.fetch(shards.val)
    finally:
        if bar is not None:
            bar.stop()
    stats.add(val_stats)
    return CacheFill(train, val, shards.val_split, stats)


def _count_files(manifest: Manifest, shards: RankShards) -> int:
    per_sample = manifest.format(shards.format_id).kind == "files"
    return sum((r.entry.samples if per_sample else 0) + len(r.entry.files)
               for r in shards.train + shards.val)


def cache_for_rank(*, store: str, dataset: str, format_id: str, cache: str,
                   rank: int | None, world_size: int | None,
                   storage_options: str | None) -> None:
    """``node-agent cache``: fill the cache for this rank and print what was fetched."""
    rank, world_size = resolve_rank(rank, world_size)
    st, manifest = open_dataset(store, dataset, storage_options)
    format_entry(manifest, format_id)
    shards = rank_shards(manifest, format_id, rank, world_size)
    filled = fill_cache(st, manifest, shards, cache, progress=True)
    s = filled.stats
    val = f", {sum(len(x) for x in filled.val)} {filled.val_split} samples" if filled.val \
        else ""
    print(f"cached {dataset}/{format_id} rank {rank}/{world_size}: "
          f"{sum(len(x) for x in filled.train)} train samples{val}; "
          f"{s.files_total} files, {s.bytes_total:,} bytes, fetched {s.files_fetched} files "
          f"({s.bytes_fetched:,} bytes, {s.files_refetched} re-fetched after a bad checksum) "
          f"in {s.seconds:.2f} s")
