"""The ``packed`` loader's members streamed from the store URL (``--no-cache``).

:class:`StreamedMembers` reads from the shard's URL in the store. A streamed epoch is not
a permutation of the whole rank (its first batch would wait for nearly every byte): it
is :func:`stream_schedule`'s block order, the rank's shards in a random order cut into
blocks of about :data:`BLOCK_BYTES` of tar (at least one batch), each block's samples
shuffled, as the peers (WebDataset, LitData, Mosaic Streaming) shuffle when they stream.
When the epoch starts, a background thread fetches its blocks in that order (in parts of
:data:`PART_BYTES`, :data:`FETCH_THREADS` ranged GETs in flight through
:class:`shared.storage.Store`, so errors are redacted as everywhere) as far ahead as the
loader's read-ahead allows (what the host staging budget leaves,
:meth:`node.loaders.packed.PackedThreadLoader.staging_bound`, at most
:data:`STREAM_BUFFER_BYTES`); a block is dropped once the last batch that reads it is
delivered. Where not even two consecutive blocks fit, each member is fetched by a ranged
GET of its bytes. Nothing is kept between epochs: every epoch streams again.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from node.loaders.packed_io import LocalMembers, _gather_loop, _layout, _Shard
from node.loaders.window import WindowSchedule, window_schedule
from shared.formats.base import is_url
from shared.formats.wds import TAR_NAME

PART_BYTES = 8 << 20  # one ranged GET of a block fetch
FETCH_THREADS = 4  # block parts in flight
STREAM_BUFFER_BYTES = 4 << 30  # streamed blocks held in memory at most, per loader (the
# read-ahead is less where the host staging budget leaves less)


BLOCK_BYTES = 16 << 20  # a streamed epoch's blocks: about this many tar bytes each


def stream_schedule(shards: Sequence[_Shard], slices: Sequence[Any], *, batch_size: int,
                    seed: int, epoch: int, shuffle: bool = True) -> WindowSchedule:
    """A streamed epoch's order: :func:`node.loaders.window.window_schedule` over the
    rank's slices (shards in a random order, cut into blocks, each block's samples
    shuffled), with blocks of about :data:`BLOCK_BYTES` of tar and at least one batch.

    A streamed epoch can then start on its first block instead of waiting for nearly all
    of the rank's bytes, as a permutation of the whole rank would make it (the peers,
    WebDataset, LitData and Mosaic Streaming, shuffle by shard and block the same way).
    """
    lengths = [s.stop - s.start for s in slices]
    n = sum(lengths)
    span = sum(int(sh.offsets[s.stop - 1] + sh.sizes[s.stop - 1] - sh.offsets[s.start])
               for sh, s in zip(shards, slices, strict=True) if s.stop > s.start)
    per_sample = max(1.0, span / max(1, n))
    half = max(batch_size, min(n, int(BLOCK_BYTES / per_sample)))
    return window_schedule(lengths, [s.start for s in slices], half=half,
                           batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle)


class _BlockPlan(NamedTuple):
    """Where a streamed epoch's blocks lie in the tars, and where each member lands.

    A block is one or more segments (runs of consecutive members of one shard); its copy
    holds each segment's byte range, headers between members included, one after the
    other. Member bytes of rank position ``p`` (shard ``s``, index ``i``:
    ``p = first_position[s] + i``) at tar offset ``o`` are at
    ``segment_at[g] + o - segment_lo[g]`` of block ``segment_block[g]``'s copy, where
    ``g = segment_of[p]``.
    """

    block_bytes: np.ndarray  # (B,) bytes of each block's copy
    parts: list[list[tuple[int, int, int, int]]]  # per block: (shard, lo, hi, at), GETs
    last_batch: np.ndarray  # (B,) the last batch that reads each block
    first_position: np.ndarray  # (S,)
    segment_of: np.ndarray  # (n,)
    segment_block: np.ndarray
    segment_at: np.ndarray
    segment_lo: np.ndarray

    @classmethod
    def of(cls, shards: Sequence[_Shard], shard_map: Any, schedule: WindowSchedule
           ) -> _BlockPlan:
        segment_of = np.empty(len(shard_map.labels), np.int64)
        seg_block: list[int] = []
        seg_at: list[int] = []
        seg_lo: list[int] = []
        block_bytes, parts = [], []
        for j, block in enumerate(schedule.blocks):
            at, mine = 0, []
            for seg in block:
                shard, last = shards[seg.shard], seg.index + seg.count - 1
                lo = int(shard.offsets[seg.index])
                hi = int(shard.offsets[last] + shard.sizes[last])
                segment_of[seg.position:seg.position + seg.count] = len(seg_block)
                seg_block.append(j)
                seg_at.append(at)
                seg_lo.append(lo)
                mine += [(seg.shard, p, min(hi, p + PART_BYTES), at + p - lo)
                         for p in range(lo, hi, PART_BYTES)]
                at += hi - lo
            block_bytes.append(at)
            parts.append(mine)
        last_batch = np.zeros(len(schedule.blocks), np.int64)
        for b, (first, last) in enumerate(schedule.spans):
            last_batch[first:last + 1] = b
        return cls(np.array(block_bytes, np.int64), parts, last_batch,
                   (shard_map.bounds[:-1] - shard_map.starts).astype(np.int64), segment_of,
                   np.array(seg_block, np.int64), np.array(seg_at, np.int64),
                   np.array(seg_lo, np.int64))


class StreamedMembers:
    """Members read from the store URL: blocks of the epoch fetched ahead, in the order
    the epoch needs them, within the read-ahead; ranged GETs of single members when not
    even two blocks fit (or no epoch was planned, as in a DataLoader worker)."""

    remote = True

    def __init__(self, shards: Sequence[_Shard], storage_options: dict[str, Any],
                 buffer_bytes: int = STREAM_BUFFER_BYTES) -> None:
        self.shards = list(shards)
        self.storage_options = storage_options
        self.buffer_bytes = buffer_bytes
        self.fetched_bytes = 0  # bytes received from the store, block fetches included
        self.peak_held_bytes = 0  # most block bytes held at once (within buffer_bytes)
        self._stores: list[Any] = []
        _gather_loop()
        self._reset()

    def _reset(self) -> None:
        self._plan: _BlockPlan | None = None  # None: every member by a ranged GET
        self._copies: dict[int, np.ndarray] = {}
        self._ready: list[threading.Event] = []
        self._pending: list[int] = []
        self._held = 0
        self._released = 0  # blocks 0.._released - 1 are dropped
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._room = threading.Condition()
        self._thread: threading.Thread | None = None

    def _store(self, s: int) -> Any:
        """Shard ``s``'s folder as a :class:`~shared.storage.Store` (the same fsspec
        instance, and session, as the node's index reads)."""
        from shared.storage import Store

        if not self._stores:
            self._stores = [Store.open(sh.location, self.storage_options) for sh in self.shards]
        return self._stores[s]

    def start_epoch(self, shard_map: Any, schedule: WindowSchedule | None) -> None:
        """Start fetching ``schedule``'s blocks in order, as far ahead as
        :attr:`buffer_bytes` allows (a block is dropped once its last batch is
        :meth:`finished`). Without a schedule, or when two consecutive blocks do not fit
        (a batch can read both), members are fetched by ranged GETs as batches ask."""
        self.end_epoch()
        if schedule is None or not schedule.blocks:
            return
        plan = _BlockPlan.of(self.shards, shard_map, schedule)
        sizes = plan.block_bytes
        pair = sizes[:-1] + sizes[1:] if len(sizes) > 1 else sizes  # a batch spans two blocks
        if int(pair.max()) > self.buffer_bytes:
            return
        self._store(0)  # opened here, before the fetch threads share it
        self._plan = plan
        self._ready = [threading.Event() for _ in plan.parts]
        self._pending = [len(parts) for parts in plan.parts]
        self._thread = threading.Thread(target=self._fetch_blocks, name="packed-stream",
                                        daemon=True)
        self._thread.start()

    def _fetch_blocks(self) -> None:
        """Fetch the plan's blocks in order, in parts, :data:`FETCH_THREADS` GETs in
        flight; block ``j`` is allocated only once it fits beside the blocks still held
        (the first always does)."""
        plan = self._plan
        assert plan is not None
        try:
            with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="packed-fetch") as pool:
                for j, nbytes in enumerate(plan.block_bytes.tolist()):
                    with self._room:
                        while (self._held and self._held + nbytes > self.buffer_bytes
                               and not self._stop.is_set()):
                            self._room.wait()
                        if self._stop.is_set():
                            pool.shutdown(cancel_futures=True)
                            return
                        self._held += nbytes
                        self.peak_held_bytes = max(self.peak_held_bytes, self._held)
                        copy = self._copies[j] = np.empty(nbytes, np.uint8)
                    if not plan.parts[j]:
                        self._ready[j].set()
                    for part in plan.parts[j]:
                        pool.submit(self._get, j, copy, *part)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading threads
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        for event in self._ready:
            event.set()

    def _get(self, j: int, copy: np.ndarray, s: int, lo: int, hi: int, at: int) -> None:
        """Bytes ``lo..hi`` of shard ``s``'s tar into block ``j``'s copy at ``at``."""
        try:
            if self._stop.is_set():
                return
            data = self._store(s).read_bytes(TAR_NAME, lo, hi)
            if len(data) != hi - lo:
                raise OSError(f"got {len(data)} of bytes {lo}..{hi}")
            copy[at:at + hi - lo] = np.frombuffer(data, np.uint8)
            with self._room:
                self.fetched_bytes += hi - lo
                self._pending[j] -= 1
                if self._pending[j]:
                    return
            self._ready[j].set()
        except BaseException as exc:  # noqa: BLE001 - handed to the reading threads
            self._fail(exc)

    def read(self, shard_no: np.ndarray, index: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The members' bytes in one buffer, with each one's start and size in it."""
        offsets, sizes, buf, starts = _layout(self.shards, shard_no, index)
        plan = self._plan
        if plan is None:
            self._read_ranged(shard_no, offsets, sizes, buf, starts)
            return buf, starts, sizes
        segment = plan.segment_of[plan.first_position[shard_no] + index]
        block = plan.segment_block[segment]
        at = plan.segment_at[segment] + offsets - plan.segment_lo[segment]
        for j in np.unique(block).tolist():
            self._ready[j].wait()
            if self._error is not None:
                from shared.storage import one_line

                s = int(shard_no[0])
                raise OSError(f"{self._store(s).display_url}/{TAR_NAME}: streaming failed: "
                              f"{one_line(self._error)}")
            mine = block == j
            _gather_loop()(self._copies[j], at[mine], sizes[mine], buf, starts[mine])
        return buf, starts, sizes

    def finished(self, seq: int) -> None:
        """Batches up to ``seq`` are delivered: drop the blocks no later batch reads."""
        plan = self._plan
        if plan is None:
            return
        with self._room:
            while (self._released < len(plan.last_batch)
                   and plan.last_batch[self._released] <= seq):
                self._copies.pop(self._released, None)
                self._held -= int(plan.block_bytes[self._released])
                self._released += 1
            self._room.notify_all()

    def _read_ranged(self, shard_no: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                     buf: np.ndarray, starts: np.ndarray) -> None:
        """Every member by one ranged GET of its bytes, all in flight."""
        if not len(sizes):
            return
        fs = self._store(int(shard_no[0])).fs
        shards = shard_no.tolist()
        got = fs.cat_ranges([self._store(s).path(TAR_NAME) for s in shards],
                            offsets.tolist(), (offsets + sizes).tolist(), on_error="return")
        for k, data in enumerate(got):
            if isinstance(data, BaseException) or len(data) != sizes[k]:
                url = self._store(shards[k]).display_url
                raise OSError(f"{url}/{TAR_NAME}: ranged read at {offsets[k]} failed")
            buf[starts[k]:starts[k] + sizes[k]] = np.frombuffer(data, np.uint8)
            self.fetched_bytes += len(data)

    def end_epoch(self) -> None:
        """Stop fetching and drop the block copies (the next epoch streams again)."""
        self._stop.set()
        with self._room:
            self._room.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._reset()

    def close(self) -> None:
        self.end_epoch()

    def __getstate__(self) -> dict[str, Any]:
        return {"shards": self.shards, "storage_options": self.storage_options,
                "buffer_bytes": self.buffer_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shards"], state["storage_options"],  # type: ignore[misc]
                      state["buffer_bytes"])


def open_source(shards: Sequence[_Shard], storage_options: dict[str, Any],
                stream_bytes: int = STREAM_BUFFER_BYTES) -> LocalMembers | StreamedMembers:
    """Members from the cached tars, or streamed when the shards' locations are URLs
    (blocks held up to ``stream_bytes``)."""
    if shards and is_url(shards[0].location):
        return StreamedMembers(shards, storage_options, stream_bytes)
    return LocalMembers(shards)
