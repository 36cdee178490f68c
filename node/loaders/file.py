"""``file``: one encoded file per sample, decoded on the CPU in DataLoader workers.

Each worker fetch reads and decodes a whole batch. JPEG, PNG and WebP go through
torchvision.io (libjpeg-turbo, libpng, libwebp; JPEG batch-decoded), measured 1.1-2.5x
faster than Pillow on 32x32 and 256x256 images here; BMP, TIFF and JPEG 2000 go
through the format's own (Pillow) decoder, and ``npy-files`` through NumPy.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import ClassVar

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, decode_png, decode_webp

from node.loaders.base import LoaderConfig
from node.loaders.common import BatchReader, HostBatch, WorkerLoader
from shared.formats.base import FileFormat
from shared.storage import check_relative

# torchvision 0.29 warns on every decode call that TorchCodec will take over image
# decoding; torchvision.io is still the libjpeg-turbo/libpng/libwebp path this loader
# measures, and one warning per image would flood worker output.
warnings.filterwarnings("ignore", category=DeprecationWarning,
                        message="The image decoding and encoding capabilities of TorchVision")

# Codec families torchvision.io decodes faster than Pillow (one image at a time).
_TORCHVISION_DECODERS = {"png": decode_png, "webp": decode_webp}


def read_file(path: str) -> bytearray:
    """The whole file, into a writable buffer (so torch can wrap it without a copy)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise OSError(f"{path}: file shrank while reading ({got} of {size} bytes)")
            got += n
        return buf
    finally:
        os.close(fd)


class FileBatchReader(BatchReader):
    """Reads a batch's files and decodes them into one uint8 NHWC tensor."""

    def __init__(self, config: LoaderConfig) -> None:
        super().__init__(config)
        fmt = config.fmt
        if not isinstance(fmt, FileFormat):
            raise ValueError(f"file loader: {fmt.id} is not a file-per-sample format")
        self.fmt = fmt
        self.prefixes = [os.path.join(s.location, "") for s in config.shards]
        self.files: list[tuple[str, ...]] = []
        for s in config.shards:
            if s.files is None or len(s.files) < s.stop:
                raise ValueError(f"{s.location}: the index lists no file for every sample")
            # Only the rank's range is read; check those names once, not per read.
            for name in s.files[s.start:s.stop]:
                check_relative(name)
            self.files.append(s.files)

    def read(self, positions: np.ndarray) -> HostBatch:
        shard_no, index = self.shard_map.locate(positions)
        paths = [self.prefixes[s] + self.files[s][i]
                 for s, i in zip(shard_no.tolist(), index.tolist(), strict=True)]
        t0 = time.perf_counter()
        data = [read_file(p) for p in paths]
        t1 = time.perf_counter()
        images = self.empty_images(len(paths))
        family = self.fmt.family
        if family == "jpeg":
            tensors = [torch.frombuffer(d, dtype=torch.uint8) for d in data]
            self._put_chw(images, decode_jpeg(tensors, mode=ImageReadMode.RGB), paths)
        elif family in _TORCHVISION_DECODERS:
            decode = _TORCHVISION_DECODERS[family]
            self._put_chw(images, [decode(torch.frombuffer(d, dtype=torch.uint8),
                                          mode=ImageReadMode.RGB) for d in data], paths)
        else:
            out = images.numpy()
            for k, d in enumerate(data):
                image = self.fmt.decode(d)
                self._check_shape(image.shape, paths[k])
                out[k] = image
        return self.host_batch(images, positions, sum(len(d) for d in data),
                               read_s=t1 - t0, decode_s=time.perf_counter() - t1)

    def _put_chw(self, images: torch.Tensor, decoded: list[torch.Tensor],
                 paths: list[str]) -> None:
        hwc = [chw.permute(1, 2, 0) for chw in decoded]
        for k, image in enumerate(hwc):
            self._check_shape(tuple(image.shape), paths[k])
        # torchvision decodes into HWC memory and returns a CHW view of it, so these are
        # plain copies; one stack call spares a dispatch per image.
        torch.stack(hwc, out=images)

    def _check_shape(self, shape: tuple[int, ...], path: str) -> None:
        if tuple(shape) != self.image_shape:
            raise ValueError(f"{path}: decoded to shape {tuple(shape)}, the dataset's images "
                             f"are {self.image_shape}")


class FileLoader(WorkerLoader):
    """Image files decoded in DataLoader workers, a whole batch per fetch."""

    name: ClassVar[str] = "file"
    summary: ClassVar[str] = ("decode in DataLoader workers (torchvision.io for JPEG/PNG/WebP, "
                              "Pillow for the rest), batched fetches, pinned memory")
    io_evidence: ClassVar[str] = ("host: each file read with POSIX read() into host memory "
                                  "(DataLoader workers), decoded on the CPU")

    def make_reader(self) -> FileBatchReader:
        return FileBatchReader(self.config)
