"""``nvjpeg``: JPEG bytes read in DataLoader workers, batch-decoded on the GPU.

Workers read a whole batch's files into one flat byte buffer (in shared memory, so
handing it over copies nothing) with the same batch machinery as the CPU loaders
(:mod:`node.loaders.common`); the main process splits it into one tensor per file and
decodes them in one call, ``torchvision.io.decode_jpeg(list, device="cuda")``
(nvJPEG's batched decoder). ``io_path = host``: the bytes pass through host memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from node.loaders.base import Batch, LoaderConfig
from node.loaders.common import BatchReader, WorkerLoader, empty_batch
from node.loaders.file import read_file
from node.loaders.gds import IO_HOST
from node.loaders.gpu import cuda_reason, rank_files, torchvision_nvjpeg_reason


class EncodedBatch(NamedTuple):
    """One batch of undecoded files, as a worker returns it.

    Attributes:
        data: uint8 (total bytes,), the files back to back.
        offsets: int64 (N + 1,), file k is ``data[offsets[k]:offsets[k + 1]]``.
        labels, positions: int64 (N,).
        bytes_read: the files' total size.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    bytes_read: int


class JpegBytesReader(BatchReader):
    """Reads a batch's JPEG files without decoding them."""

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.paths = rank_files(config.shards)  # indexed by rank position

    def read(self, positions: np.ndarray) -> EncodedBatch:  # type: ignore[override]
        data = [read_file(self.paths[p]) for p in positions.tolist()]
        offsets = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in data], out=offsets[1:])
        flat = empty_batch((int(offsets[-1]),))
        out = flat.numpy()
        for d, start in zip(data, offsets[:-1].tolist(), strict=True):
            out[start:start + len(d)] = np.frombuffer(d, dtype=np.uint8)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        return EncodedBatch(flat, torch.from_numpy(offsets),
                            torch.from_numpy(self.shard_map.labels[positions]),
                            torch.from_numpy(positions), int(offsets[-1]))


class NvjpegLoader(WorkerLoader):
    """File bytes from DataLoader workers, decoded on the GPU by nvJPEG via torchvision."""

    name: ClassVar[str] = "nvjpeg"
    device_kind: ClassVar[str] = "cuda"
    summary: ClassVar[str] = ("file bytes read by DataLoader workers, batch-decoded on the GPU "
                              "by torchvision.io.decode_jpeg (nvJPEG)")
    io_path = IO_HOST

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        self.io_evidence = "files read into host memory by workers, decoded on the GPU"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = cuda_reason() or torchvision_nvjpeg_reason()
        return f"{cls.name}: {reason}" if reason else None

    def make_reader(self) -> JpegBytesReader:
        return JpegBytesReader(self.config)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        from torchvision.io import ImageReadMode, decode_jpeg

        c = self.config
        if self._dataloader is None:
            self._dataloader = self._build()
        self._sampler.epoch = epoch
        for item in self._dataloader:
            bounds = item.offsets.tolist()
            files = [item.data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=c.device)
            for chw in decoded:
                if (chw.shape[1], chw.shape[2], chw.shape[0]) != tuple(c.image_shape):
                    raise ValueError(f"{self.name}: a JPEG decoded to {tuple(chw.shape)} (CHW), "
                                     f"the dataset's images are {tuple(c.image_shape)} (HWC)")
            # One copy: CHW results into one contiguous NHWC batch.
            images = torch.stack([chw.permute(1, 2, 0) for chw in decoded])
            labels = item.labels.to(c.device, non_blocking=True)
            yield Batch(images=images, labels=labels, positions=item.positions,
                        bytes_read=item.bytes_read)
