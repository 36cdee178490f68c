"""formatlab's loaders against the loaders users would otherwise pick, on the same data.

One CIFAR-like dataset (default 50,000 32x32 RGB images, 10 classes, rendered by
``prep.datagen.render_images``) is written once as formatlab ``jpeg-q95`` and ``npy``
shards (``shared.shards.write_shard``, about 64 MiB of pixels per shard as prep picks),
and the very same JPEG bytes are laid out for each peer:

- torchvision ``ImageFolder`` + ``DataLoader``: one class folder per label, PIL decode,
  ``PILToTensor`` (uint8, like every formatlab loader; no float conversion);
- LitData ``StreamingDataset`` + ``StreamingDataLoader`` (``litdata.optimize`` of the
  same JPEG files; decoded by LitData's own JPEG deserializer);
- WebDataset: tar shards of 5,000 samples, ``decode("torchrgb8")``.

against formatlab's ``file`` loader on the ``jpeg-q95`` shards and ``numpy_mmap`` on the
``npy`` shards. Every loader gets the same batch size, workers (persistent), shuffling
on and the same number of epochs, on the CPU, with the files in the page cache; each
epoch is checked to deliver every sample exactly once with its label. LitData shuffles
chunk-wise and WebDataset through a shard shuffle plus a sample buffer: their own
notions of shuffling, which is what their users get.

LitData and WebDataset come from the optional ``peers`` extra
(``pip install -e '.[peers]'``); without them those rows are skipped with a note.

    python benchmarks/peers.py [--samples N] [--epochs N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limits import Check, finish  # noqa: E402 - benchmarks/ is the script's folder
from node.loaders.base import Loader, LoaderConfig, ShardSlice  # noqa: E402
from node.loaders.file import FileLoader  # noqa: E402
from node.loaders.numpy_mmap import NumpyMmapLoader  # noqa: E402
from testdata.datagen import render_images  # noqa: E402
from shared.formats import get_format  # noqa: E402
from shared.shards import read_index, shard_path, write_shard  # noqa: E402
from shared.storage import Store  # noqa: E402

TARGET = 2.0  # file (jpeg) must beat ImageFolder on the same JPEGs by this much
CLASSES = 10
SIZE = 32
SHARD_SAMPLES = (64 << 20) // (SIZE * SIZE * 3)  # ~64 MiB of pixels, as prep/plan picks
WDS_SHARD_SAMPLES = 5_000

# One id and label array per batch, plus the images (to check their shape once).
EpochFn = Callable[[int], Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]]


@dataclass
class Data:
    """The dataset in every layout the loaders read."""

    root: Path
    labels: np.ndarray                 # (n,) by global sample id
    jpeg: list[ShardSlice] = field(default_factory=list)
    npy: list[ShardSlice] = field(default_factory=list)
    jpeg_files: list[Path] = field(default_factory=list)  # by global sample id
    image_folder: Path | None = None

    @property
    def n(self) -> int:
        return len(self.labels)


@dataclass
class Result:
    name: str
    data: str
    epoch_s: list[float]
    samples: int

    @property
    def rate(self) -> float:
        return self.samples * len(self.epoch_s) / sum(self.epoch_s)

    @property
    def best_epoch_rate(self) -> float:
        return self.samples / min(self.epoch_s)


# --------------------------------------------------------------------------- data


def sample_key(i: int) -> str:
    return f"sample-{i:06d}"


def key_id(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def build_data(root: Path, samples: int, seed: int) -> Data:
    """Write the formatlab shards and the ImageFolder tree (same JPEG bytes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, samples).astype(np.int64)
    data = Data(root=root, labels=labels)
    store = Store.open(str(root / "store"))
    for fmt_id, slices in (("jpeg-q95", data.jpeg), ("npy", data.npy)):
        fmt = get_format(fmt_id)
        for index, start in enumerate(range(0, samples, SHARD_SAMPLES)):
            stop = min(samples, start + SHARD_SAMPLES)
            images = render_images(labels[start:stop], height=SIZE, width=SIZE,
                                   num_classes=CLASSES,
                                   rng=np.random.default_rng([seed, index]))
            keys = [sample_key(i) for i in range(start, stop)]
            write_shard(store, fmt, "train", index, keys, images, labels[start:stop])
            folder = root / "store" / shard_path(fmt_id, "train", index)
            table = read_index(folder / "index.parquet")
            files = (tuple(table.column("file").to_pylist())
                     if "file" in table.column_names else None)
            slices.append(ShardSlice(location=str(folder),
                                     labels=table.column("label").to_numpy().astype(np.int64),
                                     files=files, start=0, stop=table.num_rows,
                                     keys=tuple(table.column("key").to_pylist())))
    for s in data.jpeg:
        assert s.files is not None
        data.jpeg_files += [Path(s.location) / f for f in s.files]
    data.image_folder = root / "image_folder"
    for i, src in enumerate(data.jpeg_files):
        cls_dir = data.image_folder / f"class_{labels[i]:02d}"
        cls_dir.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, cls_dir / f"{sample_key(i)}.jpg")
    return data


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


