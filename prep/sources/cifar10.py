"""CIFAR-10 in its official python or binary distribution, archived or extracted.

The python distribution is pickled data and therefore untrusted: it is unpickled
only by :func:`prep.sources.cifar_pickle.safe_unpickle`, which resolves nothing but what NumPy array
reconstruction needs. A pickle that names anything else is refused before any of it
is called.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from prep.sources.base import (
    Payload,
    Source,
    SourceError,
    SourceItem,
    SourceListing,
    join,
)
from prep.sources.cifar_pickle import Refused, safe_unpickle
from shared.storage import StorageError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
PYTHON_DIR = "cifar-10-batches-py"
BINARY_DIR = "cifar-10-batches-bin"
PYTHON_ARCHIVE = "cifar-10-python.tar.gz"
BINARY_ARCHIVE = "cifar-10-binary.tar.gz"
_RECORD = 1 + 3072
_SIDE = 32


class CifarRef(NamedTuple):
    """Where one CIFAR-10 row lives.

    Attributes:
        container: Store-relative path of the tar archive (``""`` when the source URL
            is the archive itself), or None for extracted batch files.
        member: Path of the batch file inside the archive, or store-relative.
        row: Row inside the batch file.
    """

    container: str | None
    member: str
    row: int


class _Layout(NamedTuple):
    binary: bool
    container: str | None  # as in CifarRef
    folder: str  # store-relative folder of extracted batch files ("" for the root)


def _batch_names(binary: bool) -> tuple[str, ...]:
    names = (*TRAIN_BATCHES, TEST_BATCH)
    return tuple(f"{n}.bin" for n in names) if binary else names


def _meta_name(binary: bool) -> str:
    return "batches.meta.txt" if binary else "batches.meta"


def _split_of(batch_file: str) -> str:
    return "test" if batch_file.startswith(TEST_BATCH) else "train"


def _get(d: Mapping[Any, Any], key: str) -> Any:
    """A value from a batch dict whose keys are bytes (Python 2) or str (Python 3)."""
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(key)


def _as_pixels(data: Any) -> np.ndarray:
    """A batch's ``data`` (ndarray, list of rows, or one flat buffer) as (n, 3072) uint8."""
    if isinstance(data, (bytes, bytearray)):
        arr = np.frombuffer(data, dtype=np.uint8)
    elif isinstance(data, np.ndarray):
        if data.dtype.kind not in "iu":
            raise ValueError(f"data has dtype {data.dtype}, expected uint8")
        arr = data
    else:
        arr = np.asarray([np.frombuffer(r, np.uint8) if isinstance(r, bytes) else r for r in data])
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("data holds values outside 0..255")
        arr = arr.astype(np.uint8)
    if arr.size % 3072:
        raise ValueError(f"data has {arr.size} values, not a multiple of 3072")
    return arr.reshape(-1, 3072)


def _parse_python_batch(obj: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"holds a {type(obj).__name__}, expected a dict")
    labels = np.asarray(_get(obj, "labels"), dtype=np.int64).reshape(-1)
    pixels = _as_pixels(_get(obj, "data"))
    if len(labels) != len(pixels):
        raise ValueError(f"{len(labels)} labels for {len(pixels)} images")
    return labels, pixels


def _parse_binary_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not data or len(data) % _RECORD:
        raise ValueError(f"{len(data)} bytes is not a whole number of {_RECORD}-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    return records[:, 0].astype(np.int64), records[:, 1:]


def _parse_python_meta(obj: Any) -> tuple[str, ...]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"holds a {type(obj).__name__}, expected a dict")
    names = _get(obj, "label_names")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def _parse_binary_meta(data: bytes) -> tuple[str, ...]:
    return tuple(line.strip() for line in data.decode("utf-8").splitlines() if line.strip())


def _hwc(pixels_row: np.ndarray) -> np.ndarray:
    """One CHW-planar CIFAR row as a C-contiguous HWC image."""
    return np.ascontiguousarray(pixels_row.reshape(3, _SIDE, _SIDE).transpose(1, 2, 0))


# --------------------------------------------------------------------------- source


