"""A folder of class sub-folders of images, optionally under split folders, at any fsspec URL."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prep.sources.base import (
    Payload,
    Source,
    SourceItem,
    SourceListing,
    is_hidden,
    read_files_in_order,
)
from shared.storage import StorageError

SPLIT_NAMES = frozenset({"train", "val", "validation", "test"})
# Split folders that validate, preferred in this order (a folder's name, any case).
VAL_FOLDERS = ("val", "validation", "test")


def _path_hash(rel: str) -> bytes:
    return hashlib.sha1(rel.encode()).digest()


def val_count(n: int, val_fraction: float) -> int:
    """How many of a class's ``n`` files go to val: ``round(f * n)``, but at least one
    (so every class is validated) and never all (so every class is trained on)."""
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(val_fraction * n)))


def val_members(rels: Iterable[str], val_fraction: float, depth: int = 0) -> frozenset[str]:
    """The files of the val split, stratified by class and deterministic.

    In each class (the path component at ``depth``) the :func:`val_count` files whose
    relative paths hash lowest (SHA-1) go to val: a function of the listing alone.
    """
    by_class: dict[str, list[str]] = {}
    for rel in rels:
        by_class.setdefault(rel.split("/")[depth], []).append(rel)
    chosen: set[str] = set()
    for members in by_class.values():
        chosen.update(sorted(members, key=_path_hash)[:val_count(len(members), val_fraction)])
    return frozenset(chosen)


def _validating(splits: Iterable[str]) -> str | None:
    """The split folder that validates: ``val``, else ``validation``, else ``test``."""
    by_lower = {s.lower(): s for s in splits}
    return next((by_lower[v] for v in VAL_FOLDERS if v in by_lower), None)


class ImageFolderSource(Source):
    """Class sub-folders of images: ``<class>/<file>`` or ``<split>/<class>/<file>``.

    Split folders are used when every top-level folder is one of ``train``, ``val``,
    ``validation`` or ``test`` and each holds class folders; otherwise a deterministic
    ``val`` split is drawn in each class by a hash of each file's relative path
    (:func:`val_members`), so every class is validated. Every non-hidden
    file is listed whatever its extension: whether it is an image is decided by its
    content when it is decoded. Files in sub-folders of a class folder belong to it.

    Args:
        url: The folder's URL.
        storage_options: fsspec options for that URL.
        val_fraction: Share of files put in ``val`` when there are no split folders.
    """

    name = "image-folder"
    val_split = "val"  # drawn per class; with split folders, val, validation or test

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 val_fraction: float = 0.1) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        super().__init__(url, storage_options)
        self.val_fraction = float(val_fraction)

    def list(self) -> SourceListing:
        kind = self._root_kind()
        if kind != "dir":
            raise self._error(f"{self.display_url} is not a folder" if kind == "file"
                              else f"{self.display_url} not found")
        try:
            files = [f for f in self.store.walk_files() if not is_hidden(f)]
        except StorageError as exc:
            raise self._error(str(exc)) from None
        if not files:
            raise self._error(f"{self.display_url} holds no files")

        use_splits = self._has_split_folders(files)
        depth = 1 if use_splits else 0  # index of the class folder in a path
        rejects = [(rel, "not inside a class folder") for rel in files
                   if len(rel.split("/")) < depth + 2]
        in_class = [rel for rel in files if len(rel.split("/")) >= depth + 2]
        val = frozenset() if use_splits else val_members(in_class, self.val_fraction)
        placed = [(rel, rel.split("/")[0] if use_splits else "val" if rel in val else "train",
                   rel.split("/")[depth]) for rel in in_class]  # (rel, split, class)

        class_names = tuple(sorted({cls for _, _, cls in placed}))
        if not class_names:
            raise self._error(f"{self.display_url} holds no class folders")
        label_of = {name: i for i, name in enumerate(class_names)}
        items = sorted((SourceItem(rel, split, label_of[cls], rel) for rel, split, cls in placed),
                       key=lambda it: (it.split, it.key))

        counts: dict[str, int] = {}
        for item in items:
            counts[item.split] = counts.get(item.split, 0) + 1
        shown = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
        if use_splits:
            note = f"image-folder: split folders used as splits ({shown})"
        else:
            note = (f"image-folder: no split folders; val = {self.val_fraction:g} of each "
                    f"class, chosen by path hash ({shown})")
        return SourceListing(
            items=tuple(items),
            class_names=class_names,
            native_size=self.native_size,
            notes=(note,),
            rejects=tuple(rejects),
            val_split=_validating(counts) if use_splits else ("val" if "val" in counts else None),
        )

    def load(self, items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, Payload | Exception]]:
        for item in items:
            if not isinstance(item.ref, str):
                raise TypeError(f"image-folder: item {item.key!r} has no path ref")
        yield from read_files_in_order(self.store, items, lambda it: it.ref)  # type: ignore[arg-type,return-value]

    @staticmethod
    def _has_split_folders(files: Sequence[str]) -> bool:
        """True when every top-level folder is a split name holding class folders."""
        top: dict[str, bool] = {}  # top-level folder -> holds a sub-folder with files
        for rel in files:
            parts = rel.split("/")
            if len(parts) >= 2:
                top[parts[0]] = top.get(parts[0], False) or len(parts) >= 3
        return bool(top) and all(name.lower() in SPLIT_NAMES and nested for name, nested in top.items())
