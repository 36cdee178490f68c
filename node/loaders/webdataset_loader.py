"""``webdataset``: the WebDataset library's own pipeline over the cached packed shards.

A peer in the matrix (``peers`` extra): what a WebDataset user runs, on formatlab's
``wds-*`` shards (``<format>/<split>/shard-NNNNN/samples.tar``, members ``<key>.<ext>``
then ``<key>.cls``, samples in shard order). Each epoch every DataLoader worker builds
``wds.WebDataset(its shards).map(place).shuffle(...).decode("rgb8").to_tuple(...)
.batched(...)``: shards split between workers by WebDataset's ``split_by_worker`` after
a shard shuffle, a sample shuffle buffer before decoding, PIL decode, then batches.
Workers persist; the epoch number reaches them through a shared value.

Order. WebDataset reads each tar front to back, so it cannot deliver the contract's
planned batches (:meth:`Loader.batches`); like its users, this loader shuffles its own
way: shard order from ``(seed, epoch)``, a sample buffer seeded by ``(seed, epoch,
worker)``. Every sample of the rank's ranges still comes exactly once per epoch with
its position and label, the same seed gives the same order, epochs differ, and all
batches but the last are full (each worker's short last batch is held back and the
short ones are re-cut into full batches at the end of the epoch). ``follows_plan`` is
False to say so.

Positions: the i-th sample of a shard's tar is index i of its index (the layout keeps
shard order); its tar key is checked against the index (its ``member`` column where it
has one, else its ``key`` column). Samples outside the rank's range of a shard are read
but dropped before decoding. Labels come from the ``.cls`` members, as WebDataset's users
get them. ``bytes_read`` counts the batch's image members, as the packed loader does
(tar headers, ``.cls`` members and dropped samples not included).
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from node.loaders.base import Batch, Loader, LoaderConfig, timed_to_device
from node.loaders.common import shutdown_workers
from node.loaders.staging import StagingBound, batch_bytes, check_host_staging, worker_bound
from shared.formats import Format
from shared.formats.base import is_url

TAR_NAME = "samples.tar"
INDEX_NAME = "index.parquet"
LABEL_EXT = "cls"
SHUFFLE_BUFFER = 5_000  # samples, encoded; WebDataset's examples use 1,000-5,000
SAMPLE_OVERHEAD = 1 << 10  # per buffered sample beside its image: dict, key, label member
PREFETCH = 2  # the DataLoader's default prefetch_factor, which WebDataset's users keep
# Member extensions tried for the image, after the format's own (WebDataset's getfirst).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "jp2")
# images, labels, positions, and each sample's member bytes
_HostBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def image_keys(fmt: Format) -> str:
    """The ``to_tuple`` alternatives for the image member, the format's extension first."""
    own = str(getattr(fmt, "extension", "") or fmt.params.get("extension", "")).lstrip(".")
    return ";".join(dict.fromkeys([e for e in (own, *IMAGE_EXTENSIONS) if e]))


def tar_keys(shard_dir: str) -> tuple[str, ...]:
    """The WebDataset key of each sample of a shard's tar, from the shard's index."""
    table = pq.read_table(os.path.join(shard_dir, INDEX_NAME))
    if "member" in table.column_names:  # member names: <key>.<ext>
        return tuple(m.split(".", 1)[0] for m in table.column("member").to_pylist())
    return tuple(table.column("key").to_pylist())


def largest_member(shard_dir: str) -> int:
    """The largest image member of a shard (its index's ``bytes``), else the tar's size."""
    table = pq.read_table(os.path.join(shard_dir, INDEX_NAME))
    if "bytes" not in table.column_names or not table.num_rows:
        return os.path.getsize(os.path.join(shard_dir, TAR_NAME))
    return int(max(table.column("bytes").to_pylist()))


class _Placer:
    """Gives each sample its rank position (``__pos__``) and member bytes (``__bytes__``),
    or drops it when it lies outside the rank's range of its shard.

    Runs in shard order, one shard at a time per worker: the i-th sample of a tar is
    index i of its shard.
    """

    def __init__(self, urls: list[str], keys: list[tuple[str, ...]],
                 config: LoaderConfig) -> None:
        self.shard_of = {url: k for k, url in enumerate(urls)}
        self.keys = keys
        self.slices = config.shards
        self.offsets = np.cumsum([0] + [len(s) for s in config.shards]).tolist()
        self.url: str | None = None
        self.index = 0

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        url = sample["__url__"]
        if url != self.url:
            self.url, self.index = url, 0
        k, i = self.shard_of[url], self.index
        self.index += 1
        s = self.slices[k]
        if i >= len(s.labels):
            raise ValueError(f"{url}: more samples than the shard's index lists "
                             f"({len(s.labels)})")
        if sample["__key__"] != self.keys[k][i]:
            raise ValueError(f"{url}: sample {i} is {sample['__key__']!r}, the shard's "
                             f"index says {self.keys[k][i]!r}")
        if not s.start <= i < s.stop:
            return None
        sample["__pos__"] = self.offsets[k] + i - s.start
        sample["__bytes__"] = sum(len(v) for ext, v in sample.items()
                                  if not ext.startswith("__") and ext != LABEL_EXT)
        return sample


class _Collate:
    """WebDataset's ``batched`` collation into the contract's host tensors."""

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        self.image_shape = image_shape

    def __call__(self, samples: list[tuple[Any, ...]]) -> _HostBatch:
        images = np.stack([s[0] for s in samples])
        if images.shape[1:] != self.image_shape:
            raise ValueError(f"webdataset: decoded images of shape {images.shape[1:]}, the "
                             f"dataset's images are {self.image_shape}")
        return (torch.from_numpy(images),
                torch.tensor([int(s[1]) for s in samples], dtype=torch.int64),
                torch.tensor([s[2] for s in samples], dtype=torch.int64),
                torch.tensor([s[3] for s in samples], dtype=torch.int64))


