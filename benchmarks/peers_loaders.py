"""Each loader ``peers.py`` measures, as an epoch function over the same data.

Every function writes the data with its own writer (where it has one), reads it with
its own loader, and returns ``(epoch function, close)``; the epoch function yields
``(global sample ids, labels, images)`` per batch so that ``peers.py`` can check each
epoch delivers every sample once with its label. Same batch size, workers and shuffling
(each loader's own notion of it, which is what its users get) for every one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.loaders.base import Loader, LoaderConfig, ShardSlice
from peers_data import SIZE, Closer, Data, EpochFn, key_id, sample_key, warm_page_cache
from shared.formats import get_format

WDS_SHARD_SAMPLES = 5_000
CHUNK_BYTES = 64 << 20  # LitData's and Mosaic's shard size: as formatlab's shards
Batches = Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]


def formatlab_epochs(loader_cls: type[Loader], fmt_id: str, slices: list[ShardSlice],
                     args: argparse.Namespace) -> tuple[EpochFn, Closer]:
    """A formatlab loader over its shards (one sequence from sample 0: a position is the
    global sample id)."""
    config = LoaderConfig(fmt=get_format(fmt_id), shards=tuple(slices),
                          batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                          device=torch.device("cpu"), image_shape=(SIZE, SIZE, 3),
                          shuffle=True)
    loader = loader_cls(config)

    def epoch(e: int) -> Batches:
        for batch in loader.epoch(e):
            yield batch.positions.numpy(), batch.labels.numpy(), batch.images

    return epoch, loader.close


def image_folder_epochs(data: Data, args: argparse.Namespace) -> tuple[EpochFn, Closer]:
    """torchvision ``ImageFolder`` + ``DataLoader``: PIL decode, ``PILToTensor`` (uint8)."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import PILToTensor

    folder = ImageFolder(str(data.image_folder), transform=PILToTensor())
    ids = np.array([key_id(Path(p).stem) for p, _ in folder.samples], dtype=np.int64)

    class Indexed(Dataset):
        """ImageFolder, also returning the index (to check every sample came once)."""

        def __len__(self) -> int:
            return len(folder)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
            image, label = folder[i]
            return image, label, i

    loader = DataLoader(Indexed(), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))

    def epoch(e: int) -> Batches:
        for images, labels, index in loader:
            yield ids[index.numpy()], labels.numpy(), images

    return epoch, lambda: None


def _litdata_item(item: tuple[int, str, int]) -> dict[str, Any]:
    from PIL import Image

    i, path, label = item
    # An opened JpegImageFile: LitData stores the file's own bytes, no re-encode.
    return {"index": i, "image": Image.open(path), "label": label}


def litdata_epochs(data: Data, args: argparse.Namespace) -> tuple[EpochFn, Closer]:
    """LitData ``optimize`` of the JPEG files, ``StreamingDataset`` + its DataLoader."""
    from litdata import StreamingDataLoader, StreamingDataset, optimize

    out = data.root / "litdata"
    inputs = [(i, str(p), int(data.labels[i])) for i, p in enumerate(data.jpeg_files)]
    # optimize() forces the process-wide start method (spawn by default); keep the
    # platform's, so that this and the later loaders' workers start the same way.
    chatter = io.StringIO()  # its progress bars and messages
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        optimize(fn=_litdata_item, inputs=inputs, output_dir=str(out), chunk_bytes="64MB",
                 num_workers=max(1, args.workers), start_method=mp.get_start_method())
    warm_page_cache(out)
    dataset = StreamingDataset(input_dir=str(out), shuffle=True, seed=args.seed)
    loader = StreamingDataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                 persistent_workers=args.workers > 0)

    def epoch(e: int) -> Batches:
        for batch in loader:
            yield batch["index"].numpy(), batch["label"].numpy(), batch["image"]

    return epoch, lambda: None


