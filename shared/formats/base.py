"""The protocol every storage format implements.

A format writes one shard of decoded images into a local folder and reads samples
back by index. Staging, checksums, upload and the commit order (data, then
``index.parquet``) live once in :mod:`shared.shards`, not in each format.
"""

from __future__ import annotations

import abc
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from shared.manifest import FormatEntry


class FormatKind(str, Enum):
    """``files``: one file per sample, listed in the index. ``array``: container files.
    ``packed``: one archive of per-sample members, each member's place in the index."""

    FILES = "files"
    ARRAY = "array"
    PACKED = "packed"


class UnknownFormat(ValueError):
    """A format id that the registry does not know."""


class FormatMismatch(ValueError):
    """A dataset's format entry that this formatlab's format of that id does not match."""


@dataclass(frozen=True)
class SampleFile:
    """One per-sample file a file format wrote (path relative to the shard folder)."""

    file: str
    bytes: int
    checksum: str


def check_shard_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    """Refuse a shard that is not ``uint8`` (N, H, W, C) with N int labels, N >= 1.

    Raises:
        ValueError: naming what is wrong.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("a shard needs at least one sample")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{len(images)} images but labels of shape {labels.shape}")


def is_url(location: str | Path) -> bool:
    """True for ``s3://...``-style locations, False for local paths."""
    return "://" in str(location)


def gather_sorted(take: Callable[[np.ndarray], np.ndarray], indices: Sequence[int],
                  length: int) -> np.ndarray:
    """Read ``indices`` through ``take`` in increasing order, return them in the asked order.

    ``take`` receives sorted, unique, in-range indices (as h5py's fancy indexing needs,
    and as sequential reads like).

    Raises:
        IndexError: an index is outside ``[0, length)``.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= length):
        raise IndexError(f"indices outside [0, {length}): {idx[(idx < 0) | (idx >= length)][:5]}")
    uniq, inverse = np.unique(idx, return_inverse=True)
    data = take(uniq)
    if len(uniq) == len(idx) and np.array_equal(uniq, idx):
        return data
    return data[inverse]


class ShardReader(abc.ABC):
    """Random access to the samples of one shard, as uint8 HWC arrays.

    Attributes:
        bytes_read: bytes read from storage so far (encoded or stored bytes).
    """

    bytes_read: int = 0

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, i: int) -> np.ndarray:
        """Sample ``i`` as a C-contiguous uint8 array of shape (H, W, C), maybe read-only."""

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Samples at ``indices`` (in that order) as one uint8 (N, H, W, C) array."""
        return np.stack([self.read(int(i)) for i in indices])

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageArray(Protocol):
    """A shard's images as one array-like, uint8 (N, H, W, C): a NumPy memory map, an
    h5py dataset, a zarr array. Indexing by an int or a slice reads those samples."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any) -> Any: ...


class ArrayShardReader(ShardReader):
    """The reader of an array format: the shard's images as one array, its labels as
    another, and sorted reads straight into a caller's buffer."""

    @abc.abstractmethod
    def images_array(self) -> ImageArray:
        """The shard's images, opened in this process (lazily; reopened after a fork)."""

    @abc.abstractmethod
    def labels_array(self) -> np.ndarray:
        """The shard's labels, int64 (N,)."""

    def read_into(self, sorted_indices: np.ndarray, out: np.ndarray) -> None:
        """Read sorted, unique, in-range samples into ``out`` (len(indices), H, W, C),
        adding what was read from storage to :attr:`bytes_read`."""
        out[...] = self.read_batch(sorted_indices)


@dataclass(frozen=True)
class Format(abc.ABC):
    """A storage format: its id, family, codec parameters and shard writer/reader.

    Attributes:
        id: the format id, also the folder name and CLI value (``jpeg-q95``).
        family: the codec family (``jpeg``, ``hdf5``...), one module each.
        kind: whether the index lists one file per sample.
        lossless: whether pixels round-trip bit-exactly.
        params: codec parameters recorded in the manifest.
        compression: a short label for reports (``none``, ``lzw``, ``zstd-3``, ``q95``).
    """

    id: str
    family: str
    kind: FormatKind
    lossless: bool
    params: Mapping[str, Any] = field(default_factory=dict)
    compression: str = "none"

    def __hash__(self) -> int:
        # The generated hash would fail on the ``params`` dict; the id identifies a format.
        return hash((type(self), self.id))

    @property
    def bits_per_channel(self) -> int:
        return 8

    @classmethod
    def from_entry(cls, entry: FormatEntry) -> Format:
        """The format a dataset's manifest entry says its shards hold.

        Built from the entry's id by the registry; the entry's recorded kind and
        parameters must agree with the registry's. A parameter the entry does not
        record is taken as the registry's (manifests written before it was recorded).

        Raises:
            UnknownFormat: the id is not registered.
            FormatMismatch: the kind or a recorded parameter differs (one line naming
                the id and the parameter).
        """
        from shared.formats.registry import get_format

        fmt = get_format(entry.id)
        if not isinstance(fmt, cls):
            raise FormatMismatch(f"format {entry.id!r} is a {type(fmt).__name__}, "
                                 f"not a {cls.__name__}")
        fmt.check_entry(entry)
        return fmt

    def check_entry(self, entry: FormatEntry) -> None:
        """Refuse a manifest entry whose kind or recorded parameters differ from this
        format's (see :meth:`from_entry`)."""
        written = f"format {self.id!r}: the dataset was written with"
        if entry.kind != self.kind.value:
            raise FormatMismatch(f"{written} kind {entry.kind!r}, this formatlab's "
                                 f"{self.id} is {self.kind.value!r}; convert it again")
        ours = json.loads(json.dumps(dict(self.params)))  # as the manifest stores them
        for key, value in entry.params.items():
            if key not in ours:
                raise FormatMismatch(f"{written} parameter {key}={value!r}, which this "
                                     f"formatlab's {self.id} does not have; convert it again")
            if ours[key] != value:
                raise FormatMismatch(f"{written} {key}={value!r}, this formatlab's "
                                     f"{self.id} has {key}={ours[key]!r}; convert it again")

    def describe(self) -> dict[str, Any]:
        """The format's row of the report's format table."""
        return {"id": self.id, "family": self.family, "kind": self.kind.value,
                "lossless": self.lossless, "bits": self.bits_per_channel,
                "compression": self.compression, "params": dict(self.params)}

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