class _WdsEpochs(IterableDataset):
    """One epoch of the WebDataset pipeline per ``iter()``, in whichever process runs it."""

    def __init__(self, config: LoaderConfig, urls: list[str], keys: list[tuple[str, ...]],
                 epoch: Any) -> None:
        self.config = config
        self.urls = urls
        self.tar_keys = keys
        self.epoch = epoch  # a multiprocessing.Value: set before each epoch's iteration
        self.keys = image_keys(config.fmt)

    def __iter__(self) -> Iterator[_HostBatch]:
        import webdataset as wds

        c = self.config
        epoch = int(self.epoch.value)
        info = get_worker_info()
        worker = info.id if info is not None else 0
        urls = list(self.urls)
        if c.shuffle:
            order = np.random.default_rng([c.seed, epoch]).permutation(len(urls))
            urls = [urls[k] for k in order]
        pipeline = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None,
                                  workersplitter=wds.split_by_worker, empty_check=False)
        pipeline = pipeline.map(_Placer(self.urls, self.tar_keys, c))
        if c.shuffle:
            pipeline = pipeline.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER,
                                        rng=random.Random(f"{c.seed}-{epoch}-{worker}"))
        pipeline = (pipeline.decode("rgb8")
                    .to_tuple(self.keys, LABEL_EXT, "__pos__", "__bytes__")
                    .batched(c.batch_size, partial=True,
                             collation_fn=_Collate(tuple(c.image_shape))))
        yield from pipeline


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # one decode lane per worker, as the other CPU loaders


class WebDatasetLoader(Loader):
    """WebDataset's pipeline in DataLoader workers over ``wds-*`` tar shards."""

    name: ClassVar[str] = "webdataset"
    summary: ClassVar[str] = ("the WebDataset library's own pipeline in DataLoader workers "
                              "(peers extra)")
    io_evidence: ClassVar[str] = ("host: each tar read front to back with POSIX reads by "
                                  "WebDataset in DataLoader workers, decoded on the CPU")
    follows_plan: ClassVar[bool] = False  # its own shuffle: see the module docstring

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.urls = []
        for s in config.shards:
            if is_url(s.location):
                raise ValueError(f"webdataset: reads cached shards only, not {s.location}")
            path = os.path.join(s.location, TAR_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"webdataset: {s.location} has no {TAR_NAME}")
            self.urls.append(path)
        self._tar_keys = [tar_keys(s.location) for s in config.shards]
        self._largest = max((largest_member(s.location) for s in config.shards), default=0)
        self._epoch = multiprocessing.Value("q", 0)
        self._dataloader: DataLoader[Any] | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import webdataset  # noqa: F401
        except ImportError:
            return "webdataset: package webdataset not installed (pip install -e '.[peers]')"
        return None

    def staging_bound(self) -> StagingBound:
        """:func:`~node.loaders.staging.worker_bound` at the DataLoader's default prefetch
        of :data:`PREFETCH` (the workers' re-cut short batches at the end of an epoch are
        fewer than the batches it counts), plus each worker's shuffle buffer of
        :data:`SHUFFLE_BUFFER` encoded samples, each at most the largest member."""
        c = self.config
        bound = worker_bound(batch_bytes(c.batch_size, c.image_shape), c.workers,
                             pinned=c.device.type == "cuda", prefetch=PREFETCH)
        if not c.shuffle:
            return bound
        per_worker = SHUFFLE_BUFFER * (self._largest + SAMPLE_OVERHEAD)
        return bound._replace(fixed_bytes=max(1, c.workers) * per_worker)

    def check_fits(self) -> None:
        check_host_staging(self.name, self.staging_bound(), self.config.host_staging_mib)

    def _build(self) -> DataLoader[Any]:
        c = self.config
        options: dict[str, Any] = {}
        if c.workers > 0:
            options = {"persistent_workers": True, "worker_init_fn": _init_worker,
                       "prefetch_factor": PREFETCH}
        return DataLoader(_WdsEpochs(c, self.urls, self._tar_keys, self._epoch), batch_size=None,
                          num_workers=max(0, c.workers), pin_memory=c.device.type == "cuda",
                          **options)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self._dataloader is None:
            self._dataloader = self._build()
        self._epoch.value = epoch  # read by each worker's first step of the epoch
        short: list[_HostBatch] = []
        for item in self._dataloader:
            if len(item[2]) < self.config.batch_size:
                short.append(item)  # a worker's last batch: re-cut with the others below
                continue
            yield self._publish(item)
        for item in _recut(short, self.config.batch_size):
            yield self._publish(item)

    def _publish(self, item: _HostBatch) -> Batch:
        images, labels, positions, nbytes = item
        images, labels, h2d_s = timed_to_device(images, labels, self.config.device)
        return Batch(images=images, labels=labels, positions=positions,
                     bytes_read=int(nbytes.sum()), h2d_s=h2d_s)

    def close(self) -> None:
        dataloader, self._dataloader = self._dataloader, None
        shutdown_workers(dataloader)


def _recut(short: list[_HostBatch], batch_size: int) -> Iterator[_HostBatch]:
    """The workers' short last batches as full batches and at most one short one."""
    if not short:
        return
    columns = [torch.cat([b[k] for b in short]) for k in range(4)]
    for i in range(0, len(columns[2]), batch_size):
        images, labels, positions, nbytes = (c[i:i + batch_size] for c in columns)
        yield images, labels, positions, nbytes
