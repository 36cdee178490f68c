"""``kvikio``: kvikio ``CuFile`` reads from the local cache straight into GPU memory.

With GPUDirect Storage the NVMe DMA-writes into GPU memory; in kvikio's (or cuFile's)
compat mode the same calls read through POSIX and a host bounce buffer. Which one
happened is decided by :func:`node.loaders.gds.decide_io_path` from the run's
nvidia-fs counters and kvikio's modes, and said in ``io_evidence``.

Reads overlap training: kvikio's ``FileHandle.pread`` serves reads below
``gds_threshold`` (16 KiB by default) inline with POSIX in the calling thread
(cpp/src/file_handle.cpp), which would read CIFAR-size samples one by one on the main
thread; so this loader sets ``gds_threshold`` to 0 and every read goes through kvikio's
thread pool (sized by ``--workers``). When kvikio is not in compat mode each ``pread``
also synchronises the default CUDA stream first; the Python API of kvikio 26.10 does not
expose ``sync_default_stream``, so that cost stays inside the data wait.

Per batch the positions are sorted and read in parallel (kvikio's thread pool):

- ``npy``: runs of consecutive samples are coalesced into one read each. GDS moves
  data directly only for 4 KiB-aligned file offsets (unaligned ones go through
  nvidia-fs bounce buffers), and a sample of ``images.npy`` starts at
  ``header + i * sample_bytes``, which is rarely aligned. So each read covers its run
  rounded out to 4 KiB boundaries (at most 8 KiB extra per run), lands in a
  4 KiB-aligned slot of a GPU staging buffer, and the samples are cut out on the GPU.
  Overlapping covering ranges are merged into one read.
- ``npy-files``: one read per file, of the whole file from offset 0 (aligned), into a
  4 KiB-aligned slot; the NumPy header is dropped on the GPU. All files of a shard
  share one header length (same writer, same shape and dtype), parsed once per shard
  with NumPy's own header reader.

The next batch's reads are submitted before the current batch is handed over, so I/O
overlaps the training step. Batches come back in sorted position order (the contract
allows reordering within a batch).

``bytes_read`` counts what the batch asked of storage: for ``npy-files`` whole files;
for ``npy`` the samples' array slices (as ``numpy_mmap``), while the 4 KiB rounding
that the reads add on top is counted in :attr:`KvikioLoader.alignment_bytes`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from node.loaders.base import Batch, Loader, LoaderConfig
from node.loaders.common import ShardMap
from node.loaders.gds import (
    IO_COMPAT,
    decide_io_path,
    kvikio_observation,
    nvfs_read_counters,
    set_kvikio_settings,
)
from node.loaders.gpu import (cuda_device_index, ensure_open_files, rank_files,
                              requirements_reason)
from node.loaders.read_plan import ALIGN, ReadPlan, align_up, aligned_start, plan_reads
from shared.formats.npy import NpyFormat, NpyLayout, npy_layout

MAX_IO_THREADS = 16


def io_threads(workers: int) -> int:
    """kvikio's pool size: ``--workers`` bounds it (at least 1, at most 16)."""
    return max(1, min(MAX_IO_THREADS, workers))




def without_direct_io(handle: Any) -> bool:
    """True when kvikio opened the file without O_DIRECT (so AUTO mode reads it by POSIX)."""
    probe = getattr(handle, "is_direct_io_supported", None)  # kvikio 26.x
    return probe is not None and not probe()


# --------------------------------------------------------------------------- staging

class _Staging:
    """A CuPy buffer on the GPU that reads land in, seen by torch through DLPack.

    ``ready`` is recorded on torch's stream after a batch has been cut out of it, so the
    next reads into it wait until the GPU has consumed the previous ones.
    """

    def __init__(self) -> None:
        self.array: Any = None  # a 4 KiB-aligned view of _owner
        self._owner: Any = None
        self.tensor: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def reserve(self, nbytes: int) -> None:
        import cupy

        self.wait()
        if self.array is None or self.array.size < nbytes:
            self.array = self.tensor = self._owner = None
            size = align_up(max(nbytes, ALIGN))
            # Over-allocate one page and start at its boundary (see aligned_start).
            self._owner = cupy.empty(size + ALIGN, dtype=cupy.uint8)
            skip = aligned_start(int(self._owner.data.ptr))
            self.array = self._owner[skip:skip + size]
            self.tensor = torch.from_dlpack(self.array)

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    def mark(self) -> None:
        self.ready = torch.cuda.Event()
        self.ready.record()

    def free(self) -> None:
        self.wait()
        self.array = self.tensor = self._owner = None


@dataclass
class _Pending:
    """A batch whose reads are in flight."""

    positions: np.ndarray  # sorted rank positions
    staging: _Staging
    waits: list[tuple[Callable[[], int], int, str]]  # (wait for the read, expected bytes, what)
    assemble: Callable[[torch.Tensor], torch.Tensor]  # staging tensor -> (B, H, W, C)
    bytes_read: int  # what the batch asked for (see the module docstring)
    cufile_bytes: int  # bytes in reads large enough for kvikio to hand to cuFile
    alignment_bytes: int = 0  # extra bytes the 4 KiB-aligned covering reads added


