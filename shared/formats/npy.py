"""``npy``: a shard is ``images.npy`` (N, H, W, C uint8) and ``labels.npy`` (N int64).

Readers memory-map ``images.npy``; loaders that copy whole batches (or whole shards
to the GPU) take the map from :meth:`NpyShardReader.images_array`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.formats.base import ArrayFormat, ShardReader, check_shard_arrays, gather_sorted, is_url

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
NPY_VERSION = (1, 0)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), version=NPY_VERSION,
                                  allow_pickle=False)


class NpyFormat(ArrayFormat):
    """All of a shard's pixels in one C-order ``.npy`` (NumPy format 1.0)."""

    def __init__(self) -> None:
        super().__init__("npy", "npy", {"npy_version": ".".join(map(str, NPY_VERSION)),
                                        "order": "C"})

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


class NpyShardReader(ShardReader):
    """Reads a shard's ``images.npy`` through a read-only memory map (opened on first use)."""

    def __init__(self, shard_dir: Path) -> None:
        self.path = shard_dir / IMAGES_FILE
        self.bytes_read = 0
        self._images: np.ndarray | None = None

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

    def close(self) -> None:
        self._images = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap would copy the whole shard; workers map the file themselves.
        return {**self.__dict__, "_images": None}

