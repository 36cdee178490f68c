"""``cupy``: the rank's whole ``npy`` data in one GPU buffer, batches gathered on the GPU.

At the start of the first epoch the rank's sample ranges of every shard's
``images.npy`` are copied into one CuPy buffer:

- by default from the memory map, 64 MiB at a time, through two pinned host buffers
  (the next chunk is copied out of the page cache while the previous one is in flight
  to the GPU); ``io_path = host``;
- with kvikio ``CuFile`` reads straight into the buffer where kvikio reports
  GPUDirect Storage usable (compat mode off, cuFile says GDS available); then
  ``io_path`` is what :func:`node.loaders.gpu.gds_status` makes of it. In compat mode
  kvikio would only repeat the host path through its own bounce buffer, so it is not
  used then.

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
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from node.loaders.base import Batch, Loader, LoaderConfig, LoaderUnavailable
from node.loaders.gpu import (
    GIB,
    IO_COMPAT,
    IO_HOST,
    cuda_device_index,
    decide_io_path,
    free_vram,
    nvfs_read_counters,
    probe_gds,
    requirements_reason,
    set_kvikio_threads,
    vram_reason,
)
from node.loaders.kvikio_loader import IMAGES_FILE, MAX_IO_THREADS, npy_layout
from shared.formats import Format

CHUNK_BYTES = 64 << 20
# VRAM left free for the model, its activations and the optimiser: a floor, not an
# estimate (batch and image size decide the real need; running out later is a failed
# run, not a refusal).
TRAINING_RESERVE_BYTES = 4 * GIB


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
        self.io_detail = "not loaded yet"
        self._buffer: Any = None  # the CuPy array that owns the memory
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self.load_bytes = 0  # bytes read from storage into the GPU buffer (once)

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
        reason = vram_reason(
            self.name, self.data_bytes + TRAINING_RESERVE_BYTES, free,
            f"{self.config.num_samples} images of {'x'.join(map(str, self.config.image_shape))} "
            f"uint8 plus {TRAINING_RESERVE_BYTES // GIB} GiB kept for training")
        if reason:
            raise LoaderUnavailable(reason)

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
            facts = probe_gds()
            if facts.compat_mode is False and facts.gds_available is True:
                self._load_kvikio(buffer, slices, facts)
            else:
                self._load_host(cupy, buffer, slices)
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
        self.io_path, self.io_detail = IO_HOST, "pinned host-to-device copies from the page cache"

    def _load_kvikio(self, buffer: Any, slices: list[tuple[str, int, int, int]],
                     facts: Any) -> None:
        """Whole ranges with kvikio (GPUDirect Storage where it works), in parallel."""
        import kvikio

        set_kvikio_threads(max(1, min(MAX_IO_THREADS, os.cpu_count() or 1)))
        before = nvfs_read_counters()
        handles, futures = [], []
        dst = cufile = 0
        threshold = int(facts.gds_threshold or 0)
        try:
            for path, offset, first, nbytes in slices:
                if not nbytes:
                    continue
                handle = kvikio.CuFile(path, "r")
                handles.append(handle)
                # kvikio splits an unaligned range into aligned tasks itself; one range
                # per shard is large, so the unaligned head and tail are negligible.
                futures.append((handle.pread(buffer[dst:dst + nbytes], nbytes, offset + first),
                                nbytes, path))
                cufile += nbytes if nbytes >= threshold else 0
                dst += nbytes
            for future, nbytes, path in futures:
                got = future.get()
                if got != nbytes:
                    raise OSError(f"{self.name}: short read from {path}: {got} of {nbytes} bytes")
        finally:
            for handle in handles:
                handle.close()
        self.io_path, self.io_detail = decide_io_path(facts, before, nvfs_read_counters(),
                                                      cufile_bytes=cufile)
        if self.io_path == IO_COMPAT:
            self.io_detail = f"kvikio reads: {self.io_detail}"

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

    def close(self) -> None:
        self._images = self._labels = None
        if self._buffer is not None:
            import cupy

            self._buffer = None
            # Hand the pool's blocks back, so a following run in this process has them.
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