# --------------------------------------------------------------------------- loaders


def formatlab_epochs(loader_cls: type[Loader], fmt_id: str, slices: list[ShardSlice],
                     args: argparse.Namespace) -> tuple[EpochFn, Callable[[], None]]:
    config = LoaderConfig(fmt=get_format(fmt_id), shards=tuple(slices),
                          batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                          device=torch.device("cpu"), image_shape=(SIZE, SIZE, 3),
                          shuffle=True)
    loader = loader_cls(config)

    def epoch(e: int) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        # One shard sequence starting at sample 0: a position is the global sample id.
        for batch in loader.epoch(e):
            yield batch.positions.numpy(), batch.labels.numpy(), batch.images

    return epoch, loader.close


def image_folder_epochs(data: Data,
                        args: argparse.Namespace) -> tuple[EpochFn, Callable[[], None]]:
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

    def epoch(e: int) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        for images, labels, index in loader:
            yield ids[index.numpy()], labels.numpy(), images

    return epoch, lambda: None


def _litdata_item(item: tuple[int, str, int]) -> dict[str, Any]:
    from PIL import Image

    i, path, label = item
    # An opened JpegImageFile: LitData stores the file's own bytes, no re-encode.
    return {"index": i, "image": Image.open(path), "label": label}


def litdata_epochs(data: Data,
                   args: argparse.Namespace) -> tuple[EpochFn, Callable[[], None]]:
    from litdata import StreamingDataLoader, StreamingDataset, optimize

    out = data.root / "litdata"
    inputs = [(i, str(p), int(data.labels[i])) for i, p in enumerate(data.jpeg_files)]
    # optimize() forces the process-wide start method (spawn by default); keep the
    # platform's, so that this and the later loaders' workers start the same way.
    with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter
        optimize(fn=_litdata_item, inputs=inputs, output_dir=str(out), chunk_bytes="64MB",
                 num_workers=max(1, args.workers), start_method=mp.get_start_method())
    warm_page_cache(out)
    dataset = StreamingDataset(input_dir=str(out), shuffle=True, seed=args.seed)
    loader = StreamingDataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                 persistent_workers=args.workers > 0)

    def epoch(e: int) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        for batch in loader:
            yield batch["index"].numpy(), batch["label"].numpy(), batch["image"]

    return epoch, lambda: None


def webdataset_epochs(data: Data,
                      args: argparse.Namespace) -> tuple[EpochFn, Callable[[], None]]:
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

    def epoch(e: int) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        for images, labels, keys in loader:
            yield (np.fromiter((key_id(k) for k in keys), np.int64, len(keys)),
                   np.asarray(labels, dtype=np.int64), images)

    return epoch, lambda: None


# --------------------------------------------------------------------------- measuring


def measure(name: str, what: str, make: Callable[[], tuple[EpochFn, Callable[[], None]]],
            data: Data, epochs: int) -> Result:
    """Time ``epochs`` epochs; check each delivers every sample once with its label."""
    epoch_fn, close = make()
    times = []
    try:
        for e in range(epochs):
            ids, labels = [], []
            t0 = time.perf_counter()
            for batch_ids, batch_labels, images in epoch_fn(e):
                ids.append(batch_ids)
                labels.append(batch_labels)
                if len(ids) == 1:
                    _check_images(name, images, len(batch_ids))
            times.append(time.perf_counter() - t0)
            _check_epoch(name, e, np.concatenate(ids), np.concatenate(labels), data.labels)
    finally:
        close()
    result = Result(name, what, times, data.n)
    print(f"  {name:<22} {result.rate:>10,.0f} img/s  "
          f"(epochs: {', '.join(f'{t:.2f} s' for t in times)})", flush=True)
    return result


