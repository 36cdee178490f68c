"""Aligned read plans for GPUDirect Storage: which byte ranges to read from a ``.npy``
so every read starts on a 4 KiB page, and where each sample lands in the staging buffer.

Pure functions, no GPU: :mod:`node.loaders.kvikio_loader` (and the ``cupy`` loader
through it) use them; the tests check them on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALIGN = 4096  # GDS's page: direct DMA needs file offsets (and buffers) on 4 KiB boundaries


def aligned_start(ptr: int, align: int = ALIGN) -> int:
    """Bytes to skip from address ``ptr`` to the next ``align`` boundary.

    CuPy's memory pool hands out 512-byte-aligned blocks (cupy/cuda/memory.pyx,
    ``ALLOCATION_UNIT_SIZE``); GDS wants 4 KiB-aligned GPU buffers for direct DMA.
    """
    return -ptr % align


def align_down(x: int, align: int = ALIGN) -> int:
    return x // align * align


def align_up(x: int, align: int = ALIGN) -> int:
    return -(-x // align) * align


def sample_runs(sorted_indices: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive indices in a sorted, unique array: ``(first, count)``."""
    idx = np.asarray(sorted_indices, dtype=np.int64)
    if not idx.size:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return [(int(idx[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


@dataclass(frozen=True)
class ReadRange:
    """One read: ``size`` bytes at ``file_offset`` into the staging buffer at ``buffer_offset``."""

    file_offset: int
    size: int
    buffer_offset: int


@dataclass(frozen=True)
class ReadPlan:
    """The reads for one file and where each run of samples lands in the staging buffer.

    Attributes:
        ranges: the reads, in file order, each at a 4 KiB-aligned buffer offset.
        runs: ``(first index, count, buffer offset of the first sample's data)``.
        nbytes: staging bytes the plan needs.
    """

    ranges: tuple[ReadRange, ...]
    runs: tuple[tuple[int, int, int], ...]
    nbytes: int

    @property
    def read_bytes(self) -> int:
        return sum(r.size for r in self.ranges)


def plan_reads(sorted_indices: np.ndarray, *, data_offset: int, sample_bytes: int,
               file_size: int, align: int = ALIGN, buffer_base: int = 0) -> ReadPlan:
    """Coalesce the samples of one ``.npy`` into aligned covering reads.

    Args:
        sorted_indices: sorted, unique sample indices inside the file.
        data_offset: where sample 0 starts (the header length).
        sample_bytes: bytes per sample.
        file_size: the file's size; a covering read never goes past it.
        align: the alignment of file offsets and buffer offsets.
        buffer_base: the staging offset the plan starts at (a multiple of ``align``).
    """
    runs = sample_runs(sorted_indices)
    spans: list[list[int]] = []  # merged aligned [start, end) file ranges
    run_span: list[int] = []
    for first, count in runs:
        start = data_offset + first * sample_bytes
        end = start + count * sample_bytes
        if end > file_size:
            raise ValueError(f"samples {first}..{first + count - 1} end at byte {end}, "
                             f"past the file's {file_size} bytes")
        a, b = align_down(start, align), min(align_up(end, align), file_size)
        if spans and a <= spans[-1][1]:  # overlaps or touches the previous read
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
        run_span.append(len(spans) - 1)
    ranges = []
    cursor = buffer_base
    for a, b in spans:
        ranges.append(ReadRange(file_offset=a, size=b - a, buffer_offset=cursor))
        cursor += align_up(b - a, align)
    placed = tuple(
        (first, count,
         ranges[k].buffer_offset + data_offset + first * sample_bytes - ranges[k].file_offset)
        for (first, count), k in zip(runs, run_span, strict=True))
    return ReadPlan(tuple(ranges), placed, cursor - buffer_base)