class Cifar10Source(Source):
    """CIFAR-10: ``cifar-10-python.tar.gz``, ``cifar-10-binary.tar.gz`` or their folders.

    The URL may be either archive, a folder holding one, the extracted
    ``cifar-10-batches-py``/``cifar-10-batches-bin`` folder, or a folder holding that.
    Splits are ``train`` (data_batch_1..5) and ``test`` (test_batch).
    """

    name = "cifar10"
    native_size = _SIDE
    val_split = "test"

    def list(self) -> SourceListing:
        layout = self._find_layout()
        where = self._layout_where(layout)
        meta_name = _meta_name(layout.binary)
        wanted = {meta_name, *_batch_names(layout.binary)}
        class_names: tuple[str, ...] | None = None
        batches: dict[str, tuple[str, np.ndarray]] = {}
        try:
            for base, member, data in self._members(layout, wanted):
                if base == meta_name:
                    class_names = self._parse_meta(layout, base, data, where)
                else:
                    labels, _ = self._parse_batch(layout, base, data, where)
                    batches[base] = (member, labels)
        except StorageError as exc:
            raise self._error(str(exc)) from None
        found = batches.keys() | ({meta_name} if class_names is not None else set())
        missing = sorted(wanted - found)
        if missing:
            raise self._error(f"{where} lacks {', '.join(missing)}; is it a complete CIFAR-10 download?")
        if not class_names:
            raise self._error(f"{meta_name} in {where} names no classes")

        items: list[SourceItem] = []
        rejects: list[tuple[str, str]] = []
        n_classes = len(class_names)
        order = sorted(batches, key=lambda b: (_split_of(b), b))
        for base in order:
            member, labels = batches[base]
            split = _split_of(base)
            for row, label in enumerate(labels.tolist()):
                key = f"{base}:{row}"
                if not 0 <= label < n_classes:
                    rejects.append((key, f"label {label} outside 0..{n_classes - 1}"))
                    continue
                items.append(SourceItem(key, split, label, CifarRef(layout.container, member, row)))
        kind = "binary" if layout.binary else "python"
        return SourceListing(
            items=tuple(items),
            class_names=class_names,
            native_size=self.native_size,
            notes=(f"cifar10: {kind} distribution read from {where}",),
            rejects=tuple(rejects),
            val_split=self.val_split if any(it.split == self.val_split for it in items) else None,
        )

    def load(self, items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, Payload | Exception]]:
        needed: dict[str | None, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        for item in items:
            ref = item.ref
            if not isinstance(ref, CifarRef):
                raise TypeError(f"cifar10: item {item.key!r} has no CifarRef")
            needed[ref.container][ref.member].add(ref.row)

        images: dict[CifarRef, np.ndarray | Exception] = {}
        for container, members in needed.items():
            binary = next(iter(members)).endswith(".bin")
            layout = _Layout(binary=binary, container=container, folder="")
            where = self._layout_where(layout)
            by_base = {posixpath.basename(m): m for m in members}
            try:
                for base, member, data in self._members(layout, set(by_base), exact=members.keys()):
                    _, pixels = self._parse_batch(layout, base, data, where)
                    for row in members[member]:
                        ref = CifarRef(container, member, row)
                        images[ref] = (_hwc(pixels[row]) if row < len(pixels)
                                       else IndexError(f"{base} has no row {row}"))
            except StorageError as exc:
                raise self._error(str(exc)) from None
        for item in items:
            image = images.get(item.ref)  # type: ignore[arg-type]
            if image is None:
                image = FileNotFoundError(f"{item.ref.member} not found in {self.display_url}")  # type: ignore[union-attr]
            yield item, image

    # -- layout
    def _find_layout(self) -> _Layout:
        kind = self._root_kind()
        if kind == "missing":
            raise self._error(f"{self.display_url} not found")
        if kind == "file":
            return _Layout(binary=self._archive_is_binary(""), container="", folder="")
        try:
            entries = {posixpath.basename(p): p for p in self.store.list()}
        except StorageError as exc:
            raise self._error(str(exc)) from None
        for binary in (False, True):
            if _batch_names(binary)[0] in entries:
                return _Layout(binary=binary, container=None, folder="")
        for folder, binary in ((PYTHON_DIR, False), (BINARY_DIR, True)):
            if folder in entries and self.store.isdir(folder):
                return _Layout(binary=binary, container=None, folder=folder)
        for archive in (PYTHON_ARCHIVE, BINARY_ARCHIVE):
            if archive in entries:
                return _Layout(binary=self._archive_is_binary(archive), container=archive, folder="")
        raise self._error(
            f"{self.display_url} holds neither {PYTHON_ARCHIVE}/{BINARY_ARCHIVE} nor "
            f"{PYTHON_DIR}/{BINARY_DIR} nor CIFAR-10 batch files")

    def _archive_is_binary(self, container: str) -> bool:
        """Which distribution an archive holds, from its first batch file's name."""
        try:
            with self.store.open_file(container) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    base = posixpath.basename(member.name)
                    if member.isfile() and base in ("data_batch_1", "batches.meta", TEST_BATCH):
                        return False
                    if member.isfile() and (base.endswith(".bin") or base == "batches.meta.txt"):
                        return True
        except (tarfile.TarError, EOFError, OSError, StorageError) as exc:
            raise self._error(f"{self._where(container)} is not a readable tar archive: {exc}") from None
        raise self._error(f"{self._where(container)} holds no CIFAR-10 batch files")

    def _layout_where(self, layout: _Layout) -> str:
        if layout.container is not None:
            return self._where(layout.container)
        return self._where(layout.folder)

    def _members(self, layout: _Layout, wanted: set[str],
                 exact: Any = None) -> Iterator[tuple[str, str, bytes]]:
        """Yield ``(basename, member path, bytes)`` for each wanted batch file.

        ``exact``, when given, is the set of full member paths to accept.
        """
        if layout.container is None:
            paths = exact if exact is not None else [join(layout.folder, w) for w in sorted(wanted)]
            for path in sorted(paths):
                try:
                    data = self.store.read_bytes(path)
                except FileNotFoundError:
                    continue
                yield posixpath.basename(path), path, data
            return
        left = set(exact) if exact is not None else set(wanted)
        try:
            with self.store.open_file(layout.container) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    base = posixpath.basename(member.name)
                    name = member.name if exact is not None else base
                    if not member.isfile() or base not in wanted or name not in left:
                        continue
                    handle = tar.extractfile(member)
                    if handle is None:
                        continue
                    yield base, member.name, handle.read()
                    left.discard(name)
                    if not left:
                        return
        except (tarfile.TarError, EOFError, OSError) as exc:
            where = self._where(layout.container)
            raise self._error(f"{where} is not a readable tar archive: {exc}") from None

    # -- parsing
    def _unpickle(self, base: str, data: bytes, where: str) -> Any:
        try:
            return safe_unpickle(data)
        except Refused as refused:
            raise SourceError(
                f"cifar10: {base} in {where} holds a pickle that references {refused.name}; "
                "refusing to unpickle it") from None
        except Exception as exc:  # noqa: BLE001 - a malformed pickle raises many types
            raise SourceError(f"cifar10: {base} in {where} is not a readable pickle: "
                              f"{type(exc).__name__}: {exc}") from None

    def _parse_meta(self, layout: _Layout, base: str, data: bytes, where: str) -> tuple[str, ...]:
        return self._checked(base, where, lambda: (
            _parse_binary_meta(data) if layout.binary
            else _parse_python_meta(self._unpickle(base, data, where))))

    def _parse_batch(self, layout: _Layout, base: str, data: bytes,
                     where: str) -> tuple[np.ndarray, np.ndarray]:
        return self._checked(base, where, lambda: (
            _parse_binary_batch(data) if layout.binary
            else _parse_python_batch(self._unpickle(base, data, where))))

    @staticmethod
    def _checked(base: str, where: str, parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except SourceError:
            raise
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise SourceError(f"cifar10: {base} in {where} is not a CIFAR-10 batch file: "
                              f"{type(exc).__name__}: {exc}") from None
