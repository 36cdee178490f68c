"""One measured run: resolve, cache, build the loader, train (or bench), record.

``run`` writes one ``runs`` row and one ``epochs`` row per epoch for every run that
got as far as a loader, failed runs included (``status = "failed"`` and the error).
Usage errors (unknown names, a pair that does not fit, a loader that cannot run here,
a missing dataset) raise :class:`UsageError` before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from node.cache import CacheStats, ShardCache, assign, remote_slices, val_split
from node.commands import open_dataset  # torch-free, so the CLI can check first
from node.errors import UsageError
from node.loaders.base import LoaderConfig, ShardSlice
from shared.formats import Format, UnknownFormat, get_format
from shared.manifest import Manifest
from shared.storage import StorageError, Store


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is built from; recorded as JSON in the ``config`` column."""

    store: str
    dataset: str
    format_id: str
    loader: str
    cache: str = "./.cache/formatlab"
    results: str = "./results"
    epochs: int = 3
    batch_size: int = 256
    workers: int = 2
    model: str | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    device: str = "auto"
    seed: int = 0
    max_steps: int | None = None
    cold: bool = False
    rank: int | None = None
    world_size: int | None = None
    no_cache: bool = False
    storage_options: str | None = field(default=None, repr=False)
    mode: str = "train"  # "train" or "bench"
    emulate_step_ms: float | None = None
    repeat: int = 0

    @classmethod
    def from_cli(cls, **kwargs: Any) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names})

    def public(self) -> dict[str, Any]:
        """The config without storage options (they may hold credentials)."""
        out = dataclasses.asdict(self)
        out.pop("storage_options")
        return out


@dataclass
class CacheFill:
    """The rank's read slices after caching, and the figures of the fill."""

    train: list[ShardSlice]
    val: list[ShardSlice]
    val_split: str | None
    stats: CacheStats


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size from flags, else torchrun's or Slurm's environment."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size


def fill_cache(store: Store, manifest: Manifest, format_id: str, cache_dir: str, rank: int,
               world_size: int, *, with_val: bool | None = None, no_cache: bool = False,
               progress: bool = False) -> CacheFill:
    """Fetch the rank's train shards (and, on rank 0, the whole val split).

    With ``no_cache`` nothing is fetched: the slices point at the store itself and only
    the indexes are read.
    """
    if "train" not in manifest.split_names:
        raise UsageError(f"dataset {manifest.name!r} has no train split "
                         f"(splits: {', '.join(manifest.split_names)})")
    val_name = val_split(manifest)
    with_val = (rank == 0) if with_val is None else with_val
    train_ranges = assign(manifest, format_id, "train", rank, world_size)
    val_ranges = assign(manifest, format_id, val_name) if (val_name and with_val) else []
    if no_cache:
        t0 = time.perf_counter()
        train = remote_slices(store, manifest, train_ranges)
        val = remote_slices(store, manifest, val_ranges)
        return CacheFill(train, val, val_name if val_ranges else None,
                         CacheStats(seconds=time.perf_counter() - t0))
    total_files = _count_files(manifest, format_id, train_ranges + val_ranges)
    bar, on_file = _progress(progress, total_files, f"cache {manifest.name}/{format_id}")
    cache = ShardCache(store, manifest, cache_dir, on_file=on_file)
    try:
        train, stats = cache.fetch(train_ranges)
        val, val_stats = cache.fetch(val_ranges)
    finally:
        if bar is not None:
            bar.stop()
    stats.add(val_stats)
    return CacheFill(train, val, val_name if val_ranges else None, stats)


def _count_files(manifest: Manifest, format_id: str, ranges: list) -> int:
    fmt = manifest.format(format_id)
    per_sample = fmt.kind == "files"
    return sum((r.entry.samples if per_sample else 0) + len(r.entry.files) for r in ranges)


