"""What the DataLoader-based loaders share: whole batches read in worker processes.

``file``, ``hdf5`` and ``zarr`` each supply a :class:`BatchReader` that turns one
batch of rank positions into one host batch; :class:`WorkerLoader` runs it in a
``torch.utils.data.DataLoader`` whose sampler yields the epoch's batches, so each
worker fetch is a whole batch (one IPC round trip per batch, not per sample), pinned
for the device when it is CUDA.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from node.loaders.base import Batch, Loader, LoaderConfig, ShardSlice, timed_to_device
from node.loaders.staging import (
    StagingBound,
    batch_bytes,
    check_host_staging,
    prefetch_factor,
    worker_bound,
)


class HostBatch(NamedTuple):
    """One batch in host memory, as a worker returns it (see :class:`Batch`)."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    bytes_read: int
    read_s: float | None = None
    decode_s: float | None = None


class ShardMap:
    """Where the rank's positions live: which shard, and which index inside it.

    Attributes:
        bounds: (S + 1,) cumulative sample counts; shard k holds positions
            ``bounds[k]:bounds[k + 1]``.
        starts: (S,) each slice's first index inside its shard.
        labels: (n,) int64 labels in rank sequence order.
    """

    def __init__(self, shards: Sequence[ShardSlice]) -> None:
        self.bounds = np.cumsum([0] + [len(s) for s in shards], dtype=np.int64)
        self.starts = np.array([s.start for s in shards], dtype=np.int64)
        self.labels = (np.concatenate([s.labels[s.start:s.stop] for s in shards])
                       .astype(np.int64, copy=False) if shards else np.zeros(0, np.int64))
        self._bounds: list[int] = self.bounds.tolist()
        self._offsets: list[int] = (self.bounds[:-1] - self.starts).tolist()

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, index inside the shard) of each position, any order."""
        shard_no = np.searchsorted(self.bounds, positions, side="right") - 1
        return shard_no, positions - self.bounds[shard_no] + self.starts[shard_no]

    def groups(self, sorted_positions: np.ndarray) -> list[tuple[int, slice, np.ndarray]]:
        """Split sorted positions by shard.

        Returns:
            ``(shard number, slice of sorted_positions, indices inside the shard)`` for
            each shard the batch touches, in shard order.
        """
        pos = sorted_positions
        if not len(pos):
            return []
        # bisect on Python lists: this runs per batch, where NumPy's call overhead shows.
        first = bisect.bisect_right(self._bounds, int(pos[0])) - 1
        last = bisect.bisect_right(self._bounds, int(pos[-1])) - 1
        if first == last:
            return [(first, slice(0, len(pos)), pos - self._offsets[first])]
        cuts = pos.searchsorted(self.bounds[first + 1:last + 1]).tolist()
        edges = [0, *cuts, len(pos)]
        out = []
        for k, shard in enumerate(range(first, last + 1)):
            lo, hi = edges[k], edges[k + 1]
            if hi > lo:
                out.append((shard, slice(lo, hi), pos[lo:hi] - self._offsets[shard]))
        return out


def empty_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor to fill with a batch.

    In a DataLoader worker it lives in shared memory, so handing it to the main process
    copies nothing (as ``default_collate`` does). Elsewhere it comes from NumPy, whose
    freed buffers are reused warm: torch's allocator returns fresh pages for large
    tensors, and faulting them in measured as slow as the gather itself.
    """
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    return torch.from_numpy(np.empty(shape, dtype=np.uint8))