def _check_images(name: str, images: torch.Tensor, n: int) -> None:
    shape = tuple(images.shape)
    if images.dtype != torch.uint8 or shape not in ((n, SIZE, SIZE, 3), (n, 3, SIZE, SIZE)):
        raise AssertionError(f"{name}: batch is {images.dtype} {shape}, expected uint8 "
                             f"({n}, {SIZE}, {SIZE}, 3) or ({n}, 3, {SIZE}, {SIZE})")


def _check_epoch(name: str, epoch: int, ids: np.ndarray, labels: np.ndarray,
                 expected: np.ndarray) -> None:
    n = len(expected)
    counts = np.bincount(ids, minlength=n)
    if len(counts) != n or (counts != 1).any():
        missing, repeated = int((counts[:n] == 0).sum()), int((counts > 1).sum())
        raise AssertionError(f"{name} epoch {epoch}: {len(ids)} samples delivered for {n}; "
                             f"{missing} missing, {repeated} more than once")
    if (labels != expected[ids]).any():
        raise AssertionError(f"{name} epoch {epoch}: "
                             f"{int((labels != expected[ids]).sum())} wrong labels")


def _optional(name: str, module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        print(f"  {name:<22} skipped: {module} not installed (pip install -e '.[peers]')")
        return False
    return True


def print_table(results: list[Result]) -> Check:
    """The img/s of every loader and its ratio to ImageFolder (``results[0]``).

    Returns the one ratio with a limit: formatlab's file loader against ImageFolder.
    """
    base = results[0].rate
    print(f"\n{'loader':<22} {'data':<24} {'img/s':>10} {'best epoch':>11} "
          f"{'vs ImageFolder':>15}")
    for r in results:
        print(f"{r.name:<22} {r.data:<24} {r.rate:>10,.0f} {r.best_epoch_rate:>11,.0f} "
              f"{r.rate / base:>14.2f}x")
    file_rate = results[1].rate
    print(f"numpy_mmap (npy) vs ImageFolder: {results[2].rate:,.0f} vs {base:,.0f} img/s, "
          f"{results[2].rate / base:.2f}x (no limit)")
    return Check("file (jpeg) vs ImageFolder", file_rate / base, TARGET, ">=",
                 f"{file_rate:,.0f} vs {base:,.0f} img/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, every loader")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # torchvision 0.29 warns that TorchCodec will take over image decoding; noise here.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    warnings.filterwarnings("ignore", category=UserWarning, module="webdataset")

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        t0 = time.perf_counter()
        data = build_data(Path(tmp), args.samples, args.seed)
        warm_page_cache(Path(tmp))
        print(f"{args.samples:,} {SIZE}x{SIZE} images, {len(data.jpeg)} formatlab shards, "
              f"built in {time.perf_counter() - t0:.1f} s; batch {args.batch_size}, "
              f"{args.workers} workers, {args.epochs} epochs, shuffled, CPU", flush=True)
        results = [
            measure("ImageFolder", "JPEG files, PIL", lambda: image_folder_epochs(data, args),
                    data, args.epochs),
            measure("formatlab file", "jpeg-q95 shards",
                    lambda: formatlab_epochs(FileLoader, "jpeg-q95", data.jpeg, args),
                    data, args.epochs),
            measure("formatlab numpy_mmap", "npy shards",
                    lambda: formatlab_epochs(NumpyMmapLoader, "npy", data.npy, args),
                    data, args.epochs),
        ]
        for name, module, what, make in (
                ("LitData", "litdata", "optimized JPEG chunks", litdata_epochs),
                ("WebDataset", "webdataset", "JPEG tar shards", webdataset_epochs)):
            if _optional(name, module):
                results.append(measure(name, what, lambda m=make: m(data, args), data,
                                       args.epochs))
        check = print_table(results)  # before the (slow) removal of ~100k temporary files
    return finish([check])


if __name__ == "__main__":
    sys.exit(main())
