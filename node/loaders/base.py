"""The contract every loader keeps, and the pieces they share.

A loader turns the node's cached shards of one format into batches on the training
device: ``images`` uint8 NHWC and ``labels`` int64 (plus the samples' positions, so
tests and telemetry can check that every sample came exactly once). Normalisation and
augmentation happen afterwards, identically for every loader.

Sample order: the rank's samples form one sequence ``0..n-1`` (its shards' ranges in
manifest order). Each epoch draws one permutation of it from ``(seed, epoch)`` with
:func:`epoch_permutation`; batches are consecutive chunks of it. A loader may
reorder samples *within* a batch (e.g. sorted gathers) but not across batches.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from shared.formats import ArrayFormat, Format
from shared.formats.base import ArrayShardReader


class LoaderUnavailable(RuntimeError):
    """The loader cannot run on this machine; the message is one line saying why."""


@dataclass(frozen=True)
class ShardSlice:
    """A range of one shard's samples assigned to this rank, ready to read.

    Attributes:
        location: the local shard folder (or, for ``--no-cache`` zarr, the shard's URL).
        keys, labels: the whole shard's index columns, in shard order.
        files: per-sample file names (file formats), else None.
        start, stop: the rank's sample range inside the shard.
    """

    location: str
    labels: np.ndarray
    files: tuple[str, ...] | None
    start: int
    stop: int
    keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class LoaderConfig:
    """What a loader is built from; the same for every loader in a comparison."""

    fmt: Format
    shards: tuple[ShardSlice, ...]
    batch_size: int
    workers: int
    seed: int
    device: torch.device
    image_shape: tuple[int, int, int]
    shuffle: bool = True
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    host_staging_mib: float | None = None  # the staging budget (node.loaders.staging)

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the rank's samples in sequence order."""
        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([s.labels[s.start:s.stop] for s in self.shards]).astype(np.int64)


@dataclass
class Batch:
    """One batch on the training device.

    Attributes:
        images: uint8 (N, H, W, C).
        labels: int64 (N,).
        positions: int64 (N,) on the CPU, each sample's place in the rank's sequence.
        bytes_read: bytes the loader read from storage for this batch.
        read_s: seconds spent reading this batch's bytes from storage (in whichever
            worker or thread read them); None where the loader cannot tell reading
            apart from decoding.
        decode_s: seconds spent decoding it (0 for raw arrays); None as above.
        h2d_s: seconds the host-to-device copy took in the main process (0 on the
            CPU); None where the loader does not time it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    bytes_read: int = 0
    read_s: float | None = None
    decode_s: float | None = None
    h2d_s: float | None = None


def open_array_readers(config: LoaderConfig) -> list[ArrayShardReader]:
    """One reader per shard slice of an array format (each opens its files lazily).

    Raises:
        ValueError: ``config.fmt`` is not an array format.
    """
    fmt = config.fmt
    if not isinstance(fmt, ArrayFormat):
        raise ValueError(f"{fmt.id} is not an array format")
    return [fmt.open_reader(s.location, num_samples=len(s.labels),
                            storage_options=config.storage_options) for s in config.shards]


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The rank's sample order for ``epoch``: same seed and epoch, same order."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n).astype(np.int64)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True) -> list[np.ndarray]:
    """The epoch's batches of positions; the last may be smaller."""
    order = epoch_permutation(n, seed, epoch, shuffle)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class _SpecFormatsHelp:
    """``Loader.formats_help``: what the loader's registry entry says it reads."""

    def __get__(self, obj: object, owner: type[Loader]) -> str:
        from node.loaders.registry import LOADER_SPECS

        name = getattr(owner, "name", None)
        return LOADER_SPECS[name].formats_help if name in LOADER_SPECS else ""


class Loader(abc.ABC):
    """A data path from cached shards to batches on the training device.

    Subclasses set ``name``, ``device_kind`` (``"cpu"`` or ``"cuda"``), ``summary``
    and implement :meth:`epoch`; GPU loaders also :meth:`unavailable_reason`. Which
    formats a loader reads is declared once, by its registry entry
    (:class:`node.loaders.Reads`): :meth:`supports` and ``formats_help`` ask it.

    ``io_path`` says how bytes reached memory (``gds``, ``compat``, ``host``) and
    ``io_evidence`` why it has that value (one line, recorded as
    ``runs.io_path_evidence``).
    """

    name: ClassVar[str]
    device_kind: ClassVar[str] = "cpu"
    summary: ClassVar[str] = ""  # one line: the data path
    formats_help = _SpecFormatsHelp()  # for `node-agent loaders`, e.g. "npy"
    io_path: str = "host"
    io_evidence: str = ""

    def __init__(self, config: LoaderConfig) -> None:
        if self.device_kind == "cuda" and config.device.type != "cuda":
            raise LoaderUnavailable(f"{self.name}: needs --device cuda, got {config.device}")
        self.config = config

    @classmethod
    def supports(cls, fmt: Format) -> bool:
        """Whether this loader can read ``fmt`` (its registry entry says)."""
        from node.loaders.registry import get_spec

        return get_spec(cls.name).supports(fmt)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the loader can run here, else one line saying why not."""
        return None

    def check_fits(self) -> None:
        """Raise :class:`LoaderUnavailable` when the data cannot fit (e.g. VRAM)."""

    def __len__(self) -> int:
        n, b = self.config.num_samples, self.config.batch_size
        return (n + b - 1) // b

    @abc.abstractmethod
    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Yield the epoch's batches in order (see module docstring)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers, files and device memory."""

    def release(self) -> None:  # noqa: B027 - optional hook
        """Close every mapping and file handle (and drop user-space caches) the loader
        holds, so their pages can leave the page cache (``--cold``); the next
        :meth:`epoch` reopens them lazily. Loaders that hold none keep this no-op."""

    def resources(self) -> dict[str, int]:
        """CPU-side parallelism: ``threads`` that read or decode in this process (the
        main thread when it does) and worker ``processes``.

        The default fits loaders that read in DataLoader workers, or in the main
        thread without them; loaders with their own pools override it.
        """
        workers = max(0, self.config.workers)
        return {"threads": 0 if workers else 1, "processes": workers}

    def batches(self, epoch: int) -> list[np.ndarray]:
        c = self.config
        return epoch_batches(c.num_samples, c.batch_size, c.seed, epoch, c.shuffle)


def to_device(images: torch.Tensor, labels: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a host batch to ``device`` (non-blocking from pinned memory)."""
    if device.type == "cpu":
        return images, labels
    return (images.to(device, non_blocking=True), labels.to(device, non_blocking=True))


def timed_to_device(images: torch.Tensor, labels: torch.Tensor,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`to_device`, waiting for the copy to finish; returns its seconds too.

    The trainer synchronises after every batch anyway, so waiting here costs nothing
    and lets the copy be timed apart from the wait for the batch.
    """
    t0 = time.perf_counter()
    images, labels = to_device(images, labels, device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return images, labels, time.perf_counter() - t0
