"""Resolve a :class:`~node.config.RunConfig` into a :class:`RunPlan`: every name looked
up, every usage mistake answered, nothing fetched or measured yet.

Usage errors (unknown names, a pair that does not fit, a loader that cannot run here,
a missing dataset, a bad rank or device) raise :class:`UsageError` here, before
anything is written; :mod:`node.session` executes the plan.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from node.cache_fill import RankShards, rank_shards
from node.cache import dataset_format
from node.checks import loader_spec, open_dataset
from node.config import RunConfig
from node.errors import UsageError
from shared.formats import Format
from shared.manifest import Manifest
from shared.storage import StorageError, Store


@dataclass(frozen=True)
class RunPlan:
    """One run, resolved.

    Attributes:
        config: what was asked for.
        store: the dataset's store; ``manifest`` its manifest; ``fmt`` the format read.
        loader_cls: the loader class (checked: fits ``fmt`` and can run here).
        device: the training device (on CUDA, this rank's own GPU).
        shards: the shard ranges this rank reads.
        results: the results store.
    """

    config: RunConfig
    store: Store
    manifest: Manifest
    fmt: Format
    loader_cls: type
    device: torch.device
    shards: RankShards
    results: Store

    @property
    def rank(self) -> int:
        return self.shards.rank

    @property
    def world_size(self) -> int:
        return self.shards.world_size


def resolve(config: RunConfig) -> RunPlan:
    """Look everything up and check it; raises :class:`UsageError` on any mistake."""
    rank, world_size = config.placement.resolve_rank()
    data = config.data
    store, manifest = open_dataset(data.store, data.dataset, data.storage_options)
    loader_cls, fmt = check_pair(config.loader.loader, data.format_id, manifest, data.no_cache)
    device = resolve_device(config.placement.device)
    results = open_results(config.measure.results, store.storage_options)
    shards = rank_shards(manifest, fmt.id, rank, world_size)
    return RunPlan(config=config, store=store, manifest=manifest, fmt=fmt,
                   loader_cls=loader_cls, device=device, shards=shards, results=results)


def check_pair(loader_name: str, format_id: str, manifest: Manifest,
               no_cache: bool) -> tuple[type, Format]:
    """Validate loader, format and their fit; returns the loader class and format."""
    from node.loaders import LOADER_SPECS, LOADERS

    cls = loader_spec(loader_name).load()
    fmt = dataset_format(manifest, format_id)
    if not cls.supports(fmt):
        fits = [n for n, c in LOADERS.items() if c.supports(fmt)]
        raise UsageError(f"loader {loader_name!r} cannot read format {format_id!r} "
                         f"(it reads {cls.formats_help}); loaders for {format_id}: "
                         f"{', '.join(fits) or 'none'}")
    reason = cls.unavailable_reason()
    if reason:
        raise UsageError(f"loader {loader_name!r} cannot run here: {reason}")
    if no_cache and not loader_spec(loader_name).streams:
        streaming = [s.name for _, s in LOADER_SPECS.items() if s.streams]
        raise UsageError(f"--no-cache reads straight from the store, which only the "
                         f"{' and '.join(streaming)} loaders support")
    return cls, fmt


def resolve_device(requested: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` as a device; on CUDA, this rank's own GPU."""
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


def open_results(url: str, storage_options: dict[str, Any]) -> Store:
    """The results store; one that cannot be opened is a usage error naming --results."""
    try:
        return Store.open(url, storage_options)
    except StorageError as exc:
        raise UsageError(f"--results: {exc}") from None
