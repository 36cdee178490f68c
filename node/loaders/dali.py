"""``dali`` and ``dali_gds``: NVIDIA DALI pipelines over the cached files.

- ``dali``: ``fn.readers.file`` reads the encoded files on DALI's CPU threads and
  ``fn.decoders.image(device="mixed")`` decodes them on the GPU (nvJPEG and the
  hardware JPEG decoder where the GPU has one; formats without a GPU decoder fall back
  to DALI's CPU decoders inside the same operator). ``io_path = host``.
- ``dali_gds``: ``fn.readers.numpy(device="gpu")`` reads ``npy-files`` with cuFile
  into GPU memory: GPUDirect Storage where it works, cuFile's compat mode elsewhere.
  ``io_path`` follows :func:`node.loaders.gds.decide_io_path` (nvidia-fs counters
  compared around the epoch, cuFile's config); without that evidence it is ``compat``,
  never ``gds``. DALI's cuFile open uses ``O_DIRECT`` and fails outright where the file
  system refuses it (dali/util/std_cufile.cc), so the first file is probed up front
  and the loader refuses in one line naming the file system.

Order and sharding. The contract wants each epoch's order from ``(seed, epoch)``
(:meth:`Loader.batches`), every sample exactly once. DALI's readers shuffle with their
own generator, so each epoch builds a pipeline whose reader lists the files in this
epoch's order with ``random_shuffle=False``, ``pad_last_batch=True`` and DALI's
iterator trims the padding (``LastBatchPolicy.PARTIAL``, ``reader_name="Reader"``).
Building costs a fraction of a second per epoch and lands in its first batch's data
wait. The split between ranks is done once for every loader, by the run plan's shard
assignment (:class:`~node.loaders.base.ShardSlice`); passing ``shard_id=rank,
num_shards=world_size`` to DALI as well would split the rank's samples a second time,
so the reader runs with ``shard_id=0, num_shards=1`` over the rank's own list.

Positions and labels. ``dali``'s file reader is given each sample's rank position as
its "label", so every batch says which samples DALI really returned; the class labels
are then looked up on the GPU from the shard indexes. The numpy reader has no label
output, so ``dali_gds`` takes positions from the order it gave the reader (DALI reads
in list order without shuffling); the GPU tests compare pixels to check it.

DALI's CPU thread pool has ``--workers`` threads (at least 1), reported by
:meth:`resources`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from node.loaders.base import Batch, Loader, LoaderConfig, LoaderUnavailable
from node.loaders.gds import (
    IO_COMPAT,
    IO_HOST,
    NvfsReads,
    dali_observation,
    decide_io_path,
    nvfs_read_counters,
    o_direct_reason,
)
from node.loaders.gpu import cuda_device_index, rank_files, requirements_reason

READER_NAME = "Reader"
# DALI's file reader stores labels as int32.
_MAX_POSITION = np.iinfo(np.int32).max


class _DaliLoader(Loader):
    """What both DALI loaders share: per-epoch pipelines in the contract's order."""

    device_kind: ClassVar[str] = "cuda"

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self._paths = rank_files(config.shards)
        # File sizes once, so bytes_read counts what the reader really read.
        self._sizes = np.array([os.path.getsize(p) for p in self._paths], dtype=np.int64)
        self._labels: torch.Tensor | None = None
        self._device_id = cuda_device_index(config.device)
        self._threads = max(1, config.workers)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return requirements_reason(cls.name, ("nvidia.dali",))

    @abc.abstractmethod
    def _build_pipeline(self, order: np.ndarray) -> Any:
        """A built DALI pipeline whose reader (named ``Reader``) lists ``order``'s files."""

    @abc.abstractmethod
    def _outputs(self) -> list[str]:
        """Names of the pipeline's outputs; the first is ``images``."""

    def _epoch_started(self) -> None:  # noqa: B027 - optional hook
        """Called before an epoch's pipeline is built."""

    def _batch_done(self) -> None:  # noqa: B027 - optional hook
        """Called after each batch (io_path bookkeeping)."""

    def epoch(self, epoch: int) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        c = self.config
        if self._labels is None:
            self._labels = torch.from_numpy(c.labels).to(c.device)
        batches = self.batches(epoch)
        if not batches:
            return
        order = np.concatenate(batches)
        self._epoch_started()
        pipe = iterator = None
        k = -1
        try:
            pipe = self._build_pipeline(order)
            iterator = DALIGenericIterator(
                [pipe], self._outputs(), reader_name=READER_NAME,
                last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
            for k, outputs in enumerate(iterator):
                out = outputs[0]
                positions = self._positions(out, batches, k)
                images = out["images"]
                if tuple(images.shape[1:]) != tuple(c.image_shape) or images.dtype != torch.uint8:
                    raise ValueError(f"{self.name}: DALI returned {images.dtype} "
                                     f"{tuple(images.shape)}, expected uint8 (N, "
                                     f"{', '.join(map(str, c.image_shape))})")
                # DALI's dynamic executor hands its output over by DLPack without a copy;
                # a device copy (~0.1 ms per 200 MB) keeps the batch valid whatever DALI
                # does with its buffers afterwards, including after the epoch's pipeline
                # is gone.
                images = images.clone()
                idx = positions.to(c.device, non_blocking=True)
                self._batch_done()
                yield Batch(images=images, labels=self._labels[idx], positions=positions,
                            bytes_read=int(self._sizes[positions.numpy()].sum()))
            if k + 1 != len(batches):
                raise RuntimeError(f"{self.name}: DALI returned {k + 1} batches, expected "
                                   f"{len(batches)}")
        finally:
            # Drop the iterator before the pipeline; both free DALI's threads and buffers.
            del iterator
            del pipe

    @abc.abstractmethod
    def _positions(self, out: dict[str, torch.Tensor], batches: list[np.ndarray],
                   k: int) -> torch.Tensor:
        """The rank positions of the samples in DALI's k-th batch."""

    def _pipeline(self) -> Any:
        from nvidia.dali.pipeline import Pipeline

        c = self.config
        return Pipeline(batch_size=c.batch_size, num_threads=self._threads,
                        device_id=self._device_id, seed=c.seed & 0x7FFFFFFF,
                        prefetch_queue_depth=2)

    def _reader_options(self) -> dict[str, Any]:
        return {"name": READER_NAME, "random_shuffle": False, "pad_last_batch": True,
                "shard_id": 0, "num_shards": 1, "seed": self.config.seed & 0x7FFFFFFF}

    def resources(self) -> dict[str, int]:
        """DALI's CPU thread pool (``num_threads``); DALI starts no processes here."""
        return {"threads": self._threads, "processes": 0}

    def close(self) -> None:
        self._labels = None


class DaliLoader(_DaliLoader):
    """DALI file reader and mixed (GPU) image decoder."""

    name: ClassVar[str] = "dali"
    summary: ClassVar[str] = ('DALI file reader and decoders.image(device="mixed") (nvJPEG), '
                              "files read on DALI's CPU threads")
    io_path = IO_HOST

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        if len(self._paths) > _MAX_POSITION:
            raise ValueError(f"{self.name}: {len(self._paths)} samples exceed DALI's int32 labels")
        self.io_evidence = "files read into host memory by DALI, decoded on the GPU"

    def _outputs(self) -> list[str]:
        return ["images", "positions"]

    def _build_pipeline(self, order: np.ndarray) -> Any:
        from nvidia.dali import fn, types

        pipe = self._pipeline()
        with pipe:
            encoded, positions = fn.readers.file(
                files=[self._paths[i] for i in order.tolist()],
                labels=order.astype(np.int32).tolist(), **self._reader_options())
            images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
            pipe.set_outputs(images, positions)
        pipe.build()
        return pipe

    def _positions(self, out: dict[str, torch.Tensor], batches: list[np.ndarray],
                   k: int) -> torch.Tensor:
        # The reader's "labels" are the positions we gave it: what DALI really returned.
        return out["positions"].reshape(-1).to("cpu", torch.int64)


class DaliGdsLoader(_DaliLoader):
    """DALI's GPU numpy reader: cuFile reads of ``npy-files`` into GPU memory."""

    name: ClassVar[str] = "dali_gds"
    summary: ClassVar[str] = ('DALI readers.numpy(device="gpu"): cuFile reads of npy-files '
                              "into GPU memory (GPUDirect Storage from local NVMe)")
    io_path = IO_COMPAT  # a cuFile path: "gds" only once a run has shown the evidence

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.io_path = IO_COMPAT
        self.io_evidence = "no reads yet"
        self._before: NvfsReads | None = None

    def check_fits(self) -> None:
        if self._paths:
            reason = o_direct_reason(self._paths[0])
            if reason:
                raise LoaderUnavailable(f"{self.name}: {reason}")

    def _outputs(self) -> list[str]:
        return ["images"]

    def _build_pipeline(self, order: np.ndarray) -> Any:
        from nvidia.dali import fn

        pipe = self._pipeline()
        with pipe:
            images = fn.readers.numpy(device="gpu", files=[self._paths[i] for i in order.tolist()],
                                      **self._reader_options())
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _positions(self, out: dict[str, torch.Tensor], batches: list[np.ndarray],
                   k: int) -> torch.Tensor:
        if k >= len(batches) or len(out["images"]) != len(batches[k]):
            raise RuntimeError(f"{self.name}: DALI's batch {k} has {len(out['images'])} "
                               f"samples, the epoch's order has "
                               f"{len(batches[k]) if k < len(batches) else 0}")
        return torch.from_numpy(batches[k])

    def _epoch_started(self) -> None:
        self._before = nvfs_read_counters()

    def _batch_done(self) -> None:
        self.io_path, evidence = decide_io_path(
            dali_observation(before=self._before, after=nvfs_read_counters()))
        self.io_evidence = f"DALI numpy reader via cuFile: {evidence}"
