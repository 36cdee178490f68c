"""The protocol every storage format implements.

A format writes one shard of decoded images into a local folder and reads samples
back by index. Staging, checksums, upload and the commit order (data, then
``index.parquet``) live once in :mod:`shared.formats.shard`, not in each format.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np


class FormatKind(str, Enum):
    """``files``: one file per sample, listed in the index. ``array``: container files."""

    FILES = "files"
    ARRAY = "array"


class UnknownFormat(ValueError):
    """A format id that the registry does not know."""


@dataclass(frozen=True)
class SampleFile:
    """One per-sample file a file format wrote (path relative to the shard folder)."""

    file: str
    bytes: int
    checksum: str


class ShardReader(abc.ABC):
    """Random access to the samples of one shard, as uint8 HWC arrays."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, i: int) -> np.ndarray:
        """Sample ``i`` as a C-contiguous uint8 array of shape (H, W, C)."""

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Samples at ``indices`` (in that order) as one uint8 (N, H, W, C) array."""
        return np.stack([self.read(int(i)) for i in indices])

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Format(abc.ABC):
    """A storage format: its id, family, codec parameters and shard writer/reader.

    Attributes:
        id: the format id, also the folder name and CLI value (``jpeg-q95``).
        family: the codec family (``jpeg``, ``hdf5``...), one module each.
        kind: whether the index lists one file per sample.
        lossless: whether pixels round-trip bit-exactly.
        params: codec parameters recorded in the manifest.
    """

    id: str
    family: str
    kind: FormatKind
    lossless: bool
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def bits_per_channel(self) -> int:
        return 8

    @abc.abstractmethod
    def write_shard(self, out_dir: Path, images: np.ndarray,
                    labels: np.ndarray) -> list[SampleFile] | None:
        """Write one shard's samples into the empty local folder ``out_dir``.

        Args:
            out_dir: an existing, empty local folder.
            images: uint8 array (N, H, W, 3), C order.
            labels: int64 array (N,).

        Returns:
            For file formats, one :class:`SampleFile` per sample, in order; for array
            formats ``None`` (their files are checksummed by the caller).
        """

    @abc.abstractmethod
    def open_reader(self, shard_dir: str | Path, files: Sequence[str] | None = None,
                    *, num_samples: int | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> ShardReader:
        """Open a committed shard for random access.

        Args:
            shard_dir: the shard folder (a local path; zarr also takes a URL).
            files: for file formats, the per-sample file names from the index.
            num_samples: the shard's sample count, where the reader cannot tell.
            storage_options: fsspec options when ``shard_dir`` is a remote URL.
        """


class FileFormat(Format):
    """A format with one encoded image file per sample; subclasses add the codec."""

    extension: str = ""

    def __init__(self, id: str, family: str, lossless: bool,
                 params: Mapping[str, Any] | None = None, *, extension: str) -> None:
        super().__init__(id=id, family=family, kind=FormatKind.FILES, lossless=lossless,
                         params=dict(params or {}))
        object.__setattr__(self, "extension", extension)

    @abc.abstractmethod
    def encode(self, image: np.ndarray) -> bytes:
        """Encode one uint8 HWC image."""

    @abc.abstractmethod
    def decode(self, data: bytes) -> np.ndarray:
        """Decode one file's bytes to uint8 HWC (RGB)."""

    def write_shard(self, out_dir: Path, images: np.ndarray,
                    labels: np.ndarray) -> list[SampleFile]:
        from shared.storage import checksum_bytes

        out = []
        for i, image in enumerate(images):
            data = self.encode(image)
            name = f"{i:06d}.{self.extension}"
            (out_dir / name).write_bytes(data)
            out.append(SampleFile(file=name, bytes=len(data), checksum=checksum_bytes(data)))
        return out

    def open_reader(self, shard_dir: str | Path, files: Sequence[str] | None = None,
                    *, num_samples: int | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> ShardReader:
        if files is None:
            raise ValueError(f"{self.id}: a file format's reader needs the index's file list")
        return FileShardReader(self, Path(shard_dir), files)


class FileShardReader(ShardReader):
    """Reads per-sample files of a local shard folder, paths checked to stay inside it."""

    def __init__(self, fmt: FileFormat, shard_dir: Path, files: Sequence[str]) -> None:
        from shared.storage import safe_local_path

        self.fmt = fmt
        self.paths = [safe_local_path(shard_dir, f) for f in files]

    def __len__(self) -> int:
        return len(self.paths)

    def read_bytes(self, i: int) -> bytes:
        return self.paths[i].read_bytes()

    def read(self, i: int) -> np.ndarray:
        return self.fmt.decode(self.read_bytes(i))
