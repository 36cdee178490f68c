"""The ``cupy`` loader's residency: the whole rank in VRAM, or a double-buffered window.

Pure Python and NumPy, so the schedule is tested on the CPU (``tests/node/test_cupy_window.py``);
:mod:`node.loaders.cupy_loader` carries it out with CuPy.

**Which mode** (:func:`choose_residency`): the rank's images stay whole in GPU memory when
they fit in what is spare (free VRAM less the other pending ``cupy`` loader and the
training reserve) and under the user's cap (``FORMATLAB_CUPY_VRAM_MIB``, unset: no
cap). Otherwise the loader runs *windowed* with a window of ``2 x half`` samples taking
at most half of what is spare (the rest is left for the val loader and activations) and
at most the cap; a window that cannot hold two batches is refused.

**Windowed epoch** (:func:`window_schedule`), from ``(seed, epoch)``:

1. the rank's shard slices are put in a random order and concatenated into one stream;
2. the stream is cut into blocks of ``half`` samples (the last may be shorter); block
   ``j`` is loaded into half ``j % 2`` of the window;
3. each block's samples are shuffled; the epoch's order is the blocks' orders in turn,
   and its batches are consecutive chunks of that order (all full but the last), so the
   batch count is the same as in whole mode and on every rank of equal size.

Since ``half >= batch_size``, a batch touches at most two consecutive blocks. Block
``j + 2`` is loaded into block ``j``'s half right after the last batch that touches
block ``j``, and block ``j + 1`` is loading while block ``j`` trains: at most two blocks
(``2 x half`` samples) are resident at any time. A bound in samples, not shards: shards
differ in size and a rank's slice of one can be a handful of samples, so only samples
bound bytes. Without shuffling (val) the order is the sequence itself, as in whole mode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

WHOLE, WINDOWED = "whole", "windowed"
CAP_ENV = "FORMATLAB_CUPY_VRAM_MIB"


class Residency(NamedTuple):
    """How a cupy loader holds its data: ``mode`` (whole or windowed), the VRAM bytes it
    takes, and ``half`` (samples per half-window; 0 when whole)."""

    mode: str
    vram_bytes: int
    half: int = 0


def vram_cap(environ: dict[str, str] | None = None) -> int | None:
    """The user's cap on a cupy loader's data in VRAM, bytes (``$FORMATLAB_CUPY_VRAM_MIB``)."""
    raw = (os.environ if environ is None else environ).get(CAP_ENV, "").strip()
    if not raw:
        return None
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"{CAP_ENV}={raw!r} is not a number of MiB") from None
    if mib <= 0:
        raise ValueError(f"{CAP_ENV}={raw!r} must be positive")
    return int(mib * (1 << 20))


def choose_residency(*, num_samples: int, sample_bytes: int, batch_size: int,
                     spare_bytes: int, cap_bytes: int | None = None) -> Residency | None:
    """Whole when the data fits in ``spare_bytes`` (and the cap), else a window; None
    when not even a window of two batches fits.

    Args:
        spare_bytes: free VRAM less what other loaders were promised and the reserve.
    """
    data = num_samples * sample_bytes
    limit = spare_bytes if cap_bytes is None else min(spare_bytes, cap_bytes)
    if data <= limit:
        return Residency(WHOLE, data)
    window = spare_bytes // 2 if cap_bytes is None else min(spare_bytes // 2, cap_bytes)
    half = min(window // (2 * sample_bytes), -(-num_samples // 2))
    if half < max(1, batch_size):
        return None
    return Residency(WINDOWED, 2 * half * sample_bytes, half)


def smallest_window(sample_bytes: int, batch_size: int) -> int:
    """Bytes of the smallest window :func:`choose_residency` accepts: two batches."""
    return 2 * max(1, batch_size) * sample_bytes


class Segment(NamedTuple):
    """A run of one shard slice's samples loaded together: ``shard`` (number in the
    rank's slices), ``index`` (first sample's index inside the shard file), ``count``,
    ``position`` (first sample's place in the rank's sequence) and ``row`` (its row in
    the window buffer)."""

    shard: int
    index: int
    count: int
    position: int
    row: int


@dataclass(frozen=True)
class WindowSchedule:
    """One windowed epoch.

    Attributes:
        half: samples per half of the window (the buffer has ``2 * half`` rows).
        blocks: each block's segments, in stream (load) order.
        batches: the epoch's batches of rank positions, in delivery order.
        rows: (n,) the window row holding each rank position (indexed by position).
        spans: (first block, last block) each batch touches.
        steps: what to do in order: ``("load", j)`` or ``("batch", b)``.
    """

    half: int
    blocks: tuple[tuple[Segment, ...], ...]
    batches: tuple[np.ndarray, ...]
    rows: np.ndarray
    spans: tuple[tuple[int, int], ...]
    steps: tuple[tuple[str, int], ...]


def _blocks(lengths: Sequence[int], starts: Sequence[int], shard_order: np.ndarray,
            half: int) -> list[list[Segment]]:
    """Cut the shards, in ``shard_order``, into blocks of ``half`` samples."""
    first_position = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    blocks: list[list[Segment]] = [[]]
    filled = 0
    for shard in shard_order.tolist():
        done = 0
        while done < lengths[shard]:
            if filled == half:
                blocks.append([])
                filled = 0
            count = min(lengths[shard] - done, half - filled)
            row = (len(blocks) - 1) % 2 * half + filled
            blocks[-1].append(Segment(shard, starts[shard] + done, count,
                                      int(first_position[shard]) + done, row))
            done += count
            filled += count
    return blocks if blocks[0] else []


def _steps(block_ends: np.ndarray, batch_size: int, num_batches: int) -> list[tuple[str, int]]:
    """Loads and batches in order: blocks 0 and 1 first, block ``j + 2`` after the last
    batch touching block ``j``."""
    last_batch = (block_ends - 1) // batch_size  # last batch touching each block
    steps = [("load", j) for j in range(min(2, len(block_ends)))]
    ending: dict[int, list[int]] = {}
    for j, b in enumerate(last_batch.tolist()):
        ending.setdefault(b, []).append(j)
    for b in range(num_batches):
        steps.append(("batch", b))
        steps += [("load", j + 2) for j in ending.get(b, []) if j + 2 < len(block_ends)]
    return steps


def window_schedule(lengths: Sequence[int], starts: Sequence[int], *, half: int,
                    batch_size: int, seed: int, epoch: int,
                    shuffle: bool = True) -> WindowSchedule:
    """The windowed epoch ``epoch`` over the rank's shard slices (see module docstring).

    Args:
        lengths, starts: each slice's sample count and first index inside its shard, in
            the rank's sequence order.
        half: samples per half-window, at least ``batch_size``.
    """
    if half < batch_size or batch_size < 1:
        raise ValueError(f"half-window of {half} samples cannot hold a batch of {batch_size}")
    rng = np.random.default_rng([seed, epoch, 0x77])
    shard_order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    blocks = _blocks(lengths, starts, shard_order, half)
    n = int(sum(lengths))
    rows = np.empty(n, dtype=np.int64)
    pieces = []
    for block in blocks:
        positions = np.concatenate([np.arange(s.position, s.position + s.count)
                                    for s in block])
        rows[positions] = np.concatenate([np.arange(s.row, s.row + s.count) for s in block])
        pieces.append(rng.permutation(positions) if shuffle else positions)
    order = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    batches = tuple(order[i:i + batch_size] for i in range(0, n, batch_size))
    ends = np.cumsum([sum(s.count for s in block) for block in blocks]).astype(np.int64)
    spans = tuple((int(np.searchsorted(ends, i, side="right")),
                   int(np.searchsorted(ends, min(i + batch_size, n) - 1, side="right")))
                  for i in range(0, n, batch_size))
    return WindowSchedule(half, tuple(tuple(b) for b in blocks), batches, rows, spans,
                          tuple(_steps(ends, batch_size, len(batches))))
