"""``hdf5``: h5py reads in DataLoader workers, the file opened lazily in each worker.

A batch's indices are sorted and grouped by shard; each run of consecutive indices
is one slice read. h5py's fancy indexing (``dset[sorted_idx]``) is not used: with
HDF5 2.0 it measured about 25x slower per sample than single-sample reads (it builds
one hyperslab union per call). ``bytes_read`` is the stored (compressed) size of the
chunks a batch touches, from HDF5's chunk index; for a contiguous dataset, the
slices' ``nbytes``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from node.loaders.base import LoaderConfig
from node.loaders.common import BatchReader, HostBatch, WorkerLoader
from shared.formats import Format


def _stored_chunk_sizes(dataset: Any) -> np.ndarray | None:
    """Stored bytes of each chunk along axis 0, or None for a contiguous dataset."""
    if dataset.chunks is None:
        return None
    rows = dataset.chunks[0]
    sizes = np.zeros((len(dataset) + rows - 1) // rows, dtype=np.int64)

    def record(info: Any) -> None:
        sizes[info.chunk_offset[0] // rows] += info.size

    dataset.id.chunk_iter(record)
    return sizes


def _read_runs(dataset: Any, index: np.ndarray, out: np.ndarray) -> None:
    """Read sorted, unique ``index`` into ``out``, one slice per run of consecutive indices."""
    breaks = (np.flatnonzero(np.diff(index) != 1) + 1).tolist()
    for lo, hi in zip([0, *breaks], [*breaks, len(index)], strict=True):
        first = int(index[lo])
        if hi - lo == 1:
            out[lo] = dataset[first]
        else:
            out[lo:hi] = dataset[first:first + hi - lo]


class Hdf5BatchReader(BatchReader):
    """Reads a batch from the shards' HDF5 files (opened per process by the format)."""

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.shards = [config.fmt.open_reader(s.location, num_samples=len(s.labels))
                       for s in config.shards]
        self._chunk_sizes: dict[int, np.ndarray | None] = {}

    def read(self, positions: np.ndarray) -> HostBatch:
        positions = np.sort(positions)
        images = self.empty_images(len(positions))
        out = images.numpy()
        stored = 0
        for shard, part, index in self.shard_map.groups(positions):
            dataset = self.shards[shard].images_dataset()  # type: ignore[attr-defined]
            if shard not in self._chunk_sizes:
                self._chunk_sizes[shard] = _stored_chunk_sizes(dataset)
            sizes = self._chunk_sizes[shard]
            _read_runs(dataset, index, out[part])
            if sizes is None:
                stored += out[part].nbytes
            else:
                stored += int(sizes[np.unique(index // dataset.chunks[0])].sum())
        return self.host_batch(images, positions, stored)

    def close(self) -> None:
        # Closing the file also drops HDF5's chunk cache, which would serve a "cold"
        # epoch from user-space memory.
        for shard in self.shards:
            shard.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_chunk_sizes": {}}


class Hdf5Loader(WorkerLoader):
    """HDF5 shards read with h5py in DataLoader workers."""

    name: ClassVar[str] = "hdf5"
    summary: ClassVar[str] = "h5py, file opened per worker, batched reads"
    formats_help: ClassVar[str] = "hdf5, hdf5-gzip, hdf5-lzf"
    # h5py reads and decompresses in one call: no read/decode split (stage times null).
    io_evidence: ClassVar[str] = ("host: h5py reads (HDF5 sec2 driver, POSIX pread) into "
                                  "host memory in DataLoader workers")

    @classmethod
    def supports(cls, fmt: Format) -> bool:
        return fmt.family == "hdf5"

    def make_reader(self) -> Hdf5BatchReader:
        return Hdf5BatchReader(self.config)
