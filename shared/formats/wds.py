"""``wds-<codec>``: an image codec's files packed into one tar per shard (WebDataset layout).

A shard holds ``samples.tar``: for sample ``i`` of the shard the member ``<key>.<ext>``
(the codec's own file bytes) followed by ``<key>.cls`` (the label as decimal text), with
``key`` the shard position as six digits (no dots, as WebDataset's key grouping needs).
Members are plain USTAR entries with fixed metadata, so the same images give the same
bytes. The shard's index lists each sample's member name, the offset and length of its
data in the tar and the checksum of those bytes (:data:`shared.shards.PACKED_INDEX_SCHEMA`),
so a loader reads a sample with one positional read and no tar parsing; the tar itself
is checksummed as one of the shard's files.

Encode and decode are the codec's own (``wds-jpeg-q95`` stores exactly the bytes
``jpeg-q95`` would write per file). Ids: ``wds-`` plus any image-file format id,
``wds-jpeg-qN`` included; ``--formats packed`` names the catalog's image codecs packed.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from shared.formats.base import (FileFormat, Format, FormatKind, ShardReader, UnknownFormat,
                                 check_shard_arrays, is_url)

PACKED_PREFIX = "wds-"
PACKED_GROUP = "packed"  # --formats packed: the catalog's image codecs, packed
PACKED_HELP = "wds-<image codec> (e.g. wds-jpeg-q95, wds-png)"
TAR_NAME = "samples.tar"
LABEL_EXT = "cls"
_NOT_IMAGES = ("npy-files",)  # file formats that are not image codecs


@dataclass(frozen=True)
class PackedMember:
    """One sample's image member in a shard's tar: where its data lies, what it hashes to."""

    member: str
    offset: int
    bytes: int
    checksum: str


def member_key(i: int) -> str:
    """The WebDataset key of shard position ``i``."""
    return f"{i:06d}"


class PackedFormat(Format):
    """One tar per shard of a codec's files, WebDataset layout.

    Attributes:
        codec: the image-file format whose bytes the tar's members hold.
    """

    codec: FileFormat

    def __init__(self, codec: FileFormat) -> None:
        params = {"codec": codec.id, "layout": "webdataset", "file": TAR_NAME,
                  **dict(codec.params)}
        super().__init__(id=f"{PACKED_PREFIX}{codec.id}", family="wds", kind=FormatKind.PACKED,
                         lossless=codec.lossless, params=params,
                         compression=codec.compression)
        object.__setattr__(self, "codec", codec)

    @property
    def extension(self) -> str:
        return self.codec.extension

    def encode(self, image: np.ndarray) -> bytes:
        return self.codec.encode(image)

    def decode(self, data: bytes) -> np.ndarray:
        return self.codec.decode(data)

    def write_shard(self, out_dir: Path, images: np.ndarray,
                    labels: np.ndarray) -> list[PackedMember]:  # type: ignore[override]
        from shared.storage import checksum_bytes

        check_shard_arrays(images, labels)
        members = []
        with tarfile.open(out_dir / TAR_NAME, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                key = member_key(i)
                data = self.encode(image)
                name = f"{key}.{self.extension}"
                offset = _add_member(tar, name, data)
                members.append(PackedMember(name, offset, len(data), checksum_bytes(data)))
                _add_member(tar, f"{key}.{LABEL_EXT}", str(int(label)).encode())
        return members

    def open_reader(self, shard_dir: str | Path, files: Sequence[str] | None = None,
                    *, num_samples: int | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> "PackedShardReader":
        return PackedShardReader(self, shard_dir, storage_options or {})


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one regular file; returns the offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    header = info.tobuf(tar.format, tar.encoding, tar.errors)
    offset = tar.offset + len(header)
    tar.addfile(info, io.BytesIO(data))
    return offset


def tar_members(fileobj: IO[bytes]) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each image member of a packed tar, in tar order.

    Raises:
        ValueError: the tar is not in the packed layout (a label member is missing).
    """
    out = []
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        names = []
        for info in tar:
            names.append(info.name)
            if not info.name.endswith(f".{LABEL_EXT}"):
                out.append((info.name, info.offset_data, info.size))
    keys = {n.rsplit(".", 1)[0] for n in names if n.endswith(f".{LABEL_EXT}")}
    if len(keys) != len(out) or any(n.rsplit(".", 1)[0] not in keys for n, _, _ in out):
        raise ValueError(f"not a packed tar: {len(out)} image members, {len(keys)} labels")
    return out


class PackedShardReader(ShardReader):
    """Random access to a packed shard (a local folder or a store URL) by its tar headers.

    The loaders read offsets from the shard's index instead; this reader needs only the
    tar, so a shard can be checked on its own.
    """

    def __init__(self, fmt: PackedFormat, shard_dir: str | Path,
                 storage_options: Mapping[str, Any]) -> None:
        self.fmt = fmt
        self.location = str(shard_dir)
        self.storage_options = dict(storage_options)
        self.bytes_read = 0
        self._file: IO[bytes] | None = None
        self._members: list[tuple[str, int, int]] | None = None

    def _open(self) -> IO[bytes]:
        if self._file is None:
            if is_url(self.location):
                import fsspec

                url = f"{self.location.rstrip('/')}/{TAR_NAME}"
                self._file = fsspec.open(url, "rb", **self.storage_options).open()
            else:
                self._file = open(Path(self.location) / TAR_NAME, "rb")  # noqa: SIM115
            self._members = tar_members(self._file)
        return self._file

    def __len__(self) -> int:
        self._open()
        assert self._members is not None
        return len(self._members)

    def read(self, i: int) -> np.ndarray:
        f = self._open()
        assert self._members is not None
        if not 0 <= i < len(self._members):
            raise IndexError(f"sample {i} outside [0, {len(self._members)})")
        _, offset, size = self._members[i]
        f.seek(offset)
        data = f.read(size)
        self.bytes_read += len(data)
        return np.ascontiguousarray(self.fmt.decode(data))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._members = None, None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_members": None}


def packed_format(format_id: str, codec_of: Callable[[str], Format]) -> PackedFormat:
    """The packed format ``wds-<codec id>``; ``codec_of`` resolves the codec id.

    Raises:
        UnknownFormat: the rest of the id is not an image-file format.
    """
    codec_id = format_id[len(PACKED_PREFIX):]
    try:
        codec = codec_of(codec_id)
    except UnknownFormat:
        codec = None
    if not isinstance(codec, FileFormat) or codec.id in _NOT_IMAGES:
        raise UnknownFormat(f"unknown format {format_id!r}: {PACKED_PREFIX} takes an image "
                            f"codec id, {PACKED_HELP}")
    return PackedFormat(codec)


def packed_ids(catalog: Sequence[str], codec_of: Callable[[str], Format]) -> tuple[str, ...]:
    """The packed variant of each image codec in ``catalog`` (the ``packed`` group)."""
    return tuple(f"{PACKED_PREFIX}{i}" for i in catalog
                 if isinstance(codec_of(i), FileFormat) and i not in _NOT_IMAGES)
