"""The one dataset ``peers.py`` measures, in formatlab's shards and the JPEG files.

The images (``testdata.datagen.render_images``) are written once per formatlab format with
``shared.shards.write_shard`` (about 64 MiB of pixels per shard, as prep picks); the
``jpeg-q95`` files are also linked into an ImageFolder tree, and every peer's writer
takes those very JPEG files (or, for writers that only take pixels, the same pixels).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from node.loaders.base import ShardSlice
from testdata.datagen import render_images
from shared.formats import UnknownFormat, get_format
from shared.shards import read_index, shard_path, write_shard
from shared.storage import Store

CLASSES = 10
SIZE = 32
SHARD_SAMPLES = (64 << 20) // (SIZE * SIZE * 3)  # ~64 MiB of pixels, as prep/plan picks
# formatlab's packed JPEG format (shared/formats/wds.py); measured where registered.
PACKED_FORMAT = "wds-jpeg-q95"

# One id and label array per batch, plus the images (to check their shape once).
EpochFn = Callable[[int], Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]]
Closer = Callable[[], None]


@dataclass
class Data:
    """The dataset in every layout the loaders read.

    Attributes:
        labels: (n,) by global sample id.
        pixels: (n, SIZE, SIZE, 3) uint8, for writers that take pixels (FFCV).
        shards: formatlab shard slices by format id, in sample order.
        jpeg_files: the ``jpeg-q95`` file of each global sample id.
    """

    root: Path
    labels: np.ndarray
    pixels: np.ndarray
    shards: dict[str, list[ShardSlice]] = field(default_factory=dict)
    jpeg_files: list[Path] = field(default_factory=list)
    image_folder: Path | None = None

    @property
    def n(self) -> int:
        return len(self.labels)


def sample_key(i: int) -> str:
    return f"sample-{i:06d}"


def key_id(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def format_registered(fmt_id: str) -> bool:
    try:
        get_format(fmt_id)
    except UnknownFormat:
        return False
    return True


def build_data(root: Path, samples: int, seed: int, formats: tuple[str, ...]) -> Data:
    """Write the formatlab shards of ``formats`` and the ImageFolder tree."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, samples).astype(np.int64)
    pixels = np.empty((samples, SIZE, SIZE, 3), dtype=np.uint8)
    for index, start in enumerate(range(0, samples, SHARD_SAMPLES)):
        stop = min(samples, start + SHARD_SAMPLES)
        pixels[start:stop] = render_images(labels[start:stop], height=SIZE, width=SIZE,
                                           num_classes=CLASSES,
                                           rng=np.random.default_rng([seed, index]))
    data = Data(root=root, labels=labels, pixels=pixels)
    store = Store.open(str(root / "store"))
    for fmt_id in formats:
        data.shards[fmt_id] = write_format(store, fmt_id, pixels, labels)
    for s in data.shards["jpeg-q95"]:
        assert s.files is not None
        data.jpeg_files += [Path(s.location) / f for f in s.files]
    data.image_folder = root / "image_folder"
    for i, src in enumerate(data.jpeg_files):
        cls_dir = data.image_folder / f"class_{labels[i]:02d}"
        cls_dir.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, cls_dir / f"{sample_key(i)}.jpg")
    return data


def write_format(store: Store, fmt_id: str, pixels: np.ndarray,
                 labels: np.ndarray) -> list[ShardSlice]:
    """``fmt_id`` shards of every sample, read back as the node's shard slices."""
    fmt = get_format(fmt_id)
    slices = []
    for index, start in enumerate(range(0, len(labels), SHARD_SAMPLES)):
        stop = min(len(labels), start + SHARD_SAMPLES)
        keys = [sample_key(i) for i in range(start, stop)]
        write_shard(store, fmt, "train", index, keys, pixels[start:stop], labels[start:stop])
        folder = Path(store.root) / shard_path(fmt_id, "train", index)
        table = read_index(folder / "index.parquet")
        files = (tuple(table.column("file").to_pylist())
                 if "file" in table.column_names else None)
        slices.append(ShardSlice(location=str(folder),
                                 labels=table.column("label").to_numpy().astype(np.int64),
                                 files=files, start=0, stop=table.num_rows,
                                 keys=tuple(table.column("key").to_pylist())))
    return slices


def _link_or_copy(src: Path, dst: Path) -> None:
    """The same bytes under a second name: a hard link (half the files to create and
    delete, one copy in the page cache), a copy where links are not allowed."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def warm_page_cache(root: Path) -> None:
    """Read every file once, so that all loaders measure from memory alike."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 20):
                    pass
