"""Tiny ImageNet (200 classes of 64x64 JPEGs): ``tiny-imagenet-200.zip`` or its folder.

The zip is read in place through the store (its central directory, then one member
per image), so nothing is extracted. Labels are indices in ``wnids.txt`` order; the
``test`` split has no labels and is skipped.
"""

from __future__ import annotations

import posixpath
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from prep.sources.base import (
    Payload,
    Source,
    SourceError,
    SourceItem,
    SourceListing,
    is_hidden,
    read_files_in_order,
)
from shared.storage import StorageError

ZIP_NAME = "tiny-imagenet-200.zip"
_NATIVE_SIZE = 64


class TinyRef(NamedTuple):
    """Where one Tiny ImageNet file lives.

    Attributes:
        container: Store-relative path of the zip (``""`` when the source URL is the
            zip itself), or None for an extracted folder.
        path: Member name inside the zip, or store-relative path of the file.
    """

    container: str | None
    path: str


class _Layout(NamedTuple):
    container: str | None  # as in TinyRef
    root: str  # prefix of the dataset folder in ``files`` ("" or "tiny-imagenet-200/")
    key_prefix: str  # prepended to a path to make its key (the path it has in the zip)
    files: tuple[str, ...]  # every file, as the paths TinyRef.path uses


class TinyImageNetSource(Source):
    """Tiny ImageNet from ``tiny-imagenet-200.zip``, a folder holding it, or the extracted folder.

    Splits are ``train`` (``train/<wnid>/images``) and ``val`` (labels from
    ``val/val_annotations.txt``). Keys are paths as they appear in the zip, e.g.
    ``tiny-imagenet-200/train/n01443537/images/n01443537_0.JPEG``, for the zip and the
    extracted folder alike.
    """

    name = "tiny-imagenet"
    native_size = _NATIVE_SIZE
    val_split = "val"

    def list(self) -> SourceListing:
        layout = self._find_layout()
        where = self._where(layout.container) if layout.container is not None else self.display_url
        with self._metadata(layout) as read:
            wnids = self._wnids(read, where)
            class_names = self._class_names(read, wnids)
            annotations = self._val_annotations(read, where) if self._has_val(layout) else {}
        label_of = {wnid: i for i, wnid in enumerate(wnids)}
        root = layout.root

        items: list[SourceItem] = []
        rejects: list[tuple[str, str]] = []
        val_files: dict[str, str] = {}
        test_count = 0

        def add(path: str, split: str, wnid: str, source_of_label: str) -> None:
            key = layout.key_prefix + path
            if wnid not in label_of:
                rejects.append((key, f"class {wnid} from {source_of_label} is not in wnids.txt"))
                return
            items.append(SourceItem(key, split, label_of[wnid], TinyRef(layout.container, path)))

        for path in layout.files:
            if not path.startswith(root):
                continue
            rel = path[len(root):]
            if is_hidden(rel):
                continue
            parts = rel.split("/")
            if parts[0] == "train" and len(parts) == 4 and parts[2] == "images":
                add(path, "train", parts[1], f"folder train/{parts[1]}")
            elif parts[0] == "val" and len(parts) == 3 and parts[1] == "images":
                val_files[parts[2]] = path
            elif parts[0] == "test":
                test_count += 1

        if val_files:
            for name, path in sorted(val_files.items()):
                if name in annotations:
                    add(path, "val", annotations[name], "val_annotations.txt")
                else:
                    rejects.append((layout.key_prefix + path, "not listed in val/val_annotations.txt"))
            for name in sorted(annotations.keys() - val_files.keys()):
                rejects.append((layout.key_prefix + f"{root}val/images/{name}",
                                "listed in val/val_annotations.txt but missing"))
        if not items:
            raise self._error(f"{where} holds no train/<wnid>/images or val/images files")

        notes = [f"tiny-imagenet: read from {where}"]
        if test_count:
            notes.append(f"tiny-imagenet: test split skipped ({test_count} unlabelled images)")
        items.sort(key=lambda it: (it.split, it.key))
        return SourceListing(
            items=tuple(items),
            class_names=class_names,
            native_size=self.native_size,
            notes=tuple(notes),
            rejects=tuple(sorted(rejects)),
            val_split=self.val_split if any(it.split == self.val_split for it in items) else None,
        )

    def load(self, items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, Payload | Exception]]:
        by_container: dict[str | None, list[TinyRef]] = defaultdict(list)
        for item in items:
            if not isinstance(item.ref, TinyRef):
                raise TypeError(f"tiny-imagenet: item {item.key!r} has no TinyRef")
            by_container[item.ref.container].append(item.ref)
        if list(by_container) == [None]:
            yield from read_files_in_order(self.store, items, lambda it: it.ref.path)  # type: ignore[union-attr]
            return
        payloads: dict[TinyRef, bytes | Exception] = {}
        for container, refs in by_container.items():
            if container is None:
                for item, payload in read_files_in_order(
                        self.store, [SourceItem("", "", 0, r) for r in refs], lambda it: it.ref.path):  # type: ignore[union-attr]
                    payloads[item.ref] = payload  # type: ignore[index]
            else:
                found = self._read_zip_members(container, [r.path for r in refs])
                payloads.update((TinyRef(container, path), data) for path, data in found.items())
        for item in items:
            yield item, payloads[item.ref]  # type: ignore[index]

    # -- layout
    def _find_layout(self) -> _Layout:
        kind = self._root_kind()
        if kind == "missing":
            raise self._error(f"{self.display_url} not found")
        if kind == "file":
            return self._zip_layout("")
        try:
            entries = self.store.list()
            names = {posixpath.basename(e): e for e in entries}
            if "wnids.txt" in names:
                base = posixpath.basename(self.store.root.rstrip("/")) or "tiny-imagenet-200"
                return _Layout(None, "", base + "/", tuple(self.store.walk_files()))
            for entry in entries:
                if self.store.exists(f"{entry}/wnids.txt"):
                    return _Layout(None, entry + "/", "", tuple(self.store.walk_files(entry)))
        except StorageError as exc:
            raise self._error(str(exc)) from None
        if ZIP_NAME in names:
            return self._zip_layout(names[ZIP_NAME])
        raise self._error(f"{self.display_url} holds neither {ZIP_NAME} nor a folder with wnids.txt")

    def _zip_layout(self, container: str) -> _Layout:
        try:
            with self.store.open_file(container) as raw, zipfile.ZipFile(raw) as zf:
                files = tuple(n for n in zf.namelist() if not n.endswith("/"))
        except (zipfile.BadZipFile, OSError, StorageError, EOFError) as exc:
            raise self._error(f"{self._where(container)} is not a readable zip: {exc}") from None
        roots = sorted((n for n in files if posixpath.basename(n) == "wnids.txt"), key=len)
        if not roots:
            raise self._error(f"{self._where(container)} holds no wnids.txt")
        root = posixpath.dirname(roots[0])
        return _Layout(container, root + "/" if root else "", "", files)

    # -- metadata
    @contextmanager
    def _metadata(self, layout: _Layout) -> Iterator[Callable[[str], str | None]]:
        """A reader of the dataset's text files (None when absent), the zip opened once."""
        def decode(rel: str, data: bytes) -> str:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self._error(f"{rel} is not UTF-8 text: {exc}") from None

        if layout.container is None:
            def read_folder(rel: str) -> str | None:
                try:
                    return decode(rel, self.store.read_bytes(layout.root + rel))
                except FileNotFoundError:
                    return None
                except StorageError as exc:
                    raise self._error(str(exc)) from None
            yield read_folder
            return
        try:
            with self.store.open_file(layout.container) as raw, zipfile.ZipFile(raw) as zf:
                def read_zip(rel: str) -> str | None:
                    try:
                        return decode(rel, zf.read(layout.root + rel))
                    except KeyError:
                        return None
                yield read_zip
        except (zipfile.BadZipFile, OSError, StorageError, EOFError) as exc:
            raise self._error(f"cannot read {self._where(layout.container)}: {exc}") from None

    def _wnids(self, read: Callable[[str], str | None], where: str) -> tuple[str, ...]:
        text = read("wnids.txt")
        wnids = tuple(line.strip() for line in (text or "").splitlines() if line.strip())
        if not wnids:
            raise self._error(f"wnids.txt in {where} is missing or empty")
        if len(set(wnids)) != len(wnids):
            raise self._error(f"wnids.txt in {where} lists a class twice")
        return wnids

    def _class_names(self, read: Callable[[str], str | None], wnids: tuple[str, ...]) -> tuple[str, ...]:
        """First synonym from words.txt per wnid (the wnid when absent); kept unique."""
        words: dict[str, str] = {}
        wanted = set(wnids)
        for line in (read("words.txt") or "").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in wanted and text.strip():
                words[wnid] = text.split(",")[0].strip()
        names = [words.get(w, w) for w in wnids]
        seen: dict[str, int] = defaultdict(int)
        for name in names:
            seen[name] += 1
        # Some wnids share a first synonym (ImageNet has two "crane"s); the wnid tells them apart.
        return tuple(n if seen[n] == 1 or n == w else f"{n} ({w})" for n, w in zip(names, wnids, strict=True))

    def _val_annotations(self, read: Callable[[str], str | None], where: str) -> dict[str, str]:
        text = read("val/val_annotations.txt")
        if text is None:
            raise self._error(f"{where} has val/images but no val/val_annotations.txt")
        out: dict[str, str] = {}
        for line in text.splitlines():
            fields = line.split("\t")
            if len(fields) >= 2 and fields[0].strip():
                out[fields[0].strip()] = fields[1].strip()
        return out

    @staticmethod
    def _has_val(layout: _Layout) -> bool:
        prefix = layout.root + "val/images/"
        return any(p.startswith(prefix) for p in layout.files)

    # -- reading
    def _read_zip_members(self, container: str, paths: list[str]) -> dict[str, bytes | Exception]:
        """Read members in archive order (sequential reads of a remote zip), keyed by name."""
        out: dict[str, bytes | Exception] = {}
        try:
            with self.store.open_file(container) as raw, zipfile.ZipFile(raw) as zf:
                offsets = {}
                for path in paths:
                    try:
                        offsets[path] = zf.getinfo(path).header_offset
                    except KeyError:
                        out[path] = FileNotFoundError(f"{path} not found in {self._where(container)}")
                for path in sorted(offsets, key=offsets.__getitem__):
                    try:
                        out[path] = zf.read(path)
                    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                        out[path] = exc
        except (zipfile.BadZipFile, OSError, StorageError, EOFError) as exc:
            raise SourceError(f"tiny-imagenet: cannot read {self._where(container)}: {exc}") from None
        return out
