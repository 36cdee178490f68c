"""``cupy``: the rank's whole ``npy`` data in one GPU buffer, batches gathered on the GPU.

At the start of the first epoch the rank's sample ranges of every shard's
``images.npy`` are copied into one CuPy buffer:

- by default from the memory map, 64 MiB at a time, through two pinned host buffers
  (the next chunk is copied out of the page cache while the previous one is in flight
  to the GPU); ``io_path = host``;
- with kvikio ``CuFile`` reads straight into the buffer where kvikio reports
  GPUDirect Storage usable (compat mode off, cuFile says GDS available); then
  ``io_path`` is what :func:`node.loaders.gds.decide_io_path` makes of it. In compat mode
  kvikio would only repeat the host path through its own bounce buffer, so it is not
  used then.

VRAM: a run builds a train and a val loader before either loads and before the model
exists, so each loader's fit check counts the bytes of every other ``cupy`` loader that
has passed its check and not loaded yet (:func:`vram_budget`), plus a fixed reserve for
the model.

PyTorch gets the buffer through DLPack without a copy; each batch is one gather
``images[idx]`` on the GPU, labels likewise.

``bytes_read`` counts each batch's array slices, as ``numpy_mmap`` does (what the
contract test checks: every epoch reads each sample's bytes once). Storage itself is
read only once, at the start of the first epoch: the same total, recorded as
:attr:`CupyLoader.load_bytes`, and the load time falls inside that epoch's first data
wait, so the cold epoch shows it (``disk_read_bytes`` shows the disk side).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from node.loaders.base import Batch, Loader, LoaderConfig, LoaderUnavailable
from node.loaders.gds import (
    IO_HOST,
    decide_io_path,
    kvikio_observation,
    nvfs_read_counters,
    set_kvikio_settings,
)
from node.loaders.gpu import (
    GIB,
    cuda_device_index,
    format_gib,
    free_vram,
    requirements_reason,
    vram_reason,
)
from node.loaders.kvikio_loader import without_direct_io, io_threads
from shared.formats import Format
from shared.formats.npy import IMAGES_FILE, npy_layout

CHUNK_BYTES = 64 << 20
# VRAM left free for the model, its activations and the optimiser: a floor, not an
# estimate (batch and image size decide the real need; running out later is a failed
# run, not a refusal).
TRAINING_RESERVE_BYTES = 4 * GIB
# Bytes promised to cupy loaders that passed their fit check and have not loaded yet,
# by id(loader): what the next check must leave room for.
_PENDING: dict[int, int] = {}


def vram_budget(own_bytes: int, others_bytes: Sequence[int],
                reserve_bytes: int = TRAINING_RESERVE_BYTES) -> int:
    """VRAM a loader needs free now: its data, the other pending loaders', the reserve."""
    return own_bytes + sum(others_bytes) + reserve_bytes


