"""Where the ``packed`` loader's member bytes come from: the cached tar, or the store URL.

:class:`LocalMembers` reads each member with one ``pread(2)`` into a batch buffer, the
loop over members compiled (:func:`pread_members`); descriptors are opened lazily per
process and closed by :meth:`LocalMembers.close`, so ``--cold`` can evict the tar's pages.
:class:`StreamedMembers` (``--no-cache``) reads from the shard's URL in the store: when
an epoch starts, a background thread fetches whole shards (in parts of
:data:`PART_BYTES`, :data:`FETCH_THREADS` ranged GETs in flight through
:class:`shared.storage.Store`, so errors are redacted as everywhere) in the order the
epoch first needs them, up to the loader's read-ahead held in memory (what the host
staging budget leaves, :meth:`node.loaders.packed.PackedThreadLoader.staging_bound`, at
most :data:`STREAM_BUFFER_BYTES`); batches take their members from those copies as they
arrive, and members of shards beyond the budget are fetched by ranged GETs of just
their bytes. Nothing is kept between epochs: every epoch streams again.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from shared.formats.base import is_url
from shared.formats.wds import TAR_NAME

PART_BYTES = 8 << 20  # one ranged GET of a whole-shard fetch
FETCH_THREADS = 4  # whole-shard parts in flight
STREAM_BUFFER_BYTES = 4 << 30  # streamed shards held in memory at most, per loader (the
# read-ahead is less where the host staging budget leaves less)


@functools.cache
def _pread_loop() -> Any:
    """``pread(2)`` over a run of members, compiled by numba (nogil) when first asked for:
    one Python call per batch chunk, none per member."""
    import numba

    libc = ctypes.CDLL(None)
    pread = libc.pread
    pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
    pread.restype = ctypes.c_ssize_t

    @numba.njit("int64(int64[::1], int64[::1], int64[::1], int64, int64[::1])", nogil=True)
    def loop(fds: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, dst: int,
             starts: np.ndarray) -> int:
        for k in range(len(fds)):
            done = 0
            while done < sizes[k]:
                got = pread(fds[k], dst + starts[k] + done, sizes[k] - done, offsets[k] + done)
                if got <= 0:
                    return k
                done += got
        return -1

    return loop


def pread_members(fds: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, buf: np.ndarray,
                  starts: np.ndarray) -> int:
    """Read member ``k`` (``sizes[k]`` bytes at ``offsets[k]`` of descriptor ``fds[k]``)
    into ``buf[starts[k]:]``, for every ``k``; -1, or the first ``k`` that came up short
    (end of file or a read error)."""
    if not len(fds):
        return -1
    return int(_pread_loop()(np.ascontiguousarray(fds, np.int64), offsets, sizes,
                             buf.ctypes.data, starts))


class _Shard(Protocol):
    location: str
    offsets: np.ndarray
    sizes: np.ndarray


def _layout(shards: Sequence[_Shard], shard_no: np.ndarray, index: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Offsets and sizes of the asked members, an empty buffer for them, and where each
    member starts in it."""
    offsets = np.empty(len(index), np.int64)
    sizes = np.empty(len(index), np.int64)
    for s in np.unique(shard_no).tolist():
        mask = shard_no == s
        offsets[mask] = shards[s].offsets[index[mask]]
        sizes[mask] = shards[s].sizes[index[mask]]
    starts = np.zeros(len(index), np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return offsets, sizes, np.empty(int(sizes.sum()), np.uint8), starts


class LocalMembers:
    """Members read with ``pread(2)`` from the cached tars."""

    remote = False

    def __init__(self, shards: Sequence[_Shard]) -> None:
        self.shards = list(shards)
        self.paths = [os.path.join(s.location, TAR_NAME) for s in shards]
        _pread_loop()  # compiled here, in the main process: forked workers inherit it
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def read(self, shard_no: np.ndarray, index: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The members' bytes in one buffer, with each one's start and size in it."""
        offsets, sizes, buf, starts = _layout(self.shards, shard_no, index)
        fds = np.full(len(self.shards), -1, np.int64)
        for s in np.unique(shard_no).tolist():
            fds[s] = self._fd(s)
        k = pread_members(fds[shard_no], offsets, sizes, buf, starts)
        if k >= 0:
            s = int(shard_no[k])
            raise OSError(f"{self.paths[s]}: member at {offsets[k]} is truncated or unreadable")
        return buf, starts, sizes

    def start_epoch(self, shard_map: Any, batches: Sequence[np.ndarray]) -> None:
        """Nothing to fetch ahead: the tars are on local disk."""

    def end_epoch(self) -> None:
        """Nothing held between epochs."""

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __getstate__(self) -> dict[str, Any]:
        return {"shards": self.shards, "paths": self.paths}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shards"])  # type: ignore[misc]


class StreamedMembers:
    """Members read from the store URL: whole shards fetched ahead, ranged GETs beyond."""

    remote = True

    def __init__(self, shards: Sequence[_Shard], storage_options: dict[str, Any],
                 buffer_bytes: int = STREAM_BUFFER_BYTES) -> None:
        self.shards = list(shards)
        self.storage_options = storage_options
        self.buffer_bytes = buffer_bytes
        self.fetched_bytes = 0  # bytes received from the store, whole-shard fetches included
        self._stores: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self._copies: dict[int, np.ndarray] = {}
        self._ready: dict[int, threading.Event] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _store(self, s: int) -> Any:
        """Shard ``s``'s folder as a :class:`~shared.storage.Store` (opened lazily: the
        same fsspec instance, and session, as the node's index reads)."""
        from shared.storage import Store

        if not self._stores:
            self._stores = [Store.open(sh.location, self.storage_options) for sh in self.shards]
        return self._stores[s]

    def start_epoch(self, shard_map: Any, batches: Sequence[np.ndarray]) -> None:
        """Start fetching the epoch's shards whole, in the order it first needs them."""
        self.end_epoch()
        if not batches:
            return
        first_use = shard_map.locate(np.concatenate(batches))[0]
        _, where = np.unique(first_use, return_index=True)
        order, held = [], 0
        for s in first_use[np.sort(where)].tolist():
            end = self._end(s)
            if held + end <= self.buffer_bytes:
                order.append(s)
                held += end
                self._ready[s] = threading.Event()
        self._thread = threading.Thread(target=self._fetch_shards, args=(order,),
                                        name="packed-stream", daemon=True)
        self._thread.start()

    def _end(self, s: int) -> int:
        shard = self.shards[s]
        return int(shard.offsets[-1] + shard.sizes[-1]) if len(shard.offsets) else 0

    def _fetch_shards(self, order: list[int]) -> None:
        """Fetch ``order``'s shards in parts, :data:`FETCH_THREADS` GETs in flight."""
        try:
            with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="packed-fetch") as pool:
                plan = []
                for s in order:
                    end = self._end(s)
                    parts = [(lo, min(end, lo + PART_BYTES)) for lo in range(0, end, PART_BYTES)]
                    plan.append((s, end, [(lo, hi, pool.submit(self._store(s).read_bytes,
                                                               TAR_NAME, lo, hi))
                                          for lo, hi in parts]))
                for s, end, parts in plan:
                    copy = np.empty(end, np.uint8)
                    for lo, hi, future in parts:
                        if self._stop.is_set():
                            pool.shutdown(cancel_futures=True)
                            return
                        data = future.result()
                        if len(data) != hi - lo:
                            raise OSError(f"got {len(data)} of bytes {lo}..{hi}")
                        copy[lo:hi] = np.frombuffer(data, np.uint8)
                    self.fetched_bytes += end
                    self._copies[s] = copy
                    self._ready[s].set()
        except BaseException as exc:  # noqa: BLE001 - handed to the reading threads
            self._error = exc
            for event in self._ready.values():
                event.set()

    def read(self, shard_no: np.ndarray, index: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The members' bytes in one buffer, with each one's start and size in it."""
        offsets, sizes, buf, starts = _layout(self.shards, shard_no, index)
        ranged = []
        for k, s in enumerate(shard_no.tolist()):
            ready = self._ready.get(s)
            if ready is None:
                ranged.append(k)
                continue
            ready.wait()
            if self._error is not None:
                from shared.storage import one_line

                raise OSError(f"{self._store(s).display_url}/{TAR_NAME}: streaming failed: "
                              f"{one_line(self._error)}")
            copy, lo = self._copies[s], int(offsets[k])
            buf[starts[k]:starts[k] + sizes[k]] = copy[lo:lo + sizes[k]]
        if ranged:
            self._read_ranged(shard_no, offsets, sizes, buf, starts, ranged)
        return buf, starts, sizes

    def _read_ranged(self, shard_no: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                     buf: np.ndarray, starts: np.ndarray, ranged: list[int]) -> None:
        """Members of shards not fetched whole: one ranged GET each, all in flight."""
        fs = self._store(int(shard_no[ranged[0]])).fs
        got = fs.cat_ranges([self._store(int(shard_no[k])).path(TAR_NAME) for k in ranged],
                            [int(offsets[k]) for k in ranged],
                            [int(offsets[k] + sizes[k]) for k in ranged], on_error="return")
        for k, data in zip(ranged, got, strict=True):
            if isinstance(data, BaseException) or len(data) != sizes[k]:
                url = self._store(int(shard_no[k])).display_url
                raise OSError(f"{url}/{TAR_NAME}: ranged read at {offsets[k]} failed")
            buf[starts[k]:starts[k] + sizes[k]] = np.frombuffer(data, np.uint8)
            self.fetched_bytes += len(data)

    def end_epoch(self) -> None:
        """Stop fetching and drop the shard copies (the next epoch streams again)."""
        self._stop.set()
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
    (whole shards held up to ``stream_bytes``)."""
    if shards and is_url(shards[0].location):
        return StreamedMembers(shards, storage_options, stream_bytes)
    return LocalMembers(shards)
