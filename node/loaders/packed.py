"""``packed``: samples of packed shards (``wds-*``) read by offset and batch-decoded.

The shard's index says where each sample's member lies in ``samples.tar``; a batch is
sorted by shard and offset (and, in threads, split into one chunk per thread); each
worker or thread copies its members out of a memory map of the cached tar (or takes them
from the store URL, see :mod:`node.loaders.packed_stream`) and decodes them straight into
the batch buffer.
JPEG goes through libturbojpeg when the system has it: one call per chunk of a batch
into a numba-compiled loop that holds no GIL and runs no Python per image
(:mod:`node.loaders.turbojpeg`), decoding into the batch's own memory (no tensor per
image, no stack copy); else torchvision.io. PNG and WebP go through torchvision.io, the
rest through the codec's own (Pillow) decoder.

JPEG decoded by the compiled loop, streamed shards and large images are read in a pool
of threads of this process (:class:`PackedThreadLoader`; streaming's block
read-ahead lives in one process); small images of the other codecs, decoded with
Python work per image, in DataLoader worker processes (:class:`PackedProcessLoader`).
Measured here (2 cores, ``benchmarks/bench_packed.py`` times both, interleaved): 32x32
JPEG, 2 threads 125,600-164,700 img/s where 2 workers reached 58,300-77,600 (a batch
through shared memory costs more than its decode once no GIL is held per image; before
the loop was compiled, the GIL's few microseconds of Python per image made processes
faster, up to 1.8x under load); at 512x512 threads reach 0.91-0.96 of cores x one core's
bare decode rate, where one batch per worker reached 0.26 (few batches per epoch, 200 MB
batches through shared memory). ``bytes_read`` is the member bytes read; ``read_s`` and
``decode_s`` are summed over the batch's threads.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, decode_png, decode_webp

from node.loaders.base import Batch, LoaderConfig
from node.loaders.common import BatchReader, HostBatch, WorkerLoader
from node.loaders.numpy_mmap import _Staging
from node.loaders.packed_io import _gather_loop
from node.loaders.packed_stream import (
    FETCH_THREADS,
    PART_BYTES,
    STREAM_BUFFER_BYTES,
    open_source,
    stream_schedule,
)
from node.loaders.staging import (
    StagingBound,
    batch_bytes,
    budget_of,
    thread_bound,
    with_read_ahead,
)
from node.loaders.turbojpeg import TurboJpeg, compiled_loop, turbojpeg_path
from node.loaders.window import WindowSchedule
from shared.formats import Format, FormatKind
from shared.formats.base import is_url
from shared.formats.wds import TAR_NAME
from shared.manifest import INDEX_FILE
from shared.shards import ShardIndex

THREADS_FROM_PIXELS = 128 * 128  # images this large decode in threads (see PackedLoader)
# See node/loaders/file.py: torchvision.io is still the decoder measured here.
warnings.filterwarnings("ignore", category=DeprecationWarning,
                        message="The image decoding and encoding capabilities of TorchVision")
_TORCHVISION_DECODERS = {"jpeg": decode_jpeg, "png": decode_png, "webp": decode_webp}


class _Shard(NamedTuple):
    """Where one shard's members are: its tar, and each sample's data offset and size."""

    location: str
    offsets: np.ndarray  # int64, per sample of the whole shard
    sizes: np.ndarray


def _read_shard(location: str, storage_options: dict[str, Any]) -> _Shard:
    """A shard's member table, from the ``index.parquet`` beside its tar."""
    from shared.storage import Store

    if is_url(location):
        data = Store.open(location, storage_options).read_bytes(INDEX_FILE)
    else:
        with open(os.path.join(location, INDEX_FILE), "rb") as f:
            data = f.read()
    index = ShardIndex.parse(data)
    if index.offsets is None or index.sizes is None:
        raise ValueError(f"{location}/{INDEX_FILE}: no member offsets (not a packed shard)")
    return _Shard(location, np.asarray(index.offsets, np.int64), np.asarray(index.sizes, np.int64))


