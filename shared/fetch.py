"""Fetching many files out of a store into local folders, for :meth:`Store.fetch_many`.

Each file goes to a temporary name beside its target, is hashed on the way (as it is
copied from a local store, or from the bytes received from an object store, so nothing
is read twice), is verified against its checksum and size and only then renamed into
place. This module never touches a filesystem object: the store hands it the reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import shutil
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import IO, Any, NamedTuple

from shared.killpoint import kill_point

CHECKSUM_ALGO = "blake2b"
_CHUNK = 4 << 20  # copy buffer
SMALL = 8 << 20  # object-store files up to this size are fetched whole into memory
_LOCAL_BATCH = 512  # local files copied between progress reports


class FetchItem(NamedTuple):
    """One file to fetch: its store path, its local target, what it must hash to."""

    src: str  # store-relative
    target: str  # local path
    checksum: str
    size: int | None  # None: unknown, not checked


# The reads a store hands in: whole object to bytes, object to a local file.
Cat = Callable[[str], bytes]
Get = Callable[[str, str], Any]
ErrorMap = Callable[[FetchItem, Exception], Exception]
Progress = Callable[[int], None]


def fetch_sync(items: Sequence[FetchItem], srcs: Sequence[str], *, local: bool, threads: int,
               cat: Cat, get: Get, on_error: ErrorMap, on_file: Progress) -> list[int | None]:
    """Local stores: one by one, progress per batch (a few system calls per file; threads
    creating files in one folder only contend for its lock, measured slower). Other
    synchronous file systems: a pool of ``threads``."""
    one = partial(_fetch_one, local=local, cat=cat, get=get, on_error=on_error)
    if local:
        sizes: list[int | None] = []
        for i in range(0, len(items), _LOCAL_BATCH):
            sizes += map(one, items[i:i + _LOCAL_BATCH], srcs[i:i + _LOCAL_BATCH])
            on_file(len(items[i:i + _LOCAL_BATCH]))
        return sizes

    def counted(item: FetchItem, src: str) -> int | None:
        size = one(item, src)
        if size is not None:
            on_file(1)
        return size

    with ThreadPoolExecutor(threads, thread_name_prefix="fetch") as pool:
        return list(pool.map(counted, items, srcs))


def _fetch_one(item: FetchItem, src: str, *, local: bool, cat: Cat, get: Get,
               on_error: ErrorMap) -> int | None:
    """Fetch one file to a temporary name, verify, rename; its size, or None if bad."""
    tmp = tmp_name(item.target)
    size = None
    try:
        try:
            if local:
                digest, size_read = copy_hashing(src, tmp)
            elif item.size is not None and item.size <= SMALL:
                data = cat(src)
                write_file(tmp, data)
                digest, size_read = checksum_bytes(data), len(data)
            else:
                get(src, tmp)
                digest, size_read = checksum_file(tmp), os.stat(tmp).st_size
        except Exception as exc:  # noqa: BLE001 - the store maps its own errors
            raise on_error(item, exc) from None
        size = commit(tmp, item, digest, size_read)
        return size
    finally:
        if size is None:
            unlink_quietly(tmp)


async def fetch_async(items: Sequence[FetchItem], srcs: Sequence[str], *, threads: int,
                      cat: Callable[[str], Awaitable[bytes]],
                      get: Callable[[str, str], Awaitable[Any]],
                      on_error: ErrorMap, on_file: Progress) -> list[int | None]:
    """``threads`` requests in flight on an async client's event loop, no thread hops."""
    gate = asyncio.Semaphore(threads)

    async def one(item: FetchItem, src: str) -> int | None:
        tmp = tmp_name(item.target)
        size = None
        try:
            async with gate:
                try:
                    if item.size is not None and item.size <= SMALL:
                        data = await cat(src)
                    else:
                        data = None
                        await get(src, tmp)
                except Exception as exc:  # noqa: BLE001 - mapped by the store
                    raise on_error(item, exc) from None
            if data is not None:
                write_file(tmp, data)
                size = commit(tmp, item, checksum_bytes(data), len(data))
            else:
                size = commit(tmp, item, checksum_file(tmp), os.stat(tmp).st_size)
            if size is not None:
                on_file(1)
            return size
        finally:
            if size is None:
                unlink_quietly(tmp)

    tasks = [asyncio.ensure_future(one(i, s)) for i, s in zip(items, srcs)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def commit(tmp: str, item: FetchItem, digest: str, size: int) -> int | None:
    """Rename a verified download into place; None (and no rename) if it is bad."""
    if digest != item.checksum or (item.size is not None and size != item.size):
        return None
    kill_point("cache-rename")  # fault tests: verified, not yet renamed
    os.replace(tmp, item.target)
    return size


def checksum_bytes(data: bytes | memoryview) -> str:
    """Checksum of a byte string, as ``blake2b:<hex>``."""
    return f"{CHECKSUM_ALGO}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def checksum_stream(stream: IO[bytes]) -> str:
    """Checksum of everything left in a binary stream."""
    h = hashlib.blake2b(digest_size=16)
    while chunk := stream.read(_CHUNK):
        h.update(chunk)
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}"


def checksum_file(path: str | os.PathLike[str]) -> str:
    """Checksum of a local file."""
    with open(path, "rb") as f:
        return checksum_stream(f)


def copy_hashing(src: str, dst: str) -> tuple[str, int]:
    """Copy a local file, hashing it on the way; returns its checksum and size."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open(src, "rb", buffering=0) as fin, open(dst, "xb", buffering=0) as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            _write_all(fout, chunk)
            size += len(chunk)
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}", size


def _write_all(f: io.RawIOBase, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file: a raw write may be short (a full
    disk writes what fits and says so; the next write raises ENOSPC)."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]
        kill_point("cache-download")  # fault tests: a download cut off part-way


_TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


def tmp_name(target: str) -> str:
    """A temporary name beside ``target`` (``.<name>.tmp-<12 hex>``), unique across
    threads and processes: every atomic write and download of this project uses it."""
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")


def is_tmp_name(name: str) -> bool:
    """True for a file name made by :func:`tmp_name` (a leftover of a killed write)."""
    return _TMP_NAME.match(name) is not None


def write_atomic(target: str, data: bytes, *, point: str = "write", durable: bool = True) -> None:
    """Write a local file whole under a temporary name, then rename it into place.

    Args:
        point: the kill point reached halfway through the bytes (fault tests).
        durable: fsync before the rename (commit points: index, manifest, results).
    """
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = tmp_name(target)
    try:
        with open(tmp, "xb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            kill_point(point)  # fault tests: a writer killed with half its bytes out
            f.write(data[len(data) // 2:])
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        unlink_quietly(tmp)
        raise


def copy_atomic(src: str, target: str) -> None:
    """Copy a local file under a temporary name, then rename it into place."""
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = tmp_name(target)
    try:
        copy_local(src, tmp)
        os.replace(tmp, target)
    except BaseException:
        unlink_quietly(tmp)
        raise


def copy_local(src: str, dst: str) -> None:
    # No fsync per data file: renames make each file appear whole to readers and
    # survive a killed process; commit points (index, manifest, results) are fsynced in
    # write_atomic, and every data file is checksummed before it is used.
    shutil.copyfile(src, dst)


def write_file(path: str, data: bytes) -> None:
    """Write a new local file whole (it must not exist)."""
    with open(path, "xb", buffering=0) as f:
        _write_all(f, data)


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
