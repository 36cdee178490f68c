"""``npy``: a shard is ``images.npy`` (N, H, W, C uint8) and ``labels.npy`` (N int64).

Readers memory-map ``images.npy``; loaders that copy whole batches (or whole shards
to the GPU) take the map from :meth:`NpyShardReader.images_array`.

The files are written with their array data at byte :data:`DATA_OFFSET` (4096), the
header padded with spaces, so GPUDirect Storage reads of the data start on a 4 KiB
page (unaligned file offsets go through cuFile's bounce buffers). The padding is
allowed by the ``.npy`` format 1.0 (a 2-byte header length, 65535 at most) and read by
``np.load`` and by DALI's numpy reader, which takes the data offset from the header
length it reads and requires ``(header_len + 10) % 16 == 0`` (dali/util/numpy.cc,
``GetHeaderLen``). Files written before (data at byte 128) stay readable: readers
take the offset from each file's header (:func:`npy_layout`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from shared.formats.base import (ArrayFormat, ArrayShardReader, check_shard_arrays, gather_sorted,
                                 is_url)

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
NPY_VERSION = (1, 0)
DATA_OFFSET = 4096  # GDS's page; recorded in the format's parameters
_MAGIC_LEN = 10  # b"\x93NUMPY", major, minor, uint16 header length


def write_npy(f: IO[bytes], array: np.ndarray, data_offset: int = DATA_OFFSET) -> None:
    """Write ``array`` as ``.npy`` 1.0 with its data starting at byte ``data_offset``.

    Raises:
        ValueError: the array is not plain (e.g. object dtype) or the header does not
            fit in ``data_offset`` (which must be a multiple of 16).
    """
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject or array.dtype.names:
        raise ValueError(f"write_npy: plain dtypes only, got {array.dtype}")
    header = np.lib.format.header_data_from_array_1_0(array)
    text = (f"{{'descr': {header['descr']!r}, 'fortran_order': False, "
            f"'shape': {tuple(array.shape)!r}, }}")
    header_len = data_offset - _MAGIC_LEN
    if data_offset % 16 or len(text) + 1 > header_len or header_len > 0xFFFF:
        raise ValueError(f"write_npy: a {len(text)}-byte header does not fit before byte "
                         f"{data_offset} (a multiple of 16, at most 65545)")
    f.write(np.lib.format.magic(*NPY_VERSION) + struct.pack("<H", header_len))
    f.write(text.ljust(header_len - 1).encode("latin1") + b"\n")
    f.write(array.tobytes())


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        write_npy(f, array)


@dataclass(frozen=True)
class NpyLayout:
    """Where a ``.npy`` file's data starts and what it holds.

    Attributes:
        data_offset: bytes of magic and header before the array data.
        shape, dtype, fortran_order: from the header.
    """

    data_offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    def require(self, image_shape: tuple[int, ...], *, per_sample: bool, who: str) -> "NpyLayout":
        """This layout, if it holds C-order uint8 images of ``image_shape`` (one image
        when ``per_sample``, else N of them, as ``images.npy``).

        Raises:
            ValueError: naming ``who`` and what the header says instead.
        """
        shape = self.shape if per_sample else self.shape[1:]
        if self.dtype != np.uint8 or self.fortran_order or tuple(shape) != tuple(image_shape):
            raise ValueError(f"{who}: expected C-order uint8 "
                             f"{'(H, W, C)' if per_sample else '(N, H, W, C)'} with images "
                             f"{tuple(image_shape)}, got {self.dtype} {self.shape} "
                             f"(fortran_order={self.fortran_order})")
        return self


def npy_layout(path: str | Path) -> NpyLayout:
    """Read a ``.npy`` header with NumPy's own functions (format 1.0 or 2.0).

    Raises:
        ValueError: not a ``.npy`` file, or a format version NumPy cannot read here.
    """
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: .npy format {version} is not supported (1.0, 2.0)")
        return NpyLayout(f.tell(), tuple(shape), np.dtype(dtype), bool(fortran))


class NpyFormat(ArrayFormat):
    """All of a shard's pixels in one C-order ``.npy`` (NumPy format 1.0)."""

    data_files: ClassVar[tuple[str, ...]] = (IMAGES_FILE, LABELS_FILE)

    def __init__(self) -> None:
        super().__init__("npy", "npy", {"npy_version": ".".join(map(str, NPY_VERSION)),
                                        "order": "C", "data_offset": DATA_OFFSET})

    def write_shard(self, out_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
        check_shard_arrays(images, labels)
        _save(out_dir / IMAGES_FILE, images)
        _save(out_dir / LABELS_FILE, np.asarray(labels, dtype=np.int64))

    def open_reader(self, shard_dir: str | Path, files: Sequence[str] | None = None,
                    *, num_samples: int | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> "NpyShardReader":
        if is_url(shard_dir):
            raise ValueError("npy: reads local shard folders only, got a URL")
        return NpyShardReader(Path(shard_dir))


class NpyShardReader(ArrayShardReader):
    """Reads a shard's ``images.npy`` through a read-only memory map (opened on first use).

    Attributes:
        path: the shard's ``images.npy`` (loaders that read the file themselves, with
            cuFile, take it and :meth:`layout` from here).
    """

    def __init__(self, shard_dir: Path) -> None:
        self.path = shard_dir / IMAGES_FILE
        self.bytes_read = 0
        self._images: np.ndarray | None = None

    def layout(self) -> NpyLayout:
        """Where the data of ``images.npy`` starts and what it holds (its header)."""
        return npy_layout(self.path)

    def images_array(self) -> np.ndarray:
        """The read-only memory map of the whole shard, uint8 (N, H, W, C)."""
        if self._images is None:
            images = np.load(self.path, mmap_mode="r", allow_pickle=False)
            if images.dtype != np.uint8 or images.ndim != 4 or not images.flags.c_contiguous:
                raise ValueError(f"{self.path}: expected C-order uint8 (N, H, W, C), got "
                                 f"{images.dtype} {images.shape}")
            self._images = images
        return self._images

    def labels_array(self) -> np.ndarray:
        """The shard's labels, int64 (N,)."""
        return np.load(self.path.with_name(LABELS_FILE), allow_pickle=False)

    def __len__(self) -> int:
        return len(self.images_array())

    def read(self, i: int) -> np.ndarray:
        sample = np.array(self.images_array()[i])
        self.bytes_read += sample.nbytes
        return sample

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        images = self.images_array()

        def take(idx: np.ndarray) -> np.ndarray:
            data = images[idx]
            self.bytes_read += data.nbytes
            return data

        return gather_sorted(take, indices, len(images))

    def read_into(self, sorted_indices: np.ndarray, out: np.ndarray) -> None:
        # mode="clip": the caller's indices are in range, and "raise" would buffer `out`
        # through a temporary copy.
        self.images_array().take(sorted_indices, axis=0, out=out, mode="clip")
        self.bytes_read += out.nbytes

    def close(self) -> None:
        self._images = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap would copy the whole shard; workers map the file themselves.
        return {**self.__dict__, "_images": None}

