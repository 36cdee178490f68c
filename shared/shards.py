"""The shard lifecycle, once for every format: stage, checksum, upload, index last.

A shard of one format lives at ``<dataset>/<format>/<split>/shard-NNNNN/`` and is
committed by its ``index.parquet``: the index is written only after every data file is
in place, so a shard with an index is complete. The index's Parquet metadata also
records the shard's other files with their checksums, so a re-run can rebuild the
manifest entry of a committed shard without re-reading its data.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.formats.base import Format, FormatKind
from shared.killpoint import kill_point
from shared.manifest import INDEX_FILE, FileEntry, ShardEntry
from shared.storage import Store, check_relative, checksum_bytes, checksum_file

_META_KEY = b"formatlab.shard"
STAGING_DIR = ".staging"  # local stores: shards are built here, then renamed into place


# The index of every shard: one row per sample, in read order. Formats that store one
# file per sample (FormatKind.FILES) add where each sample's file is and what it hashes to.
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64())])
FILES_INDEX_SCHEMA = INDEX_SCHEMA.append(pa.field("file", pa.string())).append(
    pa.field("bytes", pa.int64())).append(pa.field("checksum", pa.string()))
# Packed formats (FormatKind.PACKED) add each sample's member in the shard's archive: its
# name, the offset and length of its data in the archive, and the checksum of that data.
PACKED_INDEX_SCHEMA = pa.schema([*INDEX_SCHEMA, pa.field("member", pa.string()),
                                 pa.field("offset", pa.int64()), pa.field("bytes", pa.int64()),
                                 pa.field("checksum", pa.string())])


@dataclass(frozen=True)
class ShardIndex:
    """A shard's index as typed columns (see :data:`INDEX_SCHEMA`).

    ``files``, ``sizes`` and ``checksums`` are None for formats without per-sample files
    (``sizes`` also for indexes written before the ``bytes`` column existed). Packed
    formats have ``offsets`` (and ``sizes``, ``checksums``) of their members instead.
    """

    keys: tuple[str, ...]
    labels: np.ndarray  # int64
    files: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    checksums: tuple[str, ...] | None = None
    offsets: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, data: bytes | str | Path) -> "ShardIndex":
        """Parse index bytes or a local path (file paths checked, see :func:`read_index`)."""
        return cls.from_table(read_index(data))

    @classmethod
    def from_table(cls, table: pa.Table) -> "ShardIndex":
        names = set(table.column_names)
        for name in INDEX_SCHEMA.names:
            if name not in names:
                raise ValueError(f"shard index has no {name!r} column")

        def column(name: str) -> tuple[Any, ...] | None:
            return tuple(table.column(name).to_pylist()) if name in names else None

        files, offsets = column("file"), column("offset")
        per_sample = files is not None or offsets is not None
        return cls(keys=column("key") or (),
                   labels=np.asarray(table.column("label").to_numpy(), dtype=np.int64),
                   files=files, sizes=column("bytes") if per_sample else None,
                   checksums=column("checksum") if per_sample else None, offsets=offsets)

    def sample_files(self) -> list[tuple[str, str, int | None]]:
        """``(file, checksum, size)`` of each per-sample file (size None when unknown)."""
        if self.files is None or self.checksums is None:
            return []
        return list(zip(self.files, self.checksums, self.sizes or [None] * len(self.files)))


def shard_path(format_id: str, split: str, index: int) -> str:
    """The shard folder relative to the dataset root."""
    return f"{format_id}/{split}/shard-{index:05d}"


@dataclass
class StagedShard:
    """A shard encoded in a local staging folder, not yet in the store."""

    rel: str
    stage: Path
    index_bytes: bytes
    entry: ShardEntry
    in_place_staging: bool  # staged beside the target: one rename puts it in place


def write_shard(dataset: Store, fmt: Format, split: str, index: int, keys: Sequence[str],
                images: np.ndarray, labels: np.ndarray, *,
                staging_dir: str | None = None) -> ShardEntry:
    """Write and commit one shard of ``fmt``; returns its manifest entry.

    Any leftovers of an earlier, uncommitted attempt are removed first. The data files
    are uploaded, then the index; the index's presence commits the shard.
    """
    staged = stage_shard(dataset, fmt, split, index, keys, images, labels,
                         staging_dir=staging_dir)
    return commit_shard(dataset, staged)


def stage_shard(dataset: Store, fmt: Format, split: str, index: int, keys: Sequence[str],
                images: np.ndarray, labels: np.ndarray, *,
                staging_dir: str | None = None) -> StagedShard:
    """Encode one shard of ``fmt`` into a staging folder and build its index (no upload)."""
    rel = shard_path(fmt.id, split, index)
    labels = np.asarray(labels, dtype=np.int64)
    if len(keys) != len(images) or len(labels) != len(images):
        raise ValueError(f"{rel}: {len(keys)} keys, {len(images)} images, {len(labels)} labels")
    in_place = dataset.is_local and staging_dir is None
    if in_place:
        # Stage beside the target so the finished folder moves into place by one rename.
        staging_dir = dataset.path(STAGING_DIR)
        os.makedirs(staging_dir, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="shard-", dir=staging_dir))
    try:
        sample_files = fmt.write_shard(stage, np.ascontiguousarray(images), labels)
        index_bytes, extras, data_bytes = _build_index(fmt, stage, split, index, keys,
                                                       labels, sample_files)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    kill_point("shard-stage")
    entry = ShardEntry(split=split, index=index, samples=len(keys),
                       bytes=data_bytes + len(index_bytes), path=rel,
                       index_checksum=checksum_bytes(index_bytes), files=extras)
    return StagedShard(rel, stage, index_bytes, entry, in_place)


def _build_index(fmt: Format, stage: Path, split: str, index: int, keys: Sequence[str],
                 labels: np.ndarray, sample_files: Sequence[Any] | None
                 ) -> tuple[bytes, tuple[FileEntry, ...], int]:
    """The index bytes of a staged shard, its non-sample files, and its data bytes."""
    packed = fmt.kind is FormatKind.PACKED  # members live in the archive, not as files
    listed = set() if packed else {s.file for s in sample_files or ()}
    extras = tuple(
        FileEntry(path=p.relative_to(stage).as_posix(), bytes=p.stat().st_size,
                  checksum=checksum_file(p))
        for p in sorted(stage.rglob("*")) if p.is_file()
        and p.relative_to(stage).as_posix() not in listed
    )
    columns: list[Any] = [list(keys), labels]
    schema = INDEX_SCHEMA
    if fmt.kind is FormatKind.FILES:
        if sample_files is None or len(sample_files) != len(keys):
            raise RuntimeError(f"{fmt.id}: writer returned no per-sample file list")
        columns += [[s.file for s in sample_files], [s.bytes for s in sample_files],
                    [s.checksum for s in sample_files]]
        schema = FILES_INDEX_SCHEMA
    elif packed:
        if sample_files is None or len(sample_files) != len(keys):
            raise RuntimeError(f"{fmt.id}: writer returned no member list")
        columns += [[m.member for m in sample_files], [m.offset for m in sample_files],
                    [m.bytes for m in sample_files], [m.checksum for m in sample_files]]
        schema = PACKED_INDEX_SCHEMA
    # A packed shard's members are inside its archive, which ``extras`` counts already.
    data_bytes = sum(e.bytes for e in extras) + (
        0 if packed else sum(s.bytes for s in sample_files or ()))
    meta = {"format": fmt.id, "split": split, "index": index, "data_bytes": data_bytes,
            "files": [{"path": e.path, "bytes": e.bytes, "checksum": e.checksum}
                      for e in extras]}
    table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema)],
                                 schema=schema).replace_schema_metadata({_META_KEY: json.dumps(meta)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue(), extras, data_bytes


def commit_shard(dataset: Store, staged: StagedShard) -> ShardEntry:
    """Put a staged shard's data in place, then its index (the commit); staging removed.

    Leftovers of an earlier, uncommitted attempt at the same shard are removed first.
    """
    try:
        dataset.delete(staged.rel, recursive=True)
        if staged.in_place_staging:
            target = Path(dataset.path(staged.rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged.stage, target)
        else:
            dataset.put_dir(staged.stage, staged.rel)
        kill_point("shard-data")
        dataset.write_bytes(posixpath.join(staged.rel, INDEX_FILE), staged.index_bytes)
    finally:
        shutil.rmtree(staged.stage, ignore_errors=True)
    return staged.entry


def committed_shard(dataset: Store, format_id: str, split: str, index: int,
                    expected_keys: Sequence[str] | None = None) -> ShardEntry | None:
    """The entry of an already committed shard, or None if it must be (re)written.

    A shard counts as committed when its index exists, parses, and (when given) holds
    exactly ``expected_keys`` in order.
    """
    rel = shard_path(format_id, split, index)
    try:
        index_bytes = dataset.read_bytes(posixpath.join(rel, INDEX_FILE))
    except FileNotFoundError:
        return None
    try:
        table = parquet_table(index_bytes)
        meta = json.loads((table.schema.metadata or {})[_META_KEY])
    except Exception:  # noqa: BLE001 - a damaged index means "not committed"
        return None
    if expected_keys is not None and table.column("key").to_pylist() != list(expected_keys):
        return None
    extras = tuple(FileEntry(**f) for f in meta["files"])
    return ShardEntry(split=split, index=index, samples=table.num_rows,
                      bytes=int(meta["data_bytes"]) + len(index_bytes), path=rel,
                      index_checksum=checksum_bytes(index_bytes), files=extras)


def parquet_table(source: bytes | str) -> pa.Table:
    """A whole Parquet file, from its bytes or a local path.

    Bytes are copied into Arrow's own memory first: Arrow reads on its own threads, and a
    reader over a Python object (a file object, or bytes Arrow only borrows) takes the GIL
    there to let it go; when that happens after the interpreter began to exit (a refused
    index ends a command at once) the process aborts ("terminate called without an
    active exception") instead of exiting with its code. Indexes and results files are
    small: the copy costs nothing measurable.
    """
    if not isinstance(source, str):
        owned = pa.BufferOutputStream()
        owned.write(source)
        return pq.read_table(pa.BufferReader(owned.getvalue()))
    return pq.read_table(source)


def read_index(data: bytes | str | Path) -> pa.Table:
    """Parse an index (bytes or a local path) and check its file paths stay in the shard.

    Raises:
        shared.storage.PathEscapeError: a ``file`` entry is absolute or climbs out.
    """
    table = parquet_table(data if isinstance(data, bytes) else str(data))
    if "file" in table.column_names:
        for name in table.column("file").to_pylist():
            check_relative(name)
    return table