class CupyLoader(Loader):
    """The rank's ``npy`` shards resident in GPU memory, shuffled batches gathered there."""

    name: ClassVar[str] = "cupy"
    device_kind: ClassVar[str] = "cuda"
    summary: ClassVar[str] = ("whole shards into GPU memory with CuPy (pinned chunked copies, "
                              "or kvikio where GDS works), to PyTorch by DLPack, GPU gathers")
    formats_help: ClassVar[str] = "npy"

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.io_path = IO_HOST
        self.io_evidence = "not loaded yet"
        self._buffer: Any = None  # the CuPy array that owns the memory
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self.load_bytes = 0  # bytes read from storage into the GPU buffer (once)
        self._kvikio_threads = 0  # kvikio's pool size, where the load used kvikio

    @classmethod
    def supports(cls, fmt: Format) -> bool:
        return fmt.id == "npy"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return requirements_reason(cls.name, ("cupy",))

    @property
    def data_bytes(self) -> int:
        """Bytes of the rank's images (the GPU buffer's size)."""
        return self.config.num_samples * int(np.prod(self.config.image_shape))

    def check_fits(self) -> None:
        if self._images is not None:
            return
        free, _ = free_vram(self.config.device)
        others = [n for key, n in _PENDING.items() if key != id(self)]
        reason = vram_reason(
            self.name, vram_budget(self.data_bytes, others), free,
            f"{self.config.num_samples} images of {'x'.join(map(str, self.config.image_shape))} "
            f"uint8, {format_gib(sum(others))} GiB for the run's other cupy loader, "
            f"{TRAINING_RESERVE_BYTES // GIB} GiB kept for the model")
        if reason:
            raise LoaderUnavailable(reason)
        _PENDING[id(self)] = self.data_bytes

    # ----------------------------------------------------------------- loading

    def _load(self) -> None:
        import cupy

        c = self.config
        device = cuda_device_index(c.device)
        torch.cuda.set_device(device)
        slices = []  # (path, data offset, first byte, bytes) per shard
        S = int(np.prod(c.image_shape))
        for s in c.shards:
            path = os.path.join(s.location, IMAGES_FILE)
            layout = npy_layout(path)
            if layout.dtype != np.uint8 or layout.fortran_order or \
                    tuple(layout.shape[1:]) != tuple(c.image_shape) or layout.shape[0] < s.stop:
                raise ValueError(f"{path}: expected C-order uint8 (N >= {s.stop}, "
                                 f"{', '.join(map(str, c.image_shape))}), got {layout.dtype} "
                                 f"{layout.shape}")
            slices.append((path, layout.data_offset, s.start * S, len(s) * S))
        with cupy.cuda.Device(device):
            buffer = cupy.empty(max(1, self.data_bytes), dtype=cupy.uint8)
            probe = kvikio_observation(before=None, after=None, cufile_bytes=None,
                                       fallback_files=None)
            if probe.compat_preferred is False and probe.nvfs_loaded is True:
                self._load_kvikio(buffer, slices)
            else:
                self._load_host(cupy, buffer, slices)
        _PENDING.pop(id(self), None)  # now in use: free memory shows it
        self._buffer = buffer
        self._images = torch.from_dlpack(buffer)[:self.data_bytes].view(
            c.num_samples, *c.image_shape)
        self._labels = torch.from_numpy(c.labels).to(c.device)
        self.load_bytes = self.data_bytes

    def _load_host(self, cupy: Any, buffer: Any,
                   slices: list[tuple[str, int, int, int]]) -> None:
        """Chunked copies from the page cache through two pinned buffers."""
        chunk = min(CHUNK_BYTES, max(1, self.data_bytes))
        pinned = [cupy.cuda.alloc_pinned_memory(chunk) for _ in range(2)]
        host = [np.frombuffer(p, dtype=np.uint8, count=chunk) for p in pinned]
        stream = cupy.cuda.Stream(non_blocking=True)
        in_flight: list[Any] = [None, None]
        dst = k = 0
        for path, offset, first, nbytes in slices:
            if not nbytes:
                continue
            # np.memmap of just the rank's range: nothing is read until copied.
            source = np.memmap(path, dtype=np.uint8, mode="r", offset=offset + first,
                               shape=(nbytes,))
            for pos in range(0, nbytes, chunk):
                n = min(chunk, nbytes - pos)
                slot = k % 2
                if in_flight[slot] is not None:  # the pinned buffer is still being sent
                    in_flight[slot].synchronize()
                host[slot][:n] = source[pos:pos + n]
                buffer[dst:dst + n].set(host[slot][:n], stream=stream)
                in_flight[slot] = stream.record()
                dst += n
                k += 1
            del source
        stream.synchronize()
        self.io_path, self.io_evidence = IO_HOST, "pinned host-to-device copies from the page cache"

    def _load_kvikio(self, buffer: Any, slices: list[tuple[str, int, int, int]]) -> None:
        """Whole ranges with kvikio (GPUDirect Storage where it works), in parallel."""
        import kvikio

        self._kvikio_threads = io_threads(self.config.workers)
        set_kvikio_settings(num_threads=self._kvikio_threads, gds_threshold=0)
        before = nvfs_read_counters()
        handles, futures = [], []
        dst = cufile = fallback = 0
        try:
            for path, offset, first, nbytes in slices:
                if not nbytes:
                    continue
                handle = kvikio.CuFile(path, "r")
                handles.append(handle)
                fallback += without_direct_io(handle)
                # kvikio splits an unaligned range into aligned tasks itself; one range
                # per shard is large, so the unaligned head and tail are negligible.
                futures.append((handle.pread(buffer[dst:dst + nbytes], nbytes, offset + first),
                                nbytes, path))
                cufile += nbytes
                dst += nbytes
            for future, nbytes, path in futures:
                got = future.get()
                if got != nbytes:
                    raise OSError(f"{self.name}: short read from {path}: {got} of {nbytes} bytes")
        finally:
            for handle in handles:
                handle.close()
        self.io_path, evidence = decide_io_path(kvikio_observation(
            before=before, after=nvfs_read_counters(), cufile_bytes=cufile,
            fallback_files=fallback))
        self.io_evidence = f"kvikio reads: {evidence}"


    # ----------------------------------------------------------------- epochs

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self._images is None:
            self._load()
        assert self._images is not None and self._labels is not None
        device = self.config.device
        sample_bytes = int(np.prod(self.config.image_shape))
        for positions in self.batches(epoch):
            pos = torch.from_numpy(positions)
            idx = pos.to(device, non_blocking=True)
            yield Batch(images=self._images[idx], labels=self._labels[idx], positions=pos,
                        bytes_read=len(positions) * sample_bytes)

    def resources(self) -> dict[str, int]:
        """kvikio's pool where the load used it (bounded by ``--workers``), else none."""
        return {"threads": self._kvikio_threads, "processes": 0}

    def close(self) -> None:
        _PENDING.pop(id(self), None)
        self._images = self._labels = None
        if self._buffer is not None:
            import cupy

            self._buffer = None
            # Hand the pool's blocks back, so a following run in this process has them.
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
