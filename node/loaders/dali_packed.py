"""``dali_packed``: DALI's webdataset reader over the cached ``wds-*`` tars, GPU decode.

``fn.readers.webdataset`` reads each sample's image and ``.cls`` members from the
shard's ``samples.tar`` on DALI's CPU threads and ``fn.decoders.image(device="mixed")``
decodes the images on the GPU (nvJPEG where it can). ``io_path = host``.

Index files. DALI's reader takes one index file per tar (the text ``tools/wds2idx.py``
writes) or scans each tar itself. The shard index already records every image
member's data offset and length, and the layout puts ``<key>.cls`` right after its
image member, so :func:`index_text` writes the files from the shard index with no tar
scan. The format, as DALI's ``webdataset_loader.cc`` parses it (``ParseIndexFile``,
``ParseSampleDesc``): a first line ``v1.2 <sample count>`` (count > 0), then one line
per sample of ``<ext> <data offset> <size> <member name>`` per component, each offset a
multiple of the 512-byte tar block; ``ReadSample`` seeks to each offset and reads
``size`` bytes, so the lines need not follow tar order. (Read in NVIDIA/DALI at
commit 010a519f for ``webdataset_loader.cc``, 0aa2ef5f for ``tools/wds2idx.py``.)

Order. DALI's reader returns samples in index-file order when ``random_shuffle`` is
off; its shuffle picks from a read-ahead buffer of ``initial_fill`` samples
(``Loader::ReadOne`` in ``loader.h``), a local shuffle in DALI generator's order. This
loader leaves it off and shuffles through the index files instead, a full in-shard
shuffle at no cost: each epoch it writes one file per shard into its own temporary
folder (not the cache: the order changes per epoch) listing the rank's range in an order from
``(seed, epoch, shard)``, and hands DALI the tars in a shard order from ``(seed,
epoch)``. That is a shard shuffle plus a full in-shard shuffle, not the contract's
planned batches: ``follows_plan`` is False, as for ``webdataset``. The reader runs with
``shard_id=0, num_shards=1`` over the rank's own ranges (the run plan already split
the shards between ranks) and ``pad_last_batch`` with DALI's iterator trimming it.

Positions and labels. Every sample's ``source_info`` (``fn.get_property``) is
``<tar path>:<offset>:<member name>`` (``webdataset_loader.cc``, ``ReadSample``):
the tar and offset give the rank position of what DALI really returned. Labels are
the ``.cls`` members' decimal text, checked against the shard index. Each epoch is
checked to return every rank position exactly once. ``bytes_read`` counts the image
members, as the packed loader does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq
import torch

from node.loaders.base import Batch, Loader, LoaderConfig, ShardSlice
from node.loaders.dali import READER_NAME
from node.loaders.gds import IO_HOST
from node.loaders.gpu import cuda_device_index, requirements_reason
from shared.formats.base import is_url
from shared.formats.wds import LABEL_EXT, TAR_NAME

INDEX_VERSION = "v1.2"  # tools/wds2idx.py's index_file_version; the one with member names
TAR_BLOCK = 512
INDEX_NAME = "index.parquet"


@dataclass(frozen=True)
class TarSample:
    """One sample's two members in a packed tar: the image's data span and its label."""

    member: str
    offset: int
    size: int
    label: int

    def label_member(self) -> tuple[str, int, int]:
        """``(name, data offset, size)`` of the ``.cls`` member after the image: the
        image data padded to whole blocks, then one USTAR header block."""
        key = self.member.split(".", 1)[0]
        padded = -(-self.size // TAR_BLOCK) * TAR_BLOCK
        text = str(self.label)
        return f"{key}.{LABEL_EXT}", self.offset + padded + TAR_BLOCK, len(text)


def index_text(samples: Sequence[TarSample]) -> str:
    """DALI's webdataset index (v1.2) listing ``samples`` in the given order.

    Raises:
        ValueError: no samples (DALI wants a positive count), an offset off the tar's
            block grid, or a member name DALI would split differently.
    """
    if not samples:
        raise ValueError("a DALI index lists at least one sample")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for s in samples:
        if s.offset % TAR_BLOCK or "." not in s.member or " " in s.member:
            raise ValueError(f"{s.member}: not a packed tar member at a block offset "
                             f"({s.offset})")
        components = [(s.member, s.offset, s.size), s.label_member()]
        lines.append(" ".join(f"{name.split('.', 1)[1]} {offset} {size} {name}"
                              for name, offset, size in components))
    return "\n".join(lines) + "\n"


def shard_samples(shard: ShardSlice) -> list[TarSample]:
    """The rank's range of a cached packed shard, from the shard's index."""
    table = pq.read_table(os.path.join(shard.location, INDEX_NAME),
                          columns=["member", "offset", "bytes", "label"])
    cols = [table.column(c).to_pylist()[shard.start:shard.stop]
            for c in ("member", "offset", "bytes", "label")]
    return [TarSample(m, o, b, int(lab)) for m, o, b, lab in zip(*cols, strict=True)]


def epoch_order(sizes: Sequence[int], seed: int, epoch: int,
                shuffle: bool = True) -> tuple[list[int], list[np.ndarray]]:
    """The epoch's shard order and, per shard, the order of its range's samples."""
    if not shuffle:
        return list(range(len(sizes))), [np.arange(n) for n in sizes]
    rng = np.random.default_rng([seed, epoch])
    shards = rng.permutation(len(sizes)).tolist()
    return shards, [np.random.default_rng([seed, epoch, k]).permutation(n)
                    for k, n in enumerate(sizes)]


def source_positions(info: np.ndarray, position_of: dict[tuple[str, int], int]) -> np.ndarray:
    """Rank positions from DALI's ``source_info`` bytes, one zero-padded row per sample
    (``<tar path>:<offset>:<member name>``).

    Raises:
        RuntimeError: a sample from a tar or offset the epoch did not list.
    """
    out = np.empty(len(info), dtype=np.int64)
    for k, row in enumerate(info):
        text = bytes(row).rstrip(b"\0").decode()
        path, offset, _ = text.rsplit(":", 2)
        try:
            out[k] = position_of[(path, int(offset))]
        except (KeyError, ValueError):
            raise RuntimeError(f"dali_packed: DALI returned {text!r}, which the epoch's "
                               "index files do not list") from None
    return out


def cls_labels(cls: np.ndarray) -> np.ndarray:
    """Labels from the ``.cls`` members' decimal text, one zero-padded row per sample."""
    return np.array([int(bytes(row).rstrip(b"\0")) for row in cls], dtype=np.int64)


