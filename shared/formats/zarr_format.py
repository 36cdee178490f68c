"""``zarr`` and ``zarr-zstd``: a shard is one Zarr v3 group ``data.zarr`` with arrays
``images`` (N, H, W, C uint8, chunked along N) and ``labels`` (N int64).

Unlike the other array formats, a Zarr shard can be read straight from object storage
(``--no-cache``): the reader takes a local folder or an fsspec URL. Named so that it
does not shadow the ``zarr`` package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shared.formats.base import (ArrayFormat, ArrayShardReader, check_shard_arrays, gather_sorted,
                                 is_url)

GROUP = "data.zarr"
MAX_CHUNK_SAMPLES = 64
# Caps a chunk at a few MiB for large images, so one random read is not tens of MiB.
TARGET_CHUNK_BYTES = 4 << 20
ZSTD_LEVEL = 3


def chunk_samples(sample_bytes: int) -> int:
    """Samples per chunk along N: up to 64, at most ~4 MiB, at least one."""
    return max(1, min(MAX_CHUNK_SAMPLES, TARGET_CHUNK_BYTES // max(1, sample_bytes)))


class ZarrFormat(ArrayFormat):
    """A Zarr v3 group per shard, uncompressed or Zstandard-compressed."""

    data_files: ClassVar[tuple[str, ...]] = (GROUP,)

    def __init__(self, zstd: bool) -> None:
        codec = {"compressor": f"zstd-{ZSTD_LEVEL}" if zstd else "none"}
        super().__init__("zarr-zstd" if zstd else "zarr", "zarr",
                         {"zarr_format": 3, **codec, "chunk_samples_max": MAX_CHUNK_SAMPLES,
                          "chunk_bytes_target": TARGET_CHUNK_BYTES},
                         compression=codec["compressor"])

    @property
    def zstd(self) -> bool:
        return self.id == "zarr-zstd"

    def compressors(self) -> Any:
        """The zarr ``compressors`` argument (None: store chunks raw)."""
        if not self.zstd:
            return None
        from zarr.codecs import ZstdCodec

        return ZstdCodec(level=ZSTD_LEVEL)

    def write_shard(self, out_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
        import zarr

        check_shard_arrays(images, labels)
        group = zarr.create_group(store=str(out_dir / GROUP), zarr_format=3)
        # No longer than the shard: zarr stores an edge chunk at full size.
        per_chunk = min(len(images), chunk_samples(int(np.prod(images.shape[1:]))))
        # write_empty_chunks: every chunk is a file, so a missing file means a lost file.
        config = {"write_empty_chunks": True}
        arr = group.create_array("images", shape=images.shape, dtype=np.uint8,
                                 chunks=(per_chunk, *images.shape[1:]),
                                 compressors=self.compressors(), fill_value=0,
                                 dimension_names=("n", "h", "w", "c"), config=config)
        arr[...] = images
        lab = group.create_array("labels", shape=labels.shape, dtype=np.int64,
                                 chunks=labels.shape, compressors=self.compressors(),
                                 fill_value=0, dimension_names=("n",), config=config)
        lab[...] = np.asarray(labels, dtype=np.int64)

    def open_reader(self, shard_dir: str | Path, files: Sequence[str] | None = None,
                    *, num_samples: int | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> "ZarrShardReader":
        if is_url(shard_dir):
            location = f"{str(shard_dir).rstrip('/')}/{GROUP}"
        else:
            location = str(Path(shard_dir) / GROUP)
        return ZarrShardReader(location, storage_options=storage_options)


def _counting_store(location: str, storage_options: Mapping[str, Any] | None,
                    counter: list[int]) -> Any:
    """A read-only zarr store for ``location`` that adds every byte it returns to counter[0]."""
    from zarr.storage import FsspecStore, LocalStore, WrapperStore

    class CountingStore(WrapperStore):  # type: ignore[type-arg]
        def _with_store(self, store: Any) -> "CountingStore":
            return CountingStore(store)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            buf = await self._store.get(key, prototype, byte_range)
            if buf is not None:
                counter[0] += len(buf)
            return buf

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
            bufs = await self._store.get_partial_values(prototype, key_ranges)
            counter[0] += sum(len(b) for b in bufs if b is not None)
            return bufs

    if is_url(location):
        store = FsspecStore.from_url(location, storage_options=dict(storage_options or {}),
                                     read_only=True)
    else:
        store = LocalStore(location, read_only=True)
    return CountingStore(store)


class ZarrShardReader(ArrayShardReader):
    """Reads a shard's Zarr group from a folder or URL, opened lazily once per process.

    Attributes:
        location: the group's path or URL.
        bytes_read: stored bytes fetched so far (chunks and metadata).
    """

    def __init__(self, location: str,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.location = location
        self.storage_options = dict(storage_options or {})
        self._counter = [0]
        self._group: Any = None
        self._images: Any = None
        self._pid: int | None = None

    @property
    def bytes_read(self) -> int:  # type: ignore[override]
        return self._counter[0]

    def group(self) -> Any:
        """The shard's zarr group, opened in this process."""
        if self._group is None or self._pid != os.getpid():
            import zarr

            # fsspec's async filesystems refuse to run in a forked child: reopen there.
            store = _counting_store(self.location, self.storage_options, self._counter)
            self._group = zarr.open_group(store=store, mode="r")
            self._images = self._group["images"]
            self._pid = os.getpid()
        return self._group

    def images_array(self) -> Any:
        """The ``images`` zarr array, uint8 (N, H, W, C), opened in this process."""
        self.group()
        return self._images

    def labels_array(self) -> np.ndarray:
        """The shard's labels, int64 (N,)."""
        return np.asarray(self.group()["labels"][...])

    def __len__(self) -> int:
        return int(self.images_array().shape[0])

    def read(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self.images_array()[i])

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        arr = self.images_array()
        # oindex fetches and decodes each chunk touched once, chunks concurrently.
        return gather_sorted(lambda idx: np.ascontiguousarray(arr.oindex[idx]), indices,
                             arr.shape[0])

    def read_into(self, sorted_indices: np.ndarray, out: np.ndarray) -> None:
        # oindex fetches and decodes each chunk touched once; the counting store adds
        # the stored bytes it returned to bytes_read.
        out[...] = self.images_array().oindex[sorted_indices]

    def close(self) -> None:
        self._group = self._images = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None, "_images": None, "_pid": None}
