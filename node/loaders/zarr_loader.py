"""``zarr``: zarr reads in DataLoader workers, from the cache or straight from the store.

A shard's location is its cached folder or, with ``--no-cache``, its URL in the store
(``s3://.../zarr-zstd/train/shard-00000``, read with ``config.storage_options``). The
group is opened lazily in each worker. Per batch the indices are sorted and grouped by
shard, and each shard's part is one orthogonal selection, which fetches and decodes
every chunk it touches once, chunks concurrently. ``bytes_read`` is the stored
(compressed) bytes of those chunks as the store returned them, counted by the
format's reader.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from node.loaders.base import LoaderConfig, open_array_readers
from node.loaders.common import BatchReader, HostBatch, WorkerLoader


class ZarrBatchReader(BatchReader):
    """Reads a batch from the shards' Zarr groups (opened per process by the format)."""

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.shards = open_array_readers(config)

    def read(self, positions: np.ndarray) -> HostBatch:
        positions = np.sort(positions)
        images = self.empty_images(len(positions))
        out = images.numpy()
        stored = 0
        for shard, part, index in self.shard_map.groups(positions):
            reader = self.shards[shard]
            reader.images_array()  # opening reads the group's metadata: not the batch's
            before = reader.bytes_read
            reader.read_into(index, out[part])
            stored += reader.bytes_read - before
        return self.host_batch(images, positions, stored)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


class ZarrLoader(WorkerLoader):
    """Zarr shards read in DataLoader workers, from the cache or the store URL."""

    name: ClassVar[str] = "zarr"
    summary: ClassVar[str] = "zarr reads, from the cache or straight from the store URL"
    # zarr fetches and decodes chunks in one call: no read/decode split (stage times null).
    io_evidence: ClassVar[str] = ("host: zarr chunk reads through fsspec (cached files or "
                                  "the store URL) into host memory in DataLoader workers")

    def make_reader(self) -> ZarrBatchReader:
        return ZarrBatchReader(self.config)