def write_epoch_indexes(folder: str, tars: Sequence[str], samples: Sequence[Sequence[TarSample]],
                        seed: int, epoch: int, shuffle: bool = True
                        ) -> tuple[list[str], list[str]]:
    """Write the epoch's index file of each shard into ``folder``; returns the tars and
    their index files in the epoch's shard order."""
    shards, orders = epoch_order([len(s) for s in samples], seed, epoch, shuffle)
    paths = []
    for k in shards:
        path = os.path.join(folder, f"shard-{k:05d}.idx")
        with open(path, "w") as f:
            f.write(index_text([samples[k][i] for i in orders[k].tolist()]))
        paths.append(path)
    return [tars[k] for k in shards], paths


def reader_arguments(tars: Sequence[str], index_paths: Sequence[str], image_ext: str,
                     seed: int) -> dict[str, Any]:
    """``fn.readers.webdataset``'s arguments: the tars and index files in the epoch's
    shard order, outputs ``(image, cls)``, DALI's own shuffle and sharding off."""
    if len(tars) != len(index_paths) or not tars:
        raise ValueError(f"dali_packed: {len(tars)} tars, {len(index_paths)} index files")
    return {"paths": list(tars), "index_paths": list(index_paths),
            "ext": [image_ext, LABEL_EXT], "missing_component_behavior": "error",
            "name": READER_NAME, "random_shuffle": False, "pad_last_batch": True,
            "shard_id": 0, "num_shards": 1, "seed": seed & 0x7FFFFFFF}


