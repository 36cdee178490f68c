"""Where the ``packed`` loader's member bytes come from: the cached tar, or the store URL.

:class:`LocalMembers` reads each member with one ``os.preadv`` into a batch buffer
(descriptors opened lazily per process, closed by :meth:`close` so ``--cold`` can
evict the tar's pages). :class:`StreamedMembers` (``--no-cache``) reads from the
shard's URL in the store: when an epoch starts, a background thread fetches whole
shards (in parts of :data:`PART_BYTES`, several ranged GETs in flight through fsspec,
s3fs's own event loop for S3) in the order the epoch first needs them, up to
:data:`STREAM_BUFFER_BYTES` held in memory; batches take their members from those
copies as they arrive, and members of shards beyond the budget are fetched by ranged
GETs of just their bytes. Nothing is kept between epochs: every epoch streams again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from shared.formats.base import is_url
from shared.formats.wds import TAR_NAME

PART_BYTES = 8 << 20  # one ranged GET of a whole-shard fetch
STREAM_BUFFER_BYTES = 4 << 30  # streamed shards held in memory at most, per loader


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
    """Members read with ``os.preadv`` from the cached tars."""

    remote = False

    def __init__(self, shards: Sequence[_Shard]) -> None:
        self.shards = list(shards)
        self.paths = [os.path.join(s.location, TAR_NAME) for s in shards]
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
        view = memoryview(buf)
        for s, offset, start, size in zip(shard_no.tolist(), offsets.tolist(), starts.tolist(),
                                          sizes.tolist()):
            if os.preadv(self._fd(s), [view[start:start + size]], offset) != size:
                raise OSError(f"{self.paths[s]}: member at {offset} is truncated")
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
        self.urls = [f"{s.location.rstrip('/')}/{TAR_NAME}" for s in shards]
        self.storage_options = storage_options
        self.buffer_bytes = buffer_bytes
        self.fetched_bytes = 0  # bytes received from the store, whole-shard fetches included
        self._fs: Any = None
        self._reset()

    def _reset(self) -> None:
        self._copies: dict[int, np.ndarray] = {}
        self._ready: dict[int, threading.Event] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _filesystem(self) -> tuple[Any, list[str]]:
        import fsspec.core

        if self._fs is None:
            self._fs, _ = fsspec.core.url_to_fs(self.urls[0], **self.storage_options)
        return self._fs, [self._fs._strip_protocol(u) for u in self.urls]

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
        try:
            fs, paths = self._filesystem()
            for s in order:
                if self._stop.is_set():
                    return
                end = self._end(s)
                starts = list(range(0, end, PART_BYTES))
                ends = [min(end, lo + PART_BYTES) for lo in starts]
                parts = fs.cat_ranges([paths[s]] * len(starts), starts, ends)
                copy = np.empty(end, np.uint8)
                for lo, part in zip(starts, parts, strict=True):
                    if isinstance(part, BaseException):
                        raise part
                    copy[lo:lo + len(part)] = np.frombuffer(part, np.uint8)
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
                raise OSError(f"{self.urls[s]}: streaming failed: {self._error}")
            copy, lo = self._copies[s], int(offsets[k])
            buf[starts[k]:starts[k] + sizes[k]] = copy[lo:lo + sizes[k]]
        if ranged:
            fs, paths = self._filesystem()
            got = fs.cat_ranges([paths[shard_no[k]] for k in ranged],
                                [int(offsets[k]) for k in ranged],
                                [int(offsets[k] + sizes[k]) for k in ranged])
            for k, data in zip(ranged, got, strict=True):
                if isinstance(data, BaseException) or len(data) != sizes[k]:
                    raise OSError(f"{self.urls[shard_no[k]]}: ranged read at {offsets[k]} failed")
                buf[starts[k]:starts[k] + sizes[k]] = np.frombuffer(data, np.uint8)
                self.fetched_bytes += len(data)
        return buf, starts, sizes

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


def open_source(shards: Sequence[_Shard],
                storage_options: dict[str, Any]) -> LocalMembers | StreamedMembers:
    """Members from the cached tars, or streamed when the shards' locations are URLs."""
    if shards and is_url(shards[0].location):
        return StreamedMembers(shards, storage_options)
    return LocalMembers(shards)