class ArrayFormat(Format):
    """A lossless format whose shard is a few container files, not one file per sample.

    Attributes:
        data_files: the files (or, for Zarr, the folder) a shard holds besides its index,
            relative to the shard folder: the layout, declared once, here.
    """

    data_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, id: str, family: str, params: Mapping[str, Any] | None = None, *,
                 compression: str = "none") -> None:
        super().__init__(id=id, family=family, kind=FormatKind.ARRAY, lossless=True,
                         params=dict(params or {}), compression=compression)

    @abc.abstractmethod
    def open_reader(self, shard_dir: str | Path, files: Sequence[str] | None = None,
                    *, num_samples: int | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> ArrayShardReader:
        """Open a committed shard (see :meth:`Format.open_reader`)."""


class FileFormat(Format):
    """A format with one encoded image file per sample; subclasses add the codec."""

    extension: str = ""

    def __init__(self, id: str, family: str, lossless: bool,
                 params: Mapping[str, Any] | None = None, *, extension: str,
                 compression: str = "none") -> None:
        super().__init__(id=id, family=family, kind=FormatKind.FILES, lossless=lossless,
                         params=dict(params or {}), compression=compression)
        object.__setattr__(self, "extension", extension)

    @abc.abstractmethod
    def encode(self, image: np.ndarray) -> bytes:
        """Encode one uint8 HWC image."""

    @abc.abstractmethod
    def decode(self, data: bytes | bytearray) -> np.ndarray:
        """Decode one file's bytes to uint8 HWC (RGB)."""

    def write_shard(self, out_dir: Path, images: np.ndarray,
                    labels: np.ndarray) -> list[SampleFile]:
        from shared.storage import checksum_bytes

        check_shard_arrays(images, labels)
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
        if is_url(shard_dir):
            raise ValueError(f"{self.id}: reads local shard folders only, got a URL")
        return FileShardReader(self, Path(shard_dir), files)


class PillowFormat(FileFormat):
    """An image-file format that Pillow encodes and decodes; subclasses pick the options.

    Attributes:
        pillow_format: Pillow's name for the codec (``PNG``, ``JPEG2000``...).
        save_options: keyword arguments of ``Image.save``.
    """

    pillow_format: str
    save_options: Mapping[str, Any]

    def __init__(self, id: str, family: str, lossless: bool, *, extension: str,
                 compression: str, pillow_format: str, save_options: Mapping[str, Any],
                 params: Mapping[str, Any] | None = None) -> None:
        super().__init__(id, family, lossless,
                         params if params is not None else save_options,
                         extension=extension, compression=compression)
        object.__setattr__(self, "pillow_format", pillow_format)
        object.__setattr__(self, "save_options", dict(save_options))

    def encode(self, image: np.ndarray) -> bytes:
        from PIL import Image

        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{self.id}: expects (H, W, 3) RGB, got shape {image.shape}")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=self.pillow_format, **self.save_options)
        return buf.getvalue()

    def decode(self, data: bytes | bytearray) -> np.ndarray:
        from PIL import Image

        # Only this codec's parser: a file is never sniffed as some other format.
        with Image.open(io.BytesIO(data), formats=(self.pillow_format,)) as img:
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img)


class FileShardReader(ShardReader):
    """Reads per-sample files of a local shard folder, paths checked to stay inside it."""

    def __init__(self, fmt: FileFormat, shard_dir: Path, files: Sequence[str]) -> None:
        from shared.storage import safe_local_path

        self.fmt = fmt
        self.paths = [safe_local_path(shard_dir, f) for f in files]
        self.bytes_read = 0

    def __len__(self) -> int:
        return len(self.paths)

    def read_bytes(self, i: int) -> bytes:
        data = self.paths[i].read_bytes()
        self.bytes_read += len(data)
        return data

    def read(self, i: int) -> np.ndarray:
        return self.fmt.decode(self.read_bytes(i))