def webdataset_epochs(data: Data, args: argparse.Namespace) -> tuple[EpochFn, Closer]:
    """WebDataset's ``ShardWriter`` tars of the JPEG files, its pipeline and WebLoader."""
    import webdataset as wds

    out = data.root / "webdataset"
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%05d.tar"), maxcount=WDS_SHARD_SAMPLES,
                         verbose=0) as sink:
        for i, path in enumerate(data.jpeg_files):
            sink.write({"__key__": sample_key(i), "jpg": path.read_bytes(),
                        "cls": int(data.labels[i])})
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    warm_page_cache(out)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), seed=args.seed, empty_check=False)
               .shuffle(5_000).decode("torchrgb8").to_tuple("jpg", "cls", "__key__")
               .batched(args.batch_size, partial=True))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=args.workers,
                           persistent_workers=args.workers > 0)

    def epoch(e: int) -> Batches:
        for images, labels, keys in loader:
            yield (np.fromiter((key_id(k) for k in keys), np.int64, len(keys)),
                   np.asarray(labels, dtype=np.int64), images)

    return epoch, lambda: None


def mosaic_epochs(data: Data, args: argparse.Namespace) -> tuple[EpochFn, Closer]:
    """Mosaic Streaming: ``MDSWriter`` of the JPEG files (its ``jpeg`` encoding stores an
    opened file's own bytes), ``StreamingDataset`` decoding with PIL, a DataLoader."""
    from PIL import Image
    from streaming import MDSWriter, StreamingDataset
    from torch.utils.data import DataLoader

    out = data.root / "mosaic"
    columns = {"image": "jpeg", "label": "int", "index": "int"}
    with MDSWriter(out=str(out), columns=columns, size_limit=CHUNK_BYTES) as writer:
        for i, path in enumerate(data.jpeg_files):
            with Image.open(path) as image:
                writer.write({"image": image, "label": int(data.labels[i]), "index": i})
    warm_page_cache(out)

    class Decoded(StreamingDataset):
        """The stored JPEG decoded to uint8 HWC, as a Mosaic user's __getitem__ does."""

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
            sample = super().__getitem__(i)
            image = torch.from_numpy(np.array(sample["image"].convert("RGB")))
            return image, sample["label"], sample["index"]

    dataset = Decoded(local=str(out), shuffle=True, shuffle_seed=args.seed,
                      batch_size=args.batch_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        persistent_workers=args.workers > 0)

    def epoch(e: int) -> Batches:
        for images, labels, index in loader:
            yield index.numpy(), labels.numpy(), images

    return epoch, lambda: None


def ffcv_epochs(data: Data, args: argparse.Namespace, mode: str) -> tuple[EpochFn, Closer]:
    """FFCV: ``DatasetWriter`` with ``RGBImageField(write_mode=mode)`` (``jpg``: the same
    pixels, JPEG quality 95 by OpenCV, since its writer takes pixels; ``raw``: pixels),
    its JIT-compiled ``Loader`` with ``OrderOption.RANDOM`` on ``workers`` threads, the
    file read through the page cache (``os_cache=True``)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader as FfcvLoader
    from ffcv.loader import OrderOption
    from ffcv.writer import DatasetWriter

    path = data.root / f"ffcv-{mode}.beton"
    fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=95),
              "label": IntField(), "index": IntField()}
    writer = DatasetWriter(str(path), fields, num_workers=max(1, args.workers))
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        writer.from_indexed_dataset(_Samples(data))
    warm_page_cache(path.parent)
    loader = FfcvLoader(str(path), batch_size=args.batch_size, num_workers=max(1, args.workers),
                        order=OrderOption.RANDOM, seed=args.seed, os_cache=True,
                        drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder()],
                                   "label": [IntDecoder()], "index": [IntDecoder()]})

    def epoch(e: int) -> Batches:
        for images, labels, index in loader:
            # FFCV reuses its output buffers: keep copies of what is checked later.
            yield index.reshape(-1).astype(np.int64), labels.reshape(-1).astype(np.int64), \
                torch.from_numpy(images)

    return epoch, lambda: None


class _Samples:
    """The samples as FFCV's writer reads them: ``(pixels, label, index)``."""

    def __init__(self, data: Data) -> None:
        self.pixels, self.labels = data.pixels, data.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return self.pixels[i], int(self.labels[i]), i
