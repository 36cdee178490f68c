"""``cupy``: the rank's ``npy`` data in GPU memory, batches gathered on the GPU.

Two modes (:mod:`node.loaders.window` decides; ``io_evidence`` starts with the mode):

- **whole**, where the rank's images fit in spare VRAM (and under
  ``$FORMATLAB_CUPY_VRAM_MIB`` where set): at the start of the first epoch every slice
  of the shards' ``images.npy`` is copied into one CuPy buffer, which every epoch reads;
- **windowed**, where they do not: a buffer of two halves, into which a loader thread
  copies each epoch's blocks of shards in turn, the next block loading while the current
  one trains. The epoch's order is :func:`node.loaders.window.window_schedule`'s, not
  :func:`~node.loaders.base.epoch_permutation`'s (a permutation of the whole rank needs
  all of it resident); every sample still comes once per epoch, and every epoch reads
  its data from storage again (:attr:`CupyLoader.load_bytes` counts it).

Copies: by default from a memory map, 64 MiB at a time, through two pinned host buffers
(the next chunk leaves the page cache while the previous one is in flight to the GPU;
``io_path = host``); with kvikio ``CuFile`` reads straight into the buffer where kvikio
reports GPUDirect Storage usable (compat mode off, cuFile says GDS available), and then
``io_path`` is what :func:`node.loaders.gds.decide_io_path` makes of it. In compat mode
kvikio would only repeat the host path through its own bounce buffer.

VRAM: a run builds a train and a val loader before either loads and before the model
exists, so each loader's fit check counts the bytes of every other ``cupy`` loader that
has passed its check and not loaded yet (:func:`vram_budget`), plus a fixed reserve for
the model; a window takes at most half of what is then spare, leaving the val loader room.

PyTorch gets the buffer through DLPack without a copy; each batch is one gather
``images[idx]`` on the GPU, labels likewise. ``bytes_read`` counts each batch's array
slices, as ``numpy_mmap`` does (every epoch reads each sample's bytes once). In whole
mode storage is read once, in the first epoch's first data wait, so the cold epoch shows
it (``disk_read_bytes`` shows the disk side).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
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
from node.loaders.kvikio_loader import io_threads, without_direct_io
from node.loaders.staging import CUPY_CHUNK_BYTES as CHUNK_BYTES
from node.loaders.staging import check_host_staging, cupy_bound
from node.loaders.window import (CAP_ENV, WINDOWED, Residency, Segment, WindowSchedule,
                                 choose_residency, smallest_window, vram_cap,
                                 window_schedule)
from shared.formats import Format
from shared.formats.npy import IMAGES_FILE, npy_layout

MIB = 1 << 20
# VRAM left free for the model, its activations and the optimiser: a floor, not an
# estimate (batch and image size decide the real need; running out later is a failed
# run, not a refusal).
TRAINING_RESERVE_BYTES = 4 * GIB
# Bytes promised to cupy loaders that passed their fit check and have not loaded yet,
# by id(loader): what the next check must leave room for.
_PENDING: dict[int, int] = {}

Range = tuple[str, int, int, int]  # (path, file offset, bytes, offset in the GPU buffer)


def vram_budget(own_bytes: int, others_bytes: Sequence[int],
                reserve_bytes: int = TRAINING_RESERVE_BYTES) -> int:
    """VRAM a loader needs free now: its data, the other pending loaders', the reserve."""
    return own_bytes + sum(others_bytes) + reserve_bytes


