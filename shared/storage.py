"""Every read and write of formatlab goes through this module.

A :class:`Store` is a root URL (a local or NFS path, ``s3://bucket/prefix``,
``memory://...``) plus an fsspec filesystem. Paths inside a store are always
relative, POSIX-style, and checked to stay inside the root. Credentials come from
``--storage-options`` JSON or the standard AWS environment (as s3fs reads it) and
are redacted from anything this project logs, stores or raises
(:mod:`shared.redaction`; the options themselves: :mod:`shared.storage_options`, both
re-exported here).
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from shared import fetch
# Checksums live with the fetch code, which hashes while it copies; re-exported here.
from shared.fetch import (CHECKSUM_ALGO, FetchItem, checksum_bytes,  # noqa: F401
                          checksum_file, checksum_stream)
from shared.killpoint import kill_point, write_point
# Redaction and storage options live in their own modules; re-exported here.
from shared.redaction import (one_line, redact, redact_url,  # noqa: F401
                              register_env_secrets, register_option_secrets, register_secret,
                              register_url_secrets)
from shared.storage_options import (STORAGE_OPTIONS_ENV, BadStorageOptions,  # noqa: F401
                                    has_secrets, parse_storage_options, public_options,
                                    s3_defaults)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class StorageError(Exception):
    """A store could not be reached or an object could not be read or written."""


class PathEscapeError(StorageError):
    """A path read from a manifest or index points outside its root."""


# --------------------------------------------------------------------------- paths


def check_relative(rel: str) -> str:
    """Normalise a store-relative path and refuse any that leaves its root.

    Raises:
        PathEscapeError: ``rel`` is absolute, has a scheme, or climbs out with ``..``.
    """
    if not isinstance(rel, str) or not rel:
        raise PathEscapeError(f"empty or non-string path {rel!r}")
    if "\\" in rel or "\x00" in rel or "://" in rel or rel.startswith(("/", "~")):
        raise PathEscapeError(f"path {rel!r} is not a plain relative path")
    if re.match(r"^[A-Za-z]:", rel):
        raise PathEscapeError(f"path {rel!r} is not a plain relative path")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise PathEscapeError(f"path {rel!r} escapes its root")
    return norm


def safe_local_path(root: str | os.PathLike[str], rel: str) -> Path:
    """``root / rel`` for a local root, refusing paths that escape it (symlinks included)."""
    norm = check_relative(rel)
    base = Path(root).resolve()
    target = (base / norm).resolve()
    if target != base and base not in target.parents:
        raise PathEscapeError(f"path {rel!r} escapes its root")
    return target


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class Store:
    """A root URL in some filesystem; every path given to its methods is relative."""

    url: str
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    root: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> "Store":
        """Open a store at ``url`` (created on first write)."""
        register_env_secrets()
        options = dict(storage_options or {})
        register_option_secrets(options)
        url = str(url)
        register_url_secrets(url)
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "s3a"):
            options = s3_defaults(options)
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except (ValueError, ImportError, TypeError) as exc:
            raise StorageError(f"cannot open store {redact_url(url)}: {redact(exc)}") from None
        if isinstance(fs, LocalFileSystem):
            root = str(Path(root).absolute())
        return cls(url=url.rstrip("/") or url, fs=fs, root=root.rstrip("/") or root,
                   storage_options=options)

    def __repr__(self) -> str:
        return f"Store({self.display_url!r})"

    @property
    def is_local(self) -> bool:
        """True for a path on this machine's file systems (NFS included)."""
        return isinstance(self.fs, LocalFileSystem)

    @property
    def display_url(self) -> str:
        """The URL with credentials removed, for logs and manifests."""
        return redact_url(self.url)

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (checked to stay inside the root)."""
        if not rel:
            return self.root
        return posixpath.join(self.root, check_relative(rel))

    def url_of(self, rel: str = "") -> str:
        """A full URL for ``rel`` (for libraries that take URLs, such as zarr)."""
        return self.url if not rel else f"{self.url}/{check_relative(rel)}"

    def sub(self, rel: str) -> "Store":
        """A store rooted at ``rel`` inside this one."""
        return Store(url=self.url_of(rel), fs=self.fs, root=self.path(rel),
                     storage_options=self.storage_options)


    # -- reads
    def exists(self, rel: str) -> bool:
        return self._call("check", rel, self.fs.exists, self.path(rel))

    def isdir(self, rel: str = "") -> bool:
        return bool(self._call("check", rel, self.fs.isdir, self.path(rel)))

    def isfile(self, rel: str = "") -> bool:
        return bool(self._call("check", rel, self.fs.isfile, self.path(rel)))

    def size(self, rel: str) -> int:
        return int(self._call("stat", rel, self.fs.size, self.path(rel)))

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Read a whole object or the byte range ``[start, end)``."""
        if start is None and end is None:
            return self._call("read", rel, self.fs.cat_file, self.path(rel))
        return self._call("read", rel, self.fs.cat_file, self.path(rel), start=start, end=end)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def open_file(self, rel: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """An fsspec file object for streaming reads (e.g. large archives)."""
        return self._call("open", rel, self.fs.open, self.path(rel), mode, **kwargs)

    def list(self, rel: str = "", detail: bool = False) -> list[Any]:
        """Entries directly under ``rel`` as store-relative paths (empty if missing)."""
        base = self.path(rel)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001 - every backend raises its own types
            raise StorageError(f"cannot list {self._show(rel)}: {redact(exc)}") from None
        out = []
        for entry in entries:
            name = entry["name"].rstrip("/")
            if name == base.rstrip("/"):
                continue
            rel_name = posixpath.relpath(name, self.root)
            out.append({**entry, "rel": rel_name} if detail else rel_name)
        return sorted(out, key=lambda e: e["rel"] if detail else e)

    def walk_files(self, rel: str = "") -> list[str]:
        """Every file below ``rel``, store-relative, sorted."""
        base = self.path(rel)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot list {self._show(rel)}: {redact(exc)}") from None
        return sorted(posixpath.relpath(p, self.root) for p in found)

    def get_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        """Download one object to a local path (not atomic; callers rename)."""
        if self.is_local:
            self._call("read", rel, fetch.copy_local, self.path(rel), os.fspath(local_path))
        else:
            self._call("read", rel, self.fs.get_file, self.path(rel), os.fspath(local_path))

    def fetch_many(self, items: Sequence[FetchItem], *, threads: int = 8,
                   on_file: Callable[[int], None] | None = None) -> list[int | None]:
        """Download ``items`` to their local targets, each to a temporary name, hashed on
        the way, verified and renamed into place (see :mod:`shared.fetch`).

        Local stores copy one by one; async clients (s3fs) get ``threads`` requests in
        flight on their own loop; other file systems a pool of ``threads``. ``on_file``
        is called with counts of files done.

        Returns:
            Each item's size, or None where the download did not match (not renamed).

        Raises:
            FileNotFoundError, StorageError: the store's side (credentials redacted).
            OSError: the local side (disk full, permissions), as raised.
        """
        progress = on_file or (lambda n: None)
        srcs = [self.path(item.src) for item in items]
        if getattr(self.fs, "async_impl", False) and not self.is_local:
            # s3fs asks for the size first (a second request per file) unless told
            # that a file comes in one piece: small files do.
            whole = ({"max_concurrency": 1} if "max_concurrency"
                     in inspect.signature(self.fs._cat_file).parameters else {})
            return fsspec.asyn.sync(
                self.fs.loop, fetch.fetch_async, items, srcs, threads=max(1, threads),
                cat=lambda src: self.fs._cat_file(src, **whole), get=self.fs._get_file,
                on_error=self._fetch_error, on_file=progress)
        return fetch.fetch_sync(items, srcs, local=self.is_local, threads=max(1, threads),
                                cat=self.fs.cat_file, get=self.fs.get_file,
                                on_error=self._fetch_error, on_file=progress)

    def _fetch_error(self, item: FetchItem, exc: Exception) -> Exception:
        """A failed read of :meth:`fetch_many` as this store reports it; errors of the
        local side (disk full, permissions) pass through as they are."""
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, OSError) and (
                exc.errno in _DISK_FULL
                or (self.is_local and exc.filename not in (None, self.path(item.src)))):
            return exc
        where = self._show(item.src)
        if isinstance(exc, FileNotFoundError):
            return FileNotFoundError(f"{where} not found")
        kind = "" if isinstance(exc, OSError) else f"{type(exc).__name__}: "
        return StorageError(f"cannot read {where}: {kind}{redact(exc)}")

    def get_files(self, rels: Sequence[str], local_paths: Sequence[str],
                  batch_size: int | None = None) -> None:
        """fsspec's own batch download, unverified: only a baseline for benchmarks."""
        remote = [self.path(r) for r in rels]
        kwargs = {} if self.is_local or batch_size is None else {"batch_size": batch_size}
        self._call("read", rels[0] if rels else "", self.fs.get, remote, list(local_paths),
                   **kwargs)

    # -- writes
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object atomically (local: temp + rename; object stores: one PUT)."""
        target = self.path(rel)
        point = write_point(rel)
        if self.is_local:
            self._call("write", rel, fetch.write_atomic, target, data, point=point)
        else:
            kill_point(point)  # a PUT cut off before it completes
            self._call("write", rel, self.fs.pipe_file, target, data)

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, json.dumps(value, indent=2, sort_keys=False).encode() + b"\n")

    def put_file(self, local_path: str | os.PathLike[str], rel: str) -> None:
        """Upload a local file atomically to ``rel``."""
        target = self.path(rel)
        if self.is_local:
            self._call("write", rel, fetch.copy_atomic, os.fspath(local_path), target)
        else:
            self._call("write", rel, self.fs.put_file, os.fspath(local_path), target)

    def put_dir(self, local_dir: str | os.PathLike[str], rel: str,
                files: Iterable[str] | None = None) -> None:
        """Upload the files of a local folder (each atomically) under ``rel``."""
        local_dir = Path(local_dir)
        names = sorted(files) if files is not None else sorted(
            p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        for name in names:
            self.put_file(local_dir / name, posixpath.join(rel, name))

    def delete(self, rel: str, recursive: bool = False) -> None:
        """Remove an object or a folder; missing is fine."""
        try:
            self.fs.rm(self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot delete {self._show(rel)}: {redact(exc)}") from None

    def sweep_temp(self, rel: str = "") -> int:
        """Remove the temporary files of killed atomic writes directly in ``rel``; returns
        how many. Only for a writer that holds the folder (nothing else writes there)."""
        if not self.is_local:
            return 0  # object stores write whole objects: nothing to sweep
        stale = [f for f in self.list(rel) if fetch.is_tmp_name(posixpath.basename(f))]
        for f in stale:
            self.delete(f)
        return len(stale)

    # -- helpers
    def _show(self, rel: str) -> str:
        return redact_url(self.url_of(rel) if rel else self.url)

    def _call(self, what: str, rel: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self._show(rel)} not found") from None
        except PathEscapeError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot {what} {self._show(rel)}: {redact(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - botocore & co. have their own types
            raise StorageError(
                f"cannot {what} {self._show(rel)}: {type(exc).__name__}: {redact(exc)}"
            ) from None
