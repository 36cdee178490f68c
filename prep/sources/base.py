"""The protocol every raw-dataset source implements.

A source is listed once in the Ray driver (:meth:`Source.list`), which gives every
sample as a small :class:`SourceItem`; the driver cuts the items into shards and each
Ray task calls :meth:`Source.load` on its shard's items to get their pixels or encoded
bytes. Sources are pickled into those tasks, so they hold only their URL and options;
the fsspec filesystem is opened lazily in whichever process needs it.
"""

from __future__ import annotations

import abc
import inspect
import posixpath
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from shared.storage import StorageError, Store, redact


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One raw sample.

    Attributes:
        key: Stable id of the sample in its source (image-folder: path relative to the
            source root; cifar10: ``"<batch file>:<row>"``; tiny-imagenet: the file's
            path inside the archive or the folder it was extracted to).
        split: Split name as the source spells it (``train``, ``test``, ``val``...).
        label: Class index into :attr:`SourceListing.class_names`.
        ref: Small picklable handle that the source's :meth:`Source.load` understands
            (never pixel data).
    """

    key: str
    split: str
    label: int
    ref: object = None


@dataclass(frozen=True)
class SourceListing:
    """Everything :meth:`Source.list` found.

    Attributes:
        items: Every sample, in a deterministic order (by split, then key; CIFAR-10
            rows in numeric order).
        class_names: Class names; an item's label indexes this tuple.
        native_size: Side of the source's square images when it has one (cifar10:
            32, tiny-imagenet: 64), else None.
        notes: Human-readable remarks for the log and the manifest.
        rejects: ``(key, reason)`` for inputs found unusable while listing.
        val_split: The split that validates (one of the listed splits), None when the
            source produced none; prep records it in the manifest.
    """

    items: tuple[SourceItem, ...]
    class_names: tuple[str, ...]
    native_size: int | None
    notes: tuple[str, ...] = ()
    rejects: tuple[tuple[str, str], ...] = ()
    val_split: str | None = None

    def __post_init__(self) -> None:
        n = len(self.class_names)
        for item in self.items:
            if not 0 <= item.label < n:
                raise ValueError(f"item {item.key!r} has label {item.label} outside 0..{n - 1}")
        if self.val_split is not None and self.val_split not in self.splits:
            raise ValueError(f"val_split {self.val_split!r} is not one of the splits "
                             f"{list(self.splits)}")

    @property
    def splits(self) -> dict[str, int]:
        """Sample count per split, in order of first appearance."""
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.split] = counts.get(item.split, 0) + 1
        return counts


class SourceError(Exception):
    """The source is unreadable or invalid; the CLI prints it as one line and exits 2."""


Payload = np.ndarray | bytes


class Source(abc.ABC):
    """A raw dataset at an fsspec URL.

    A source declares what the driver needs to know before listing it, so the driver
    never branches on a source's name: its registry :attr:`name`, its
    :attr:`native_size` (None: images vary, ``--size`` is required), the split that
    usually validates (:attr:`val_split`; the listing says which one it produced) and
    the options it takes (its constructor's keyword-only parameters,
    :meth:`option_names`).

    Args:
        url: Where the dataset lives (local path, ``s3://...``, ``memory://...``).
        storage_options: fsspec options for that URL (credentials stay out of messages).
    """

    name: ClassVar[str]
    native_size: ClassVar[int | None] = None
    val_split: ClassVar[str | None] = None

    @classmethod
    def needs_size(cls) -> bool:
        """True when the images have no common native size (``--size`` is required)."""
        return cls.native_size is None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options this source takes: its constructor's keyword-only parameters."""
        return tuple(p.name for p in inspect.signature(cls.__init__).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self._store: Store | None = None

    # A Ray task rebuilds the filesystem on first use instead of unpickling one.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_url!r})"

    @property
    def display_url(self) -> str:
        """The URL without credentials."""
        return redact(self.url)

    @property
    def store(self) -> Store:
        """The store rooted at :attr:`url` (opened lazily, per process)."""
        if self._store is None:
            try:
                self._store = Store.open(self.url, self.storage_options)
            except StorageError as exc:
                raise SourceError(f"{self.name}: {exc}") from None
        return self._store

    @abc.abstractmethod
    def list(self) -> SourceListing:
        """List every sample; runs once, in the driver.

        Raises:
            SourceError: The source is missing, unreadable or not in the expected layout.
        """

    @abc.abstractmethod
    def load(self, items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, Payload | Exception]]:
        """Yield each item with its payload, in the order given; runs inside a Ray task.

        The payload is a decoded uint8 HWC RGB array (cifar10) or the file's encoded
        bytes (tiny-imagenet, image-folder). An item whose bytes cannot be read is
        yielded with the exception instead, to be recorded as a reject.

        Raises:
            SourceError: A container the items live in (an archive, a CIFAR batch file)
                cannot be read at all; retrying the task may help.
        """

    # -- helpers for subclasses
    def _error(self, message: str) -> SourceError:
        return SourceError(f"{self.name}: {redact(message)}")

    def _where(self, rel: str = "") -> str:
        """A printable location: the source URL, or a path inside it."""
        base = self.display_url.rstrip("/")
        return f"{base}/{rel}" if rel else base

    def _root_kind(self) -> str:
        """``"file"``, ``"dir"`` or ``"missing"`` for the source URL itself."""
        store = self.store
        try:
            if store.isdir():
                return "dir"
            if store.isfile():
                return "file"
        except StorageError as exc:  # the store names the URL, credentials redacted
            raise self._error(str(exc)) from None
        return "missing"


def is_hidden(rel: str) -> bool:
    """True for a path with any dot-file or dot-folder component (``.DS_Store``, ``.git/``)."""
    return any(part.startswith(".") for part in rel.split("/"))


def read_files_in_order(
    store: Store,
    items: Iterable[SourceItem],
    rel_of: Callable[[SourceItem], str],
    *,
    threads: int = 8,
) -> Iterator[tuple[SourceItem, bytes | Exception]]:
    """Read one file per item, yielding ``(item, bytes or exception)`` in input order.

    A few reads stay in flight so object stores and NFS are not read one round trip
    at a time; memory stays bounded by the window.
    """
    window: deque[tuple[SourceItem, Future[bytes]]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="source-read") as pool:
        for item in items:
            window.append((item, pool.submit(store.read_bytes, rel_of(item))))
            if len(window) >= 2 * threads:
                yield _settle(*window.popleft())
        while window:
            yield _settle(*window.popleft())


def _settle(item: SourceItem, future: Future[bytes]) -> tuple[SourceItem, bytes | Exception]:
    try:
        return item, future.result()
    except Exception as exc:  # noqa: BLE001 - an unreadable file becomes a reject
        return item, exc


def join(*parts: str) -> str:
    """Join store-relative path parts, ignoring empty ones."""
    return posixpath.join(*[p for p in parts if p]) if any(parts) else ""