class CupyLoader(Loader):
    """The rank's ``npy`` shards resident in GPU memory (whole, or a double-buffered
    window of them), shuffled batches gathered there."""

    name: ClassVar[str] = "cupy"
    device_kind: ClassVar[str] = "cuda"
    summary: ClassVar[str] = ("whole shards into GPU memory with CuPy (pinned chunked copies, "
                              "or kvikio where GDS works), to PyTorch by DLPack, GPU gathers")
    formats_help: ClassVar[str] = "npy"

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.io_path = IO_HOST
        self.io_evidence = "not loaded yet"
        self.residency: Residency | None = None  # decided by check_fits
        self._buffer: Any = None  # the CuPy array that owns the memory
        self._images: torch.Tensor | None = None  # (n or 2 x half, H, W, C) view of it
        self._labels: torch.Tensor | None = None
        self.load_bytes = 0  # bytes read from storage into the GPU buffer
        self._kvikio_threads = 0  # kvikio's pool size, where the load used kvikio
        self._files: list[tuple[str, int]] | None = None  # (path, data offset) per slice
        self._path_evidence = ""  # how the last copy moved its bytes
        self._staging: tuple[list[np.ndarray], Any] | None = None  # pinned buffers, stream
        self._pool: ThreadPoolExecutor | None = None  # windowed: the loader thread
        self._inflight: list[Future[None]] = []
        self._gathered: Any = None  # windowed: CUDA event after the latest gathers

    @classmethod
    def supports(cls, fmt: Format) -> bool:
        return fmt.id == "npy"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return requirements_reason(cls.name, ("cupy",))

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.config.image_shape))

    @property
    def data_bytes(self) -> int:
        """Bytes of the rank's images (the GPU buffer's size in whole mode)."""
        return self.config.num_samples * self.sample_bytes

    def check_fits(self) -> None:
        """Decide whole or windowed against free VRAM; refuse when not even a window of
        two batches fits."""
        if self._images is not None:
            return
        c = self.config
        free, _ = free_vram(c.device)
        others = [n for key, n in _PENDING.items() if key != id(self)]
        try:
            cap = vram_cap()
        except ValueError as exc:
            raise LoaderUnavailable(f"{self.name}: {exc}") from None
        spare = max(0, free - sum(others) - TRAINING_RESERVE_BYTES)
        residency = choose_residency(num_samples=c.num_samples, sample_bytes=self.sample_bytes,
                                     batch_size=c.batch_size, spare_bytes=spare, cap_bytes=cap)
        if residency is None:
            raise LoaderUnavailable(self._refusal(free, others, cap))
        check_host_staging(self.name, cupy_bound(self.data_bytes), c.host_staging_mib)
        self.residency = residency
        _PENDING[id(self)] = residency.vram_bytes

    def _refusal(self, free: int, others: list[int], cap: int | None) -> str:
        c = self.config
        smallest = smallest_window(self.sample_bytes, c.batch_size)
        if cap is not None and cap < smallest:
            return (f"{self.name}: {CAP_ENV} caps the data at {cap / MIB:.0f} MiB, below a "
                    f"window of two batches of {c.batch_size} ({smallest / MIB:.0f} MiB)")
        # a window takes at most half of what is spare
        need = vram_budget(2 * smallest, others)
        what = (f"{c.num_samples} images of {'x'.join(map(str, c.image_shape))} uint8 do not "
                f"fit, a window of two batches of {c.batch_size} needs "
                f"{format_gib(2 * smallest)} GiB spare, "
                f"{format_gib(sum(others))} GiB for the run's other cupy loader, "
                f"{TRAINING_RESERVE_BYTES // GIB} GiB kept for the model")
        return vram_reason(self.name, max(need, free + 1), free, what) or what

    # ----------------------------------------------------------------- copies

    def _shard_files(self) -> list[tuple[str, int]]:
        """Each slice's ``images.npy`` and its data offset, the layout checked once."""
        if self._files is None:
            c, files = self.config, []
            for s in c.shards:
                path = os.path.join(s.location, IMAGES_FILE)
                layout = npy_layout(path)
                if layout.dtype != np.uint8 or layout.fortran_order or \
                        tuple(layout.shape[1:]) != tuple(c.image_shape) or \
                        layout.shape[0] < s.stop:
                    raise ValueError(f"{path}: expected C-order uint8 (N >= {s.stop}, "
                                     f"{', '.join(map(str, c.image_shape))}), got "
                                     f"{layout.dtype} {layout.shape}")
                files.append((path, layout.data_offset))
            self._files = files
        return self._files

    def _copy(self, cupy: Any, buffer: Any, ranges: list[Range]) -> None:
        """Copy file ranges into the buffer: kvikio where GDS is usable, else host."""
        probe = kvikio_observation(before=None, after=None, cufile_bytes=None,
                                   fallback_files=None)
        if probe.compat_preferred is False and probe.nvfs_loaded is True:
            self._copy_kvikio(buffer, ranges)
        else:
            self._copy_host(cupy, buffer, ranges)
        self.load_bytes += sum(r[2] for r in ranges)

    def _copy_host(self, cupy: Any, buffer: Any, ranges: list[Range]) -> None:
        """Chunked copies from the page cache through two pinned buffers."""
        if self._staging is None:
            chunk = min(CHUNK_BYTES, max(1, self.data_bytes))
            pinned = [cupy.cuda.alloc_pinned_memory(chunk) for _ in range(2)]
            self._staging = ([np.frombuffer(p, dtype=np.uint8, count=chunk) for p in pinned],
                             cupy.cuda.Stream(non_blocking=True))
        host, stream = self._staging
        chunk = len(host[0])
        in_flight: list[Any] = [None, None]
        k = 0
        for path, offset, nbytes, dst in ranges:
            if not nbytes:
                continue
            # np.memmap of just this range: nothing is read until copied.
            source = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
            for pos in range(0, nbytes, chunk):
                n = min(chunk, nbytes - pos)
                slot = k % 2
                if in_flight[slot] is not None:  # the pinned buffer is still being sent
                    in_flight[slot].synchronize()
                host[slot][:n] = source[pos:pos + n]
                buffer[dst + pos:dst + pos + n].set(host[slot][:n], stream=stream)
                in_flight[slot] = stream.record()
                k += 1
            del source
        stream.synchronize()
        self.io_path = IO_HOST
        self._path_evidence = "pinned host-to-device copies from the page cache"

    def _copy_kvikio(self, buffer: Any, ranges: list[Range]) -> None:
        """Whole ranges with kvikio (GPUDirect Storage where it works), in parallel."""
        import kvikio

        self._kvikio_threads = io_threads(self.config.workers)
        set_kvikio_settings(num_threads=self._kvikio_threads, gds_threshold=0)
        before = nvfs_read_counters()
        handles, futures = [], []
        cufile = fallback = 0
        try:
            for path, offset, nbytes, dst in ranges:
                if not nbytes:
                    continue
                handle = kvikio.CuFile(path, "r")
                handles.append(handle)
                fallback += without_direct_io(handle)
                # kvikio splits an unaligned range into aligned tasks itself; one range
                # per shard is large, so the unaligned head and tail are negligible.
                futures.append((handle.pread(buffer[dst:dst + nbytes], nbytes, offset),
                                nbytes, path))
                cufile += nbytes
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
        self._path_evidence = f"kvikio reads: {evidence}"

    # ----------------------------------------------------------------- whole

    def _load(self) -> None:
        import cupy

        c = self.config
        device = cuda_device_index(c.device)
        torch.cuda.set_device(device)
        S, ranges, dst = self.sample_bytes, [], 0
        for s, (path, offset) in zip(c.shards, self._shard_files(), strict=True):
            ranges.append((path, offset + s.start * S, len(s) * S, dst))
            dst += len(s) * S
        with cupy.cuda.Device(device):
            buffer = cupy.empty(max(1, self.data_bytes), dtype=cupy.uint8)
            self._copy(cupy, buffer, ranges)
        _PENDING.pop(id(self), None)  # now in use: free memory shows it
        self._buffer = buffer
        self._images = torch.from_dlpack(buffer)[:self.data_bytes].view(
            c.num_samples, *c.image_shape)
        self._labels = torch.from_numpy(c.labels).to(c.device)
        self.io_evidence = f"whole: {self._path_evidence}"

    # ----------------------------------------------------------------- windowed

    def _start_window(self) -> None:
        """Allocate the window's two halves and the loader thread."""
        import cupy

        c, residency = self.config, self.residency
        assert residency is not None
        device = cuda_device_index(c.device)
        torch.cuda.set_device(device)
        self._shard_files()  # refuse a bad layout here, not on the loader thread
        with cupy.cuda.Device(device):
            self._buffer = cupy.empty(residency.vram_bytes, dtype=cupy.uint8)
        _PENDING.pop(id(self), None)
        self._images = torch.from_dlpack(self._buffer).view(2 * residency.half, *c.image_shape)
        self._labels = torch.from_numpy(c.labels).to(c.device)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cupy-window")

    def _load_block(self, block: tuple[Segment, ...], after: Any, blocks: int) -> None:
        """On the loader thread: copy one block's segments into their half, once the
        gathers recorded by ``after`` (a CUDA event) no longer read that half."""
        import cupy

        if after is not None:
            after.synchronize()
        S, files = self.sample_bytes, self._shard_files()
        ranges = [(files[g.shard][0], files[g.shard][1] + g.index * S, g.count * S, g.row * S)
                  for g in block]
        with cupy.cuda.Device(cuda_device_index(self.config.device)):
            self._copy(cupy, self._buffer, ranges)
        half = self.residency.half if self.residency else 0
        self.io_evidence = (f"windowed: 2 x {half} samples ({format_gib(2 * half * S)} GiB) "
                            f"in VRAM, {blocks} block loads an epoch; {self._path_evidence}")

    def _schedule(self, epoch: int) -> WindowSchedule:
        c, residency = self.config, self.residency
        assert residency is not None
        return window_schedule([len(s) for s in c.shards], [s.start for s in c.shards],
                               half=residency.half, batch_size=c.batch_size, seed=c.seed,
                               epoch=epoch, shuffle=c.shuffle)

    def _epoch_windowed(self, epoch: int) -> Iterator[Batch]:
        self._drain()  # an abandoned epoch's loads finish before this one reuses the halves
        if self._images is None:
            self._start_window()
        assert self._pool is not None and self._images is not None and self._labels is not None
        device, schedule = self.config.device, self._schedule(epoch)
        rows = torch.from_numpy(schedule.rows)
        loads: dict[int, Future[None]] = {}
        gathered = self._gathered  # CUDA event after the latest batch's gathers, any epoch
        for kind, k in schedule.steps:
            if kind == "load":
                loads[k] = self._pool.submit(self._load_block, schedule.blocks[k], gathered,
                                             len(schedule.blocks))
                self._inflight.append(loads[k])
                continue
            lo, hi = schedule.spans[k]
            for j in range(lo, hi + 1):
                loads[j].result()  # waits for the block (a data wait) and raises its errors
            pos = torch.from_numpy(schedule.batches[k])
            images = self._images[rows[pos].to(device, non_blocking=True)]
            labels = self._labels[pos.to(device, non_blocking=True)]
            gathered = self._gathered = torch.cuda.Event()
            gathered.record()
            yield Batch(images=images, labels=labels, positions=pos,
                        bytes_read=len(pos) * self.sample_bytes)
        self._inflight.clear()

    def _drain(self) -> None:
        """Wait for loads still in flight (their errors belong to an abandoned epoch)."""
        wait(self._inflight)
        self._inflight.clear()

    # ----------------------------------------------------------------- epochs

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self.residency is not None and self.residency.mode == WINDOWED:
            return list(self._schedule(epoch).batches)
        return super().batches(epoch)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self.residency is None:
            self.check_fits()
        assert self.residency is not None
        if self.residency.mode == WINDOWED:
            yield from self._epoch_windowed(epoch)
            return
        if self._images is None:
            self._load()
        assert self._images is not None and self._labels is not None
        device = self.config.device
        for positions in self.batches(epoch):
            pos = torch.from_numpy(positions)
            idx = pos.to(device, non_blocking=True)
            yield Batch(images=self._images[idx], labels=self._labels[idx], positions=pos,
                        bytes_read=len(positions) * self.sample_bytes)

    def resources(self) -> dict[str, int]:
        """The thread that loads (the main thread whole, the loader thread windowed), or
        kvikio's pool where the load used it (bounded by ``--workers``)."""
        return {"threads": max(1, self._kvikio_threads), "processes": 0}

    def release(self) -> None:
        """Nothing stays mapped between loads; wait for any in flight to unmap theirs."""
        self._drain()

    def close(self) -> None:
        _PENDING.pop(id(self), None)
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._images = self._labels = None
        if self._buffer is not None:
            import cupy

            self._buffer = self._staging = None
            # Hand the pool's blocks back, so a following run in this process has them.
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