# --------------------------------------------------------------------------- the loader

class KvikioLoader(Loader):
    """kvikio ``CuFile`` reads of ``npy`` or ``npy-files`` into GPU memory."""

    name: ClassVar[str] = "kvikio"
    device_kind: ClassVar[str] = "cuda"
    summary: ClassVar[str] = ("kvikio CuFile reads into GPU memory (GPUDirect Storage or its "
                              "compat mode), coalesced 4 KiB-aligned reads, batches on the GPU")
    io_path = IO_COMPAT  # a cuFile path: "gds" only once a run has shown the evidence

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.io_path = IO_COMPAT
        self.io_evidence = "no reads yet"
        self._threads = io_threads(config.workers)
        self._file_handles: dict[int, Any] = {}  # npy-files: rank position -> CuFile
        self._fallback: list[str] = []  # files opened without O_DIRECT (POSIX reads)
        self._keep_handles = True
        self._in_flight: list[_Pending] = []
        self._map = ShardMap(config.shards)
        self._sample_bytes = int(np.prod(config.image_shape))
        self._files_mode = config.fmt.id == "npy-files"
        self._handles: list[Any] = []
        self._layouts: list[NpyLayout] = []
        self._sizes: list[int] = []
        self._paths: list[str] = []
        self._header: list[int] = []  # npy-files: header length per shard
        self._pool: ThreadPoolExecutor | None = None
        self._staging = (_Staging(), _Staging())
        self._labels: torch.Tensor | None = None
        self._opened = False
        self.alignment_bytes = 0

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return requirements_reason(cls.name, ("cupy", "kvikio"))

    # ----------------------------------------------------------------- setup

    def _open(self) -> None:
        if self._opened:
            return
        import kvikio

        c = self.config
        torch.cuda.set_device(cuda_device_index(c.device))
        # gds_threshold 0: small reads go through the pool too (module docstring).
        set_kvikio_settings(num_threads=self._threads, gds_threshold=0)
        if self._files_mode:
            self._paths = rank_files(c.shards)
            bounds = self._map.bounds.tolist()
            for k in range(len(c.shards)):
                if bounds[k + 1] == bounds[k]:  # an empty range: nothing to read there
                    self._header.append(0)
                    continue
                layout = npy_layout(self._paths[bounds[k]])
                self._header.append(layout.require(c.image_shape, per_sample=True,
                                                   who=self.name).data_offset)
            # Every file's handle stays open for the run (two descriptors each) where the
            # open-files limit allows; else each read opens and closes its file.
            self._keep_handles = ensure_open_files(2 * len(self._paths) + 256)
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="kvikio-files")
        else:
            # Each CuFile holds two descriptors (buffered and O_DIRECT) for the whole run.
            ensure_open_files(2 * len(c.shards) + 256)
            assert isinstance(c.fmt, NpyFormat)  # supports() admits npy and npy-files only
            for s in c.shards:
                reader = c.fmt.open_reader(s.location)  # where the npy format keeps images
                path = str(reader.path)
                self._layouts.append(reader.layout().require(c.image_shape, per_sample=False,
                                                             who=self.name))
                self._sizes.append(os.path.getsize(path))
                handle = kvikio.CuFile(path, "r")
                self._handles.append(handle)
                if without_direct_io(handle):
                    self._fallback.append(path)
        self._labels = torch.from_numpy(self._map.labels).to(c.device)
        self._opened = True

    # ----------------------------------------------------------------- reading

    def _submit(self, positions: np.ndarray, staging: _Staging) -> _Pending:
        pos = np.sort(np.asarray(positions, dtype=np.int64))
        if self._files_mode:
            return self._submit_files(pos, staging)
        return self._submit_npy(pos, staging)

    def _submit_npy(self, pos: np.ndarray, staging: _Staging) -> _Pending:
        S = self._sample_bytes
        plans: list[tuple[int, ReadPlan]] = []
        base = 0
        for shard, _, idx in self._map.groups(pos):
            layout = self._layouts[shard]
            plan = plan_reads(idx, data_offset=layout.data_offset, sample_bytes=S,
                              file_size=self._sizes[shard], buffer_base=base)
            plans.append((shard, plan))
            base += plan.nbytes
        staging.reserve(base)
        waits: list[tuple[Callable[[], int], int, str]] = []
        read = cufile = 0
        for shard, plan in plans:
            handle = self._handles[shard]
            for r in plan.ranges:
                view = staging.array[r.buffer_offset:r.buffer_offset + r.size]
                future = handle.pread(view, r.size, r.file_offset)
                waits.append((future.get, r.size, f"shard {shard} @{r.file_offset}"))
                read += r.size
                cufile += r.size
        runs = [run for _, plan in plans for run in plan.runs]
        shape = (len(pos), *self.config.image_shape)

        def assemble(buf: torch.Tensor) -> torch.Tensor:
            # One copy cuts every run out of the staging buffer (which is reused).
            return torch.cat([buf[off:off + count * S] for _, count, off in runs]).view(shape)

        payload = len(pos) * S
        return _Pending(pos, staging, waits, assemble, payload, cufile, read - payload)

    def _submit_files(self, pos: np.ndarray, staging: _Staging) -> _Pending:
        import kvikio

        S = self._sample_bytes
        shard_no, _ = self._map.locate(pos)
        headers = [self._header[k] for k in shard_no.tolist()]
        stride = align_up(max(headers) + S)
        staging.reserve(stride * len(pos))
        assert self._pool is not None

        def read_one(p: int, offset: int, size: int) -> int:
            # Opening registers the file with cuFile once; the handle is kept for the run.
            handle = self._file_handles.get(p)
            if handle is None:
                handle = kvikio.CuFile(self._paths[p], "r")
                if without_direct_io(handle):
                    self._fallback.append(self._paths[p])  # list.append: thread-safe
                if self._keep_handles:
                    self._file_handles[p] = handle
            try:
                return int(handle.read(staging.array[offset:offset + size], size, 0))
            finally:
                if not self._keep_handles:
                    handle.close()

        waits: list[tuple[Callable[[], int], int, str]] = []
        read = cufile = 0
        for k, (p, header) in enumerate(zip(pos.tolist(), headers, strict=True)):
            size = header + S
            future = self._pool.submit(read_one, p, k * stride, size)
            waits.append((future.result, size, self._paths[p]))
            read += size
            cufile += size
        shape = (len(pos), *self.config.image_shape)
        uniform = len(set(headers)) == 1

        def assemble(buf: torch.Tensor) -> torch.Tensor:
            rows = buf[:stride * len(pos)].view(len(pos), stride)
            if uniform:  # one strided copy drops every header; the staging is reused,
                # so always copy (a single row would otherwise stay a view of it)
                return rows[:, headers[0]:headers[0] + S].clone(
                    memory_format=torch.contiguous_format).view(shape)
            return torch.stack([rows[k, h:h + S] for k, h in enumerate(headers)]).view(shape)

        return _Pending(pos, staging, waits, assemble, read, cufile)

    def _finish(self, pending: _Pending) -> Batch:
        for wait, expected, what in pending.waits:
            got = wait()
            if got != expected:
                raise OSError(f"{self.name}: short read from {what}: {got} of {expected} bytes")
        pending.waits = []
        assert pending.staging.tensor is not None and self._labels is not None
        images = pending.assemble(pending.staging.tensor)
        pending.staging.mark()
        positions = torch.from_numpy(pending.positions)
        labels = self._labels[positions.to(self.config.device, non_blocking=True)]
        return Batch(images=images, labels=labels, positions=positions,
                     bytes_read=pending.bytes_read)

    @staticmethod
    def _drain(pending: _Pending | None) -> None:
        """Wait for reads still in flight, so their buffer is not freed under them."""
        if pending is None:
            return
        for wait, _, _ in pending.waits:
            try:
                wait()
            except Exception:  # noqa: BLE001 - the epoch is being abandoned anyway
                pass
        pending.waits = []

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self._open()
        batches = self.batches(epoch)
        before = nvfs_read_counters()
        cufile_bytes = 0
        try:
            if batches:
                self._in_flight.append(self._submit(batches[0], self._staging[0]))
            for k in range(len(batches)):
                if k + 1 < len(batches):  # overlap the next batch's reads with this step
                    self._in_flight.append(
                        self._submit(batches[k + 1], self._staging[(k + 1) % 2]))
                pending = self._in_flight[0]
                batch = self._finish(pending)  # on a failed read, _drain_all waits for it too
                self._in_flight.pop(0)
                cufile_bytes += pending.cufile_bytes
                self.alignment_bytes += pending.alignment_bytes
                self.io_path, evidence = decide_io_path(kvikio_observation(
                    before=before, after=nvfs_read_counters(), cufile_bytes=cufile_bytes,
                    fallback_files=len(set(self._fallback))))
                reopen = "" if self._keep_handles else (
                    "; open-files limit too low to keep handles: each read opens its file")
                self.io_evidence = evidence + reopen
                yield batch
        finally:
            self._drain_all()

    def _drain_all(self) -> None:
        """Wait for every read still in flight (the staging must outlive them)."""
        while self._in_flight:
            self._drain(self._in_flight.pop(0))

    def resources(self) -> dict[str, int]:
        """kvikio's I/O threads (``--workers``, at most 16), plus the file pool's."""
        pool = self._threads if self._files_mode else 0
        return {"threads": self._threads + pool, "processes": 0}

    def release(self) -> None:
        """Close every handle and buffer; the next epoch reopens them."""
        self.close()

    def close(self) -> None:
        # Reads still in flight first (also when training stopped on an error and the
        # epoch's generator was never closed), then the pool, then handles and buffers.
        self._drain_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for handle in [*self._handles, *self._file_handles.values()]:
            handle.close()
        self._handles, self._file_handles, self._fallback = [], {}, []
        self._layouts, self._sizes, self._header = [], [], []
        for staging in self._staging:
            staging.free()
        self._labels = None
        self._opened = False