class PackedBatchReader(BatchReader):
    """Reads and decodes the members at given rank positions (any process, any thread)."""

    def __init__(self, config: LoaderConfig, stream_bytes: int = STREAM_BUFFER_BYTES) -> None:
        super().__init__(config)
        fmt = config.fmt
        if fmt.kind is not FormatKind.PACKED:
            raise ValueError(f"packed loader: {fmt.id} is not a packed format")
        self.fmt = fmt
        self.codec = fmt.codec  # type: ignore[attr-defined]
        options = dict(config.storage_options)
        self.shards = [_read_shard(s.location, options) for s in config.shards]
        for s, shard in zip(config.shards, self.shards, strict=True):
            if len(shard.offsets) < s.stop:
                raise ValueError(f"{s.location}: index lists {len(shard.offsets)} members, "
                                 f"the rank reads up to {s.stop}")
        self.source = open_source(self.shards, options, stream_bytes)
        path = turbojpeg_path() if self.codec.family == "jpeg" else None
        self.turbo = TurboJpeg(path) if path else None

    @property
    def decoder(self) -> str:
        """Which decoder this reader uses, for ``io_evidence``."""
        if self.turbo is not None:
            return f"libturbojpeg ({os.path.basename(self.turbo.path)}, {self.turbo.loop})"
        return "torchvision.io" if self.codec.family in _TORCHVISION_DECODERS else "Pillow"

    def plan(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The positions sorted by (shard, offset), with their shard numbers and indices."""
        positions = np.sort(positions)  # rank order is shard order, then shard index
        shard_no, index = self.shard_map.locate(positions)
        return positions, shard_no, index

    def fill(self, out: np.ndarray, shard_no: np.ndarray,
             index: np.ndarray) -> tuple[int, float, float]:
        """Read and decode the given members into ``out`` (one row each), in order.

        Returns:
            ``(bytes read, read seconds, decode seconds)``.
        """
        t0 = time.perf_counter()
        buf, starts, sizes = self.source.read(shard_no, index)
        t1 = time.perf_counter()
        h, w, c = self.image_shape
        if self.turbo is not None and c == 3:
            self.turbo.decode_many(buf, starts, sizes, out)
        else:
            for k, (start, size) in enumerate(zip(starts.tolist(), sizes.tolist())):
                out[k] = self._decode_one(buf[start:start + size])
        return int(sizes.sum()), t1 - t0, time.perf_counter() - t1

    def _decode_one(self, data: np.ndarray) -> np.ndarray:
        decode = _TORCHVISION_DECODERS.get(self.codec.family)
        if decode is not None:
            chw = decode(torch.from_numpy(data), mode=ImageReadMode.RGB)
            image = chw.permute(1, 2, 0).numpy()
        else:
            image = self.codec.decode(data.tobytes())
        if image.shape != self.image_shape:
            raise ValueError(f"decoded to shape {image.shape}, the dataset's images are "
                             f"{self.image_shape}")
        return image

    def read(self, positions: np.ndarray) -> HostBatch:
        """A whole batch in this process (the DataLoader-worker variant)."""
        positions, shard_no, index = self.plan(positions)
        images = self.empty_images(len(positions))
        nbytes, read_s, decode_s = self.fill(images.numpy(), shard_no, index)
        return self.host_batch(images, positions, nbytes, read_s=read_s, decode_s=decode_s)

    def close(self) -> None:
        self.source.close()
        if self.turbo is not None:
            self.turbo.close()


class PackedProcessLoader(WorkerLoader):
    """The reader in DataLoader worker processes, one whole batch per fetch."""

    name: ClassVar[str] = "packed"
    summary: ClassVar[str] = ("members copied out of memory-mapped tars (cache) or block "
                              "GETs (streaming), batch decode in threads (JPEG through "
                              "libturbojpeg in a compiled loop, streaming, large images) "
                              "or DataLoader workers")

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        _compile_loops(config.fmt)

    def make_reader(self) -> PackedBatchReader:
        # Streamed shards are read ahead as far as the staging budget leaves room.
        reader = PackedBatchReader(self.config, self.staging_bound().read_ahead)
        self.io_evidence = _evidence(reader, f"{self.config.workers} DataLoader workers")
        return reader


def _evidence(reader: PackedBatchReader, where: str,
              schedule: WindowSchedule | None = None) -> str:
    how = ("ranged GETs from the store URL" if reader.source.remote
           else "members copied from a memory map of the cached tar, in a compiled loop")
    text = f"host: {how} into host memory, decoded by {reader.decoder} in {where}"
    if schedule is not None:
        text += (f"; block-shuffled epochs (blocks of {schedule.half} samples fetched ahead "
                 "in order; shard order and each block's samples shuffled, not the whole "
                 "rank)")
    return text


class PackedThreadLoader(PackedProcessLoader):
    """The reader in a pool of threads of this process.

    ``workers`` threads read and decode (0: the main thread does); two batches are in
    flight, each split into one chunk per thread.
    """

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self._pool: ThreadPoolExecutor | None = None
        self._schedule: tuple[int, WindowSchedule] | None = None
        self.io_evidence = ""

    def resources(self) -> dict[str, int]:
        return {"threads": max(1, self.config.workers), "processes": 0}

    def staging_bound(self) -> StagingBound:
        """:func:`~node.loaders.staging.thread_bound`; streaming adds its block GETs
        in flight and a read-ahead of what the budget leaves, at most
        :data:`~node.loaders.packed_stream.STREAM_BUFFER_BYTES` (the reader holds no more)."""
        c = self.config
        bound = thread_bound(batch_bytes(c.batch_size, c.image_shape), c.workers > 0,
                             pinned=c.device.type == "cuda")
        if not _streams(c):
            return bound
        bound = bound._replace(fixed_bytes=FETCH_THREADS * PART_BYTES)
        return with_read_ahead(bound, STREAM_BUFFER_BYTES, budget_of(self.name, c.host_staging_mib))

    def _chunk(self, reader: PackedBatchReader, host: torch.Tensor, part: slice,
               shard_no: np.ndarray, index: np.ndarray) -> tuple[int, float, float]:
        return reader.fill(host.numpy()[part], shard_no[part], index[part])

    def _submit(self, reader: PackedBatchReader, batch: np.ndarray, seq: int,
                staging: _Staging) -> tuple[Any, ...]:
        positions, shard_no, index = reader.plan(batch)
        host = staging.buffer(len(positions), seq)
        threads = max(1, self.config.workers)
        edges = np.linspace(0, len(positions), threads + 1).astype(int).tolist()
        parts = [slice(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]
        if self._pool is None:
            done: Future[tuple[int, float, float]] = Future()
            done.set_result(self._chunk(reader, host, slice(None), shard_no, index))
            return host, positions, [done]
        return host, positions, [self._pool.submit(self._chunk, reader, host, p, shard_no,
                                                   index) for p in parts]

    def _ensure_reader(self) -> PackedBatchReader:
        if self._reader is None:
            self._reader = self.make_reader()
        return self._reader

    def stream_schedule(self, epoch: int) -> WindowSchedule:
        """A streamed epoch's block order (:func:`node.loaders.packed_stream.stream_schedule`)."""
        if self._schedule is None or self._schedule[0] != epoch:
            c, reader = self.config, self._ensure_reader()
            self._schedule = (epoch, stream_schedule(
                reader.shards, c.shards, batch_size=c.batch_size, seed=c.seed, epoch=epoch,
                shuffle=c.shuffle))
        return self._schedule[1]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Streamed: the block order, so the epoch starts on its first block; cached: a
        permutation of the whole rank, as every loader."""
        if _streams(self.config):
            return list(self.stream_schedule(epoch).batches)
        return super().batches(epoch)

    def _finish(self, reader: PackedBatchReader, pending: tuple[Any, ...], seq: int,
                staging: _Staging) -> Batch:
        host, positions, futures = pending
        figures = np.array([f.result() for f in futures], dtype=np.float64).sum(axis=0)
        reader.source.finished(seq)
        labels = torch.from_numpy(reader.shard_map.labels[positions])
        images, labels, h2d_s = staging.publish(host, labels, seq)
        return Batch(images=images, labels=labels, positions=torch.from_numpy(positions),
                     bytes_read=int(figures[0]), read_s=float(figures[1]),
                     decode_s=float(figures[2]), h2d_s=h2d_s)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        reader = self._ensure_reader()
        where = f"{self.config.workers} threads" if self.config.workers > 0 else "the main thread"
        schedule = self.stream_schedule(epoch) if reader.source.remote else None
        self.io_evidence = _evidence(reader, where, schedule)
        if self._pool is None and self.config.workers > 0:
            self._pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="packed")
        batches = self.batches(epoch)  # streamed: the same schedule, cached per epoch
        reader.source.start_epoch(reader.shard_map, schedule)
        # Batch seq is submitted only after batch seq - depth - 1 was published, so a
        # ring of depth + 1 pinned slots never refills a slot whose copy is queued.
        depth = 2 if self._pool is not None else 0
        staging = _Staging(self.config, slots=depth + 2)
        pending: deque[tuple[Any, ...]] = deque()
        try:
            for seq, batch in enumerate(batches):
                pending.append(self._submit(reader, batch, seq, staging))
                if len(pending) > depth:
                    yield self._finish(reader, pending.popleft(), seq - depth, staging)
            done = len(batches) - len(pending)
            while pending:
                yield self._finish(reader, pending.popleft(), done, staging)
                done += 1
        finally:
            for item in pending:  # an abandoned epoch: let its reads finish first
                for future in item[2]:
                    future.exception()
            reader.source.end_epoch()

    def release(self) -> None:
        """Close the cached tars' descriptors (and drop streamed shards); reopened lazily."""
        if self._reader is not None:
            self._reader.close()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        super().close()


class PackedLoader(PackedThreadLoader):
    """Packed shards: threads, but DataLoader workers for small cached non-JPEG images.

    Threads when streaming (its block read-ahead feeds every batch from one
    process), for JPEG in the compiled loop (no GIL held per image), and for images of
    :data:`THREADS_FROM_PIXELS` pixels or more, where a batch split across threads beats
    one batch per worker and its trip through shared memory.
    """

    def _in_threads(self) -> bool:
        h, w, _ = self.config.image_shape
        return (_streams(self.config) or h * w >= THREADS_FROM_PIXELS
                or _compiled_jpeg(self.config.fmt))

    def resources(self) -> dict[str, int]:
        if self._in_threads():
            return PackedThreadLoader.resources(self)
        return WorkerLoader.resources(self)

    def staging_bound(self) -> StagingBound:
        if self._in_threads():
            return PackedThreadLoader.staging_bound(self)
        return WorkerLoader.staging_bound(self)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self._in_threads():
            return PackedThreadLoader.epoch(self, epoch)
        return WorkerLoader.epoch(self, epoch)

    def release(self) -> None:
        if self._in_threads():
            PackedThreadLoader.release(self)
        else:
            WorkerLoader.release(self)


def _compile_loops(fmt: Format) -> None:
    """Compile the numba loops the reader will call now, when the loader is built (once
    per process, about half a second), so a first epoch times loading, not the compiler;
    the run's total time still holds it."""
    _gather_loop()
    if getattr(fmt, "codec", None) is not None:
        _compiled_jpeg(fmt)


def _compiled_jpeg(fmt: Format) -> bool:
    """Whether ``fmt``'s members decode in the compiled loop (JPEG, libturbojpeg, numba)."""
    path = turbojpeg_path() if fmt.codec.family == "jpeg" else None  # type: ignore[attr-defined]
    return path is not None and compiled_loop(path) is not None


def _streams(config: LoaderConfig) -> bool:
    """Whether the shards are read from the store URL (``--no-cache``)."""
    return bool(config.shards) and is_url(config.shards[0].location)
