"""``numpy_mmap``: memory-mapped ``images.npy`` shards, whole-batch gathers.

Per batch the positions are sorted (so each shard's map is read front to back) and
each shard's part is one ``np.take`` straight into the batch buffer; samples come out
in sorted order with matching labels and positions, as the contract allows. Reads
run in the main process: per-batch overhead is what limits small images, and a
DataLoader round trip would cost more than the gather. With ``config.workers > 0`` a
thread pool gathers the next batches ahead (NumPy copies release the GIL, so page
faults on a cold cache overlap). ``bytes_read`` is the gathered slices' ``nbytes``.

Stage times: ``read_s`` is the gather (page faults included: that is where the bytes
come from storage), ``decode_s`` 0 (raw arrays), ``h2d_s`` the copy to the device.
:meth:`NumpyMmapLoader.release` unmaps every shard (mapped pages cannot leave the page
cache); the next epoch maps them again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ClassVar

import numpy as np
import torch

from node.loaders.base import Batch, Loader, LoaderConfig, open_array_readers
from node.loaders.common import ShardMap, empty_batch
from node.loaders.staging import StagingBound, batch_bytes, check_host_staging, mmap_bound
from shared.formats.base import ArrayShardReader


class _Staging:
    """Host buffers for gathered batches and their trip to the device.

    On the CPU every batch gets a fresh buffer (the caller keeps the tensor). On CUDA
    a ring of pinned buffers is reused: a slot is refilled only after the copy that
    last read it has finished (a CUDA event), so copies can be asynchronous.
    """

    def __init__(self, config: LoaderConfig, slots: int) -> None:
        self.shape = (config.batch_size, *config.image_shape)
        self.device = config.device
        self.pinned: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event | None] = []
        if self.device.type == "cuda":
            self.pinned = [torch.empty(self.shape, dtype=torch.uint8, pin_memory=True)
                           for _ in range(slots)]
            self.events = [None] * slots

    def buffer(self, n: int, seq: int) -> torch.Tensor:
        """A host tensor for ``n`` samples of batch number ``seq``; may block on a copy."""
        if not self.pinned:
            return empty_batch((n, *self.shape[1:]))
        slot = seq % len(self.pinned)
        event = self.events[slot]
        if event is not None:
            event.synchronize()
        return self.pinned[slot][:n]

    def publish(self, host: torch.Tensor, labels: torch.Tensor,
                seq: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Move a filled buffer (and its labels) to the device; also the copy's seconds
        (waited for: the trainer synchronises after each batch anyway)."""
        if not self.pinned:
            return host, labels, 0.0
        t0 = time.perf_counter()
        images = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events[seq % len(self.pinned)] = event
        labels = labels.to(self.device)
        event.synchronize()
        return images, labels, time.perf_counter() - t0


class NumpyMmapLoader(Loader):
    """Whole-batch gathers from memory-mapped ``.npy`` shards."""

    name: ClassVar[str] = "numpy_mmap"
    summary: ClassVar[str] = "memory-mapped array, whole-batch gathers with sorted indices"
    io_evidence: ClassVar[str] = ("host: page faults on a read-only memory map of "
                                  "images.npy into host memory")

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self._map = ShardMap(config.shards)
        self._readers: list[ArrayShardReader] = []
        self._arrays: list[np.ndarray] = []
        self._open()
        self._sample_bytes = int(np.prod(config.image_shape))

    def _open(self) -> None:
        config = self.config
        self._readers = open_array_readers(config)
        # Plain ndarray views: np.memmap's subclass hooks cost time on every take.
        self._arrays = [np.asarray(r.images_array()) for r in self._readers]
        for s, a in zip(config.shards, self._arrays, strict=True):
            if a.shape[1:] != tuple(config.image_shape) or len(a) < s.stop:
                raise ValueError(f"{s.location}: images.npy is {a.shape}, expected at least "
                                 f"{s.stop} samples of {tuple(config.image_shape)}")

    def staging_bound(self) -> StagingBound:
        """The most host memory its batches take: :func:`node.loaders.staging.mmap_bound`
        (the pinned ring on CUDA, else the gathers ahead and the batches held)."""
        c = self.config
        return mmap_bound(batch_bytes(c.batch_size, c.image_shape), c.workers,
                          pinned=c.device.type == "cuda")

    def check_fits(self) -> None:
        check_host_staging(self.name, self.staging_bound(), self.config.host_staging_mib)

    def resources(self) -> dict[str, int]:
        """Gathers run in the main thread, or in a pool of ``workers`` threads."""
        return {"threads": max(1, self.config.workers), "processes": 0}

    def _gather(self, batch: np.ndarray, seq: int,
                staging: _Staging) -> tuple[torch.Tensor, np.ndarray, float]:
        t0 = time.perf_counter()
        positions = np.sort(batch)
        host = staging.buffer(len(positions), seq)
        out = host.numpy()
        for shard, part, index in self._map.groups(positions):
            # mode="clip": indices come from the shard map, always in range, and the
            # default "raise" would buffer `out` through a temporary copy.
            self._arrays[shard].take(index, axis=0, out=out[part], mode="clip")
        return host, positions, time.perf_counter() - t0

    def _finish(self, host: torch.Tensor, positions: np.ndarray, read_s: float, seq: int,
                staging: _Staging) -> Batch:
        labels = torch.from_numpy(self._map.labels[positions])
        images, labels, h2d_s = staging.publish(host, labels, seq)
        return Batch(images=images, labels=labels, positions=torch.from_numpy(positions),
                     bytes_read=len(positions) * self._sample_bytes, read_s=read_s,
                     decode_s=0.0, h2d_s=h2d_s)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if not self._arrays and self.config.shards:
            self._open()  # unmapped by release()
        batches = self.batches(epoch)
        workers = self.config.workers
        if workers <= 0:
            staging = _Staging(self.config, slots=2)
            for seq, batch in enumerate(batches):
                yield self._finish(*self._gather(batch, seq, staging), seq, staging)
            return
        # Batch seq is submitted only after batch seq - depth - 1 was published, so a
        # ring of depth + 1 slots never refills a slot whose copy is still queued.
        depth = workers + 1
        staging = _Staging(self.config, slots=depth + 1)
        pending: deque[Future[tuple[torch.Tensor, np.ndarray, float]]] = deque()
        with ThreadPoolExecutor(max_workers=workers,
                                thread_name_prefix="numpy_mmap") as pool:
            for seq, batch in enumerate(batches):
                pending.append(pool.submit(self._gather, batch, seq, staging))
                if len(pending) > depth:
                    done = seq - depth
                    yield self._finish(*pending.popleft().result(), done, staging)
            done = len(batches) - len(pending)
            while pending:
                yield self._finish(*pending.popleft().result(), done, staging)
                done += 1

    def release(self) -> None:
        """Unmap every shard; the next :meth:`epoch` maps them again."""
        self.close()

    def close(self) -> None:
        self._arrays = []
        for reader in self._readers:
            reader.close()
        self._readers = []