class BatchReader(Dataset[HostBatch], abc.ABC):
    """Reads one whole batch, given its rank positions, into host memory.

    An instance is built in the main process and inherited by each DataLoader worker,
    so it must hold only plain data until :meth:`read` runs; handles (h5py files,
    zarr arrays) are opened lazily in the process that reads. Items come as
    ``(generation, positions)``: a new generation (:meth:`WorkerLoader.release`)
    closes the process's handles first, so persistent workers reopen them.
    """

    generation = 0

    def __init__(self, config: LoaderConfig) -> None:
        self.shard_map = ShardMap(config.shards)
        self.image_shape = tuple(config.image_shape)

    @abc.abstractmethod
    def read(self, positions: np.ndarray) -> HostBatch:
        """Read the samples at ``positions`` (any order; the batch may be reordered)."""

    def __getitem__(self, item: tuple[int, np.ndarray] | np.ndarray) -> HostBatch:
        if isinstance(item, tuple):
            generation, item = item
            if generation != self.generation:
                self.close()  # handles (and caches) of the last generation's files
                self.generation = generation
        return self.read(np.asarray(item, dtype=np.int64))

    def empty_images(self, n: int) -> torch.Tensor:
        """An uninitialised uint8 (n, H, W, C) tensor for a batch."""
        return empty_batch((n, *self.image_shape))

    def host_batch(self, images: torch.Tensor, positions: np.ndarray, bytes_read: int, *,
                   read_s: float | None = None, decode_s: float | None = None) -> HostBatch:
        """Wrap a filled batch, adding the labels of ``positions``."""
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        return HostBatch(images, torch.from_numpy(self.shard_map.labels[positions]),
                         torch.from_numpy(positions), int(bytes_read), read_s, decode_s)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles opened in this process."""


class _EpochBatchSampler(Sampler[tuple[int, np.ndarray]]):
    """Yields ``(generation, positions)`` of the current epoch's batches; set
    :attr:`epoch` first, and bump :attr:`generation` to make readers reopen files."""

    def __init__(self, batches: Callable[[int], list[np.ndarray]], length: int) -> None:
        self._batches = batches
        self._length = length
        self.epoch = 0
        self.generation = 0

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        generation = self.generation
        return ((generation, b) for b in self._batches(self.epoch))

    def __len__(self) -> int:
        return self._length


def _keep_batch(item: HostBatch) -> HostBatch:
    """Collate for items that are already whole batches."""
    return item


def _init_worker(worker_id: int) -> None:
    # Each worker is one decode lane; intra-op threads would oversubscribe the cores.
    torch.set_num_threads(1)


class WorkerLoader(Loader):
    """A loader whose batches a :class:`BatchReader` reads in DataLoader workers.

    ``config.workers == 0`` reads in the main process. With workers they persist
    across epochs and each prefetches two to four batches
    (:func:`node.loaders.staging.prefetch_factor`); the host memory that stages is
    bounded by :meth:`staging_bound` and checked against the budget by :meth:`check_fits`.
    """

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self._reader: BatchReader | None = None
        self._dataloader: DataLoader[Any] | None = None
        self._sampler = _EpochBatchSampler(self.batches, len(self))

    @abc.abstractmethod
    def make_reader(self) -> BatchReader:
        """The reader this loader's workers run."""

    def staging_bound(self) -> StagingBound:
        """The most host memory this loader's batches take (see :mod:`node.loaders.staging`)."""
        c = self.config
        return worker_bound(batch_bytes(c.batch_size, c.image_shape), c.workers,
                            pinned=c.device.type == "cuda")

    def check_fits(self) -> None:
        check_host_staging(self.name, self.staging_bound(), self.config.host_staging_mib)

    def _build(self) -> DataLoader[Any]:
        c = self.config
        self._reader = self.make_reader()
        options: dict[str, Any] = {}
        if c.workers > 0:
            options = {
                "persistent_workers": True,
                "worker_init_fn": _init_worker,
                "prefetch_factor": prefetch_factor(batch_bytes(c.batch_size, c.image_shape),
                                                   c.workers),
            }
        return DataLoader(self._reader, sampler=self._sampler, batch_size=None,
                          collate_fn=_keep_batch, num_workers=max(0, c.workers),
                          pin_memory=c.device.type == "cuda", **options)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self._dataloader is None:
            self._dataloader = self._build()
        # The sampler is iterated in this process when the DataLoader iterator starts.
        self._sampler.epoch = epoch
        for item in self._dataloader:
            images, labels, h2d_s = timed_to_device(item.images, item.labels,
                                                    self.config.device)
            yield Batch(images=images, labels=labels, positions=item.positions,
                        bytes_read=item.bytes_read, read_s=item.read_s,
                        decode_s=item.decode_s, h2d_s=h2d_s)

    def release(self) -> None:
        """Close the reader's handles here, and in each worker before its next read.

        Workers stay up (their start-up is not part of a cold epoch); only
        :meth:`BatchReader.close` runs in them, at the first item of the next epoch.
        """
        self._sampler.generation += 1
        if self._reader is not None:
            self._reader.close()

    def close(self) -> None:
        dataloader, self._dataloader = self._dataloader, None
        shutdown_workers(dataloader)
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def shutdown_workers(dataloader: Any) -> None:
    """Stop a DataLoader's persistent workers now (they live in its cached iterator)
    rather than whenever the garbage collector gets to it."""
    if dataloader is None:
        return
    iterator = getattr(dataloader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    dataloader._iterator = None