def _progress(enabled: bool, total: int, label: str) -> tuple[Any, Any]:
    if not enabled or not os.isatty(2):  # a live bar only on a terminal; logs get one line
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TransferSpeedColumn

    from shared.progress import stderr_console

    bar = Progress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TransferSpeedColumn(), transient=True, console=stderr_console())
    task = bar.add_task(label, total=total)
    bar.start()
    return bar, lambda n: bar.update(task, advance=n)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        torch.cuda.set_device(cuda_device_index(os.environ, torch.cuda.device_count()))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cuda_device_index(env: Mapping[str, str], visible: int) -> int:
    """This rank's index among the ``visible`` CUDA devices (those CUDA_VISIBLE_DEVICES or
    the device plugin gave the process): LOCAL_RANK, default 0. Never wraps around, so two
    ranks never share a GPU and no rank reaches one it was not given."""
    raw = env.get("LOCAL_RANK") or "0"
    local = int(raw) if raw.isdigit() else -1
    if not 0 <= local < visible:
        given = env.get("CUDA_VISIBLE_DEVICES", "all")
        raise UsageError(f"LOCAL_RANK={raw} but this process sees {visible} CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={given}); give each rank its own GPU")
    return local


def check_pair(loader_name: str, format_id: str, manifest: Manifest,
               no_cache: bool) -> tuple[type, Format]:
    """Validate loader, format and their fit; returns the loader class and format."""
    from node.loaders import LOADERS, UnknownLoader, get_loader

    try:
        cls = get_loader(loader_name)
    except UnknownLoader as exc:
        raise UsageError(str(exc)) from None
    if format_id not in manifest.format_ids:
        from node.commands import format_not_in_dataset

        raise UsageError(format_not_in_dataset(format_id, manifest))
    try:
        fmt = get_format(format_id)
    except UnknownFormat as exc:
        raise UsageError(str(exc)) from None
    if not cls.supports(fmt):
        fits = [n for n, c in LOADERS.items() if c.supports(fmt)]
        raise UsageError(f"loader {loader_name!r} cannot read format {format_id!r} "
                         f"(it reads {cls.formats_help}); loaders for {format_id}: "
                         f"{', '.join(fits) or 'none'}")
    reason = cls.unavailable_reason()
    if reason:
        raise UsageError(f"loader {loader_name!r} cannot run here: {reason}")
    if no_cache and loader_name not in ("zarr", "packed"):
        raise UsageError("--no-cache reads straight from the store, which only the zarr "
                         "and packed loaders support")
    return cls, fmt


def open_results(url: str, storage_options: dict[str, Any]) -> Store:
    """The results store; one that cannot be opened is a usage error naming --results."""
    try:
        return Store.open(url, storage_options)
    except StorageError as exc:
        raise UsageError(f"--results: {exc}") from None


def run(config: RunConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run one measured training (or bench) run; returns the ``runs`` row written."""
    from node.session import RunSession

    rank, world_size = resolve_rank(config.rank, config.world_size)
    store, manifest = open_dataset(config.store, config.dataset, config.storage_options)
    loader_cls, fmt = check_pair(config.loader, config.format_id, manifest, config.no_cache)
    device = resolve_device(config.device)
    results = open_results(config.results, store.storage_options)
    session = RunSession(config=config, store=store, manifest=manifest, fmt=fmt,
                         loader_cls=loader_cls, device=device, rank=rank,
                         world_size=world_size, results=results, quiet=quiet)
    return session.execute()


def build_loader(loader_cls: type, fmt: Format, slices: list[ShardSlice], manifest: Manifest,
                 config: RunConfig, device: torch.device, *, shuffle: bool,
                 options: Mapping[str, Any]) -> Any:
    """A loader instance over ``slices``; the fit check (e.g. free VRAM) is a usage error."""
    from node.loaders import LoaderUnavailable

    loader_config = LoaderConfig(
        fmt=fmt, shards=tuple(slices), batch_size=config.batch_size, workers=config.workers,
        seed=config.seed, device=device,
        image_shape=(manifest.height, manifest.width, manifest.channels), shuffle=shuffle,
        storage_options=dict(options))
    try:
        loader = loader_cls(loader_config)
    except LoaderUnavailable as exc:
        raise UsageError(f"loader {loader_cls.name!r}: {exc}") from None
    try:
        loader.check_fits()
    except LoaderUnavailable as exc:
        loader.close()
        raise UsageError(f"loader {loader_cls.name!r}: {exc}") from None
    return loader


def host_name() -> str:
    return socket.gethostname()