class DaliPackedLoader(Loader):
    """DALI's webdataset reader and mixed (GPU) image decoder over ``wds-*`` tars."""

    name: ClassVar[str] = "dali_packed"
    device_kind: ClassVar[str] = "cuda"
    summary: ClassVar[str] = ('DALI readers.webdataset over the packed tars (index files '
                              'from the shard index), decoders.image(device="mixed")')
    follows_plan: ClassVar[bool] = False  # shuffles through its index files: see above
    io_path = IO_HOST
    io_evidence = "tar members read into host memory by DALI, decoded on the GPU"

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self._tars = []
        for s in config.shards:
            path = os.path.join(s.location, TAR_NAME)
            if is_url(s.location) or not os.path.isfile(path):
                raise ValueError(f"dali_packed: {s.location} has no cached {TAR_NAME}")
            self._tars.append(path)
        self._samples = [shard_samples(s) for s in config.shards]
        starts = np.cumsum([0] + [len(s) for s in self._samples])
        self._position_of = {(tar, sample.offset): int(starts[k]) + i
                             for k, (tar, samples) in enumerate(zip(self._tars, self._samples))
                             for i, sample in enumerate(samples)}
        self._sizes = np.array([x.size for s in self._samples for x in s], dtype=np.int64)
        self._device_id = cuda_device_index(config.device)
        self._threads = max(1, config.workers)
        self._dir = tempfile.mkdtemp(prefix="dali-packed-")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return requirements_reason(cls.name, ("nvidia.dali",))

    def _build_pipeline(self, epoch: int) -> Any:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        c = self.config
        tars, index_paths = write_epoch_indexes(self._dir, self._tars, self._samples, c.seed,
                                                epoch, c.shuffle)
        pipe = Pipeline(batch_size=c.batch_size, num_threads=self._threads,
                        device_id=self._device_id, seed=c.seed & 0x7FFFFFFF,
                        prefetch_queue_depth=2)
        with pipe:
            encoded, cls = fn.readers.webdataset(**reader_arguments(
                tars, index_paths, c.fmt.extension, c.seed))
            info = fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)
            images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
            pipe.set_outputs(images, fn.pad(cls, fill_value=0), info)
        pipe.build()
        return pipe

    def epoch(self, epoch: int) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        c = self.config
        if c.num_samples == 0:
            return
        seen = np.zeros(c.num_samples, dtype=np.int64)
        pipe = iterator = None
        try:
            pipe = self._build_pipeline(epoch)
            iterator = DALIGenericIterator(
                [pipe], ["images", "cls", "info"], reader_name=READER_NAME,
                last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
            for outputs in iterator:
                out = outputs[0]
                positions = source_positions(out["info"].numpy(), self._position_of)
                labels = cls_labels(out["cls"].numpy())
                self._check(out["images"], positions, labels)
                np.add.at(seen, positions, 1)
                # A device copy keeps the batch valid whatever DALI does with its buffers.
                yield Batch(images=out["images"].clone(),
                            labels=torch.from_numpy(labels).to(c.device),
                            positions=torch.from_numpy(positions),
                            bytes_read=int(self._sizes[positions].sum()))
        finally:
            del iterator  # before the pipeline; both free DALI's threads and buffers
            del pipe
        if not (seen == 1).all():
            raise RuntimeError(f"dali_packed: epoch {epoch} returned {int((seen == 0).sum())} "
                               f"samples never and {int((seen > 1).sum())} more than once")

    def _check(self, images: torch.Tensor, positions: np.ndarray, labels: np.ndarray) -> None:
        c = self.config
        if tuple(images.shape[1:]) != tuple(c.image_shape) or images.dtype != torch.uint8:
            raise ValueError(f"dali_packed: DALI returned {images.dtype} {tuple(images.shape)}, "
                             f"expected uint8 (N, {', '.join(map(str, c.image_shape))})")
        if not np.array_equal(labels, c.labels[positions]):
            raise RuntimeError("dali_packed: .cls labels differ from the shard index's")

    def resources(self) -> dict[str, int]:
        """DALI's CPU thread pool (``num_threads``); DALI starts no processes here."""
        return {"threads": self._threads, "processes": 0}

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
