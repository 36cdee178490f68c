"""``hdf5``, ``hdf5-gzip``, ``hdf5-lzf``: a shard is one ``data.h5`` with datasets
``images`` (N, H, W, C uint8, one chunk per sample) and ``labels`` (N int64).

h5py handles must not cross a fork, so a reader opens the file on first use in each
process (a DataLoader worker forked from the process that built the reader reopens it).

Sorted reads (:meth:`Hdf5ShardReader.read_into`) read each run of consecutive indices
as one slice. h5py's fancy indexing (``dset[sorted_idx]``) is not used there: with HDF5
2.0 it measured about 25x slower per sample than single-sample reads (it builds one
hyperslab union per call). ``bytes_read`` is the stored (compressed) size of the chunks
read, from HDF5's chunk index; for a contiguous dataset, the samples' ``nbytes``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shared.formats.base import (ArrayFormat, ArrayShardReader, check_shard_arrays, gather_sorted,
                                 is_url)

DATA_FILE = "data.h5"

# format id -> (report label, h5py create_dataset filter options)
HDF5_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "hdf5": ("none", {}),
    "hdf5-gzip": ("gzip-4", {"compression": "gzip", "compression_opts": 4}),
    "hdf5-lzf": ("lzf", {"compression": "lzf"}),
}


class Hdf5Format(ArrayFormat):
    """One HDF5 file per shard, chunked per sample so a sample read touches one chunk."""

    data_files: ClassVar[tuple[str, ...]] = (DATA_FILE,)

    def __init__(self, id: str) -> None:
        if id not in HDF5_VARIANTS:
            raise ValueError(f"unknown HDF5 variant {id!r}; valid: {', '.join(HDF5_VARIANTS)}")
        label, filters = HDF5_VARIANTS[id]
        super().__init__(id, "hdf5", {"chunks": "per-sample", **filters}, compression=label)

    @property
    def filters(self) -> dict[str, Any]:
        """h5py ``create_dataset`` keyword arguments for this variant's compression."""
        return dict(HDF5_VARIANTS[self.id][1])

    def write_shard(self, out_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
        import h5py

        check_shard_arrays(images, labels)
        # track_times=False: no timestamps, so the same shard gives the same bytes.
        with h5py.File(out_dir / DATA_FILE, "w") as f:
            f.create_dataset("images", data=images, chunks=(1, *images.shape[1:]),
                             track_times=False, **self.filters)
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64),
                             track_times=False)

    def open_reader(self, shard_dir: str | Path, files: Sequence[str] | None = None,
                    *, num_samples: int | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> "Hdf5ShardReader":
        if is_url(shard_dir):
            raise ValueError(f"{self.id}: reads local shard folders only, got a URL")
        return Hdf5ShardReader(Path(shard_dir) / DATA_FILE, num_samples=num_samples)


def stored_chunk_sizes(dataset: Any) -> np.ndarray | None:
    """Stored bytes of each chunk of an h5py dataset along axis 0, or None when the
    dataset is contiguous. HDF5 < 1.12.3 cannot iterate chunks: then their mean."""
    if dataset.chunks is None:
        return None
    rows = dataset.chunks[0]
    sizes = np.zeros((len(dataset) + rows - 1) // rows, dtype=np.int64)

    def record(info: Any) -> None:
        sizes[info.chunk_offset[0] // rows] += info.size

    try:
        dataset.id.chunk_iter(record)
    except AttributeError:
        sizes[:] = dataset.id.get_storage_size() // max(1, len(sizes))
    return sizes


def read_runs(dataset: Any, index: np.ndarray, out: np.ndarray) -> None:
    """Read sorted, unique ``index`` into ``out``, one slice per run of consecutive indices."""
    breaks = (np.flatnonzero(np.diff(index) != 1) + 1).tolist()
    for lo, hi in zip([0, *breaks], [*breaks, len(index)], strict=True):
        first = int(index[lo])
        if hi - lo == 1:
            out[lo] = dataset[first]
        else:
            out[lo:hi] = dataset[first:first + hi - lo]


class Hdf5ShardReader(ArrayShardReader):
    """Reads ``images`` of a shard's HDF5 file, opened lazily once per process."""

    def __init__(self, path: Path, *, num_samples: int | None = None) -> None:
        self.path = path
        self.bytes_read = 0
        self._num_samples = num_samples
        self._file: Any = None
        self._pid: int | None = None
        self._chunk_bytes: np.ndarray | None = None
        self._sized = False

    def _open(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            import h5py

            # A handle inherited through fork belongs to the parent: drop it unclosed.
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def images_array(self) -> Any:
        """The ``images`` h5py dataset, opened in this process."""
        return self._open()["images"]

    def labels_array(self) -> np.ndarray:
        return np.asarray(self._open()["labels"][...], dtype=np.int64)

    def _stored_bytes(self, idx: np.ndarray) -> int:
        """Stored bytes of the chunks holding sorted, unique samples ``idx``."""
        ds = self.images_array()
        if not self._sized:
            self._chunk_bytes, self._sized = stored_chunk_sizes(ds), True
        if self._chunk_bytes is None:
            return len(idx) * int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
        return int(self._chunk_bytes[np.unique(idx // ds.chunks[0])].sum())

    def __len__(self) -> int:
        if self._num_samples is None:
            self._num_samples = len(self.images_array())
        return self._num_samples

    def read(self, i: int) -> np.ndarray:
        sample = self.images_array()[i]
        self.bytes_read += self._stored_bytes(np.array([i]))
        return sample

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        ds = self.images_array()

        def take(idx: np.ndarray) -> np.ndarray:
            self.bytes_read += self._stored_bytes(idx)
            return ds[idx]

        return gather_sorted(take, indices, len(ds))

    def read_into(self, sorted_indices: np.ndarray, out: np.ndarray) -> None:
        read_runs(self.images_array(), sorted_indices, out)
        self.bytes_read += self._stored_bytes(sorted_indices)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": None}
