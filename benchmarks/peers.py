"""formatlab's loaders against the loaders users would otherwise pick, on the same data.

One CIFAR-like dataset (default 50,000 32x32 RGB images, 10 classes, rendered by
``testdata.datagen.render_images``) is written once as formatlab ``jpeg-q95`` and ``npy``
shards (and ``wds-jpeg-q95`` packed shards where that format is registered), and the
very same JPEG bytes are laid out for each peer by the peer's own writer
(``benchmarks/peers_loaders.py`` says what each row measures):

- torchvision ``ImageFolder`` + ``DataLoader`` (PIL decode, ``PILToTensor``);
- LitData ``optimize`` + ``StreamingDataset``/``StreamingDataLoader``;
- WebDataset ``ShardWriter`` tars + its pipeline (``decode("torchrgb8")``) + ``WebLoader``;
- Mosaic Streaming ``MDSWriter`` + ``StreamingDataset`` (PIL decode) + ``DataLoader``;
- FFCV ``DatasetWriter`` (``RGBImageField``, JPEG and raw-pixel modes) + its ``Loader``
  (``OrderOption.RANDOM``, JIT-compiled pipeline on ``workers`` threads);

against formatlab's ``file`` (``jpeg-q95``), ``numpy_mmap`` (``npy``), and, where
registered, ``packed`` and ``webdataset`` on the packed shards. Every loader gets the
same batch size, workers, shuffling on and epochs, on the CPU, with its files in the
page cache; each epoch is checked to deliver every sample exactly once with its label.

Ratios (best epoch of each, one run), each printed against its limit; exit status 1
when one misses: ``file`` vs ImageFolder (mean rate), ``numpy_mmap`` vs a bare NumPy
gather of the same batches, ``packed`` vs FFCV JPEG; and issue 18's two packed checks
from ``benchmarks/bench_packed.py``: ``packed`` at 512x512 vs cores x one core's bare
libjpeg-turbo rate (``--samples-512`` images), and the first epoch streamed from
``rclone serve s3`` on loopback vs the cached copy (the same 32 px packed shards). A peer
whose package is missing gets one line saying why instead of a row
(``pip install -e '.[peers]'``, docs/peers.md).

    python benchmarks/peers.py [--samples N] [--epochs N] [--samples-512 N] [--no-s3]
                               [--results URL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peers_loaders as peers  # noqa: E402 - benchmarks/ is the script's folder
from bench_packed import check_512, streaming_check  # noqa: E402
from limits import Check, finish  # noqa: E402
from node.loaders import LOADER_SPECS  # noqa: E402
from node.loaders.base import epoch_batches  # noqa: E402
from node.loaders.file import FileLoader  # noqa: E402
from node.loaders.numpy_mmap import NumpyMmapLoader  # noqa: E402
from peers_data import (  # noqa: E402
    PACKED_FORMAT,
    SIZE,
    Closer,
    Data,
    EpochFn,
    build_data,
    format_registered,
    warm_page_cache,
)
from peers_results import Result, write_results  # noqa: E402
from shared.results import utc_now  # noqa: E402

TARGET = 2.0  # file (jpeg) must beat ImageFolder on the same JPEGs by this much
NUMPY_MMAP_VS_GATHER = 0.9  # numpy_mmap's best epoch against the bare gather's
PACKED_VS_FFCV = 1.0  # the packed JPEG loader against FFCV's JPEG mode, 32 px
GATHER_EPOCHS = 20  # raw gathers take milliseconds: more epochs for a steady best

Make = Callable[[], tuple[EpochFn, Closer]]


def bare_gather_epochs(data: Data, args: argparse.Namespace) -> tuple[EpochFn, Closer]:
    """The reference for ``numpy_mmap``: per batch of the same plan, sort and
    ``np.take`` each shard's part of its memory-mapped ``images.npy`` into one buffer."""
    slices = data.shards["npy"]
    arrays = [np.load(Path(s.location) / "images.npy", mmap_mode="r", allow_pickle=False)
              for s in slices]
    arrays = [np.asarray(a) for a in arrays]
    bounds = np.cumsum([0] + [len(s) for s in slices])

    def epoch(e: int) -> peers.Batches:
        for batch in epoch_batches(data.n, args.batch_size, args.seed, e):
            positions = np.sort(batch)
            cuts = np.searchsorted(positions, bounds)
            out = np.empty((len(positions), SIZE, SIZE, 3), dtype=np.uint8)
            for k, array in enumerate(arrays):
                if cuts[k + 1] > cuts[k]:
                    array.take(positions[cuts[k]:cuts[k + 1]] - bounds[k], axis=0,
                               out=out[cuts[k]:cuts[k + 1]], mode="clip")
            yield positions, data.labels[positions], torch.from_numpy(out)

    return epoch, lambda: None


# --------------------------------------------------------------------------- measuring


class Row(NamedTuple):
    """One loader to measure: its table label, results names, packages and builder
    (``workers`` where it runs with other workers than ``--workers``)."""

    label: str
    loader: str
    format: str
    modules: tuple[str, ...]
    make: Make
    workers: int | None = None


def measure(rows: list[Row], data: Data, epochs: int) -> list[Result]:
    """Time ``epochs`` epochs of each row, the rows' epochs interleaved (so drift on a
    shared machine hits both sides of a ratio alike); check each epoch delivers every
    sample once with its label."""
    built: list[tuple[Row, EpochFn, Closer]] = []
    try:
        for row in rows:
            built.append((row, *row.make()))
        times: list[list[float]] = [[] for _ in rows]
        started = [utc_now()] * len(rows)
        for e in range(epochs):
            for k, (row, epoch_fn, _) in enumerate(built):
                if e == 0:
                    started[k] = utc_now()
                times[k].append(_timed_epoch(row.label, epoch_fn, e, data))
    finally:
        for _, _, close in built:
            close()
    results = [Result(row.loader, row.format, row.label, t, data.n, when, row.workers)
               for row, t, when in zip(rows, times, started, strict=True)]
    for r in results:
        epochs_s = (', '.join(f'{t:.2f} s' for t in r.epoch_s) if len(r.epoch_s) <= 4 else
                    f"{len(r.epoch_s)}, best {min(r.epoch_s):.3f} s, "
                    f"mean {sum(r.epoch_s) / len(r.epoch_s):.3f} s")
        print(f"  {r.label:<24} {r.best_epoch_rate:>11,.0f} img/s best epoch  "
              f"(epochs: {epochs_s})", flush=True)
    return results


def _timed_epoch(label: str, epoch_fn: EpochFn, epoch: int, data: Data) -> float:
    ids, labels = [], []
    t0 = time.perf_counter()
    for batch_ids, batch_labels, images in epoch_fn(epoch):
        ids.append(batch_ids)
        labels.append(batch_labels)
        if len(ids) == 1:
            _check_images(label, images, len(batch_ids))
    seconds = time.perf_counter() - t0
    _check_epoch(label, epoch, np.concatenate(ids), np.concatenate(labels), data.labels)
    return seconds


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


def unavailable(modules: tuple[str, ...]) -> str | None:
    """None when every module imports, else one line saying why not."""
    for module in modules:
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - a broken build fails in many ways
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"{module} does not import ({reason}); pip install -e '.[peers]'"
    return None


# --------------------------------------------------------------------------- the rows


def planned(data: Data, args: argparse.Namespace) -> list[tuple[int, list[Row]]]:
    """``(epochs, rows)`` groups in the order measured; a ratio's two sides share a
    group, their epochs interleaved."""
    def fl(cls: Callable[[], type], fmt: str, options: argparse.Namespace = args) -> Make:
        return lambda: peers.formatlab_epochs(cls(), fmt, data.shards[fmt], options)

    main_thread = argparse.Namespace(**{**vars(args), "workers": 0})

    packed = [Row(f"formatlab {name}", name, PACKED_FORMAT, LOADER_SPECS[name].requires,
                  fl(lambda n=name: LOADER_SPECS[n].load(), PACKED_FORMAT))
              for name in ("packed", "webdataset")
              if PACKED_FORMAT in data.shards and name in LOADER_SPECS]
    ffcv = ("ffcv",)
    return [
        (args.epochs, [Row("ImageFolder", "torchvision-imagefolder", "jpeg-q95",
                           ("torchvision",), lambda: peers.image_folder_epochs(data, args)),
                       Row("formatlab file", "file", "jpeg-q95", (),
                           fl(lambda: FileLoader, "jpeg-q95"))]),
        (max(args.epochs, GATHER_EPOCHS),
         [Row("bare NumPy gather", "bare-numpy-gather", "npy", (),
              lambda: bare_gather_epochs(data, args), 0),
          Row("numpy_mmap, 0 workers", "numpy_mmap", "npy", (),
              fl(lambda: NumpyMmapLoader, "npy", main_thread), 0),
          Row("formatlab numpy_mmap", "numpy_mmap", "npy", (),
              fl(lambda: NumpyMmapLoader, "npy"))]),
        (args.epochs, [Row("FFCV JPEG", "ffcv", "ffcv-jpeg", ffcv,
                           lambda: peers.ffcv_epochs(data, args, "jpg")), *packed]),
        (args.epochs, [Row("FFCV raw pixels", "ffcv", "ffcv-raw", ffcv,
                           lambda: peers.ffcv_epochs(data, args, "raw"))]),
        (args.epochs, [Row("LitData", "litdata", "litdata-jpeg", ("litdata",),
                           lambda: peers.litdata_epochs(data, args))]),
        (args.epochs, [Row("WebDataset", "webdataset", "webdataset-tar-jpeg", ("webdataset",),
                           lambda: peers.webdataset_epochs(data, args))]),
        (args.epochs, [Row("Mosaic Streaming", "mosaic-streaming", "mds-jpeg", ("streaming",),
                           lambda: peers.mosaic_epochs(data, args))]),
    ]


def packed_note() -> str | None:
    """Why the packed rows are not measured, or None when they are."""
    if not format_registered(PACKED_FORMAT):
        return f"format {PACKED_FORMAT} is not registered (shared/formats)"
    if "packed" not in LOADER_SPECS:
        return "no packed loader is registered (node/loaders)"
    return None


# --------------------------------------------------------------------------- ratios


def print_table(results: list[Result]) -> None:
    """The img/s of every loader and its ratio to ImageFolder (``results[0]``)."""
    base = results[0].best_epoch_rate
    print(f"\n{'loader':<24} {'format':<20} {'img/s':>10} {'best epoch':>11} "
          f"{'vs ImageFolder':>15}")
    for r in results:
        print(f"{r.label:<24} {r.format:<20} {r.rate:>10,.0f} {r.best_epoch_rate:>11,.0f} "
              f"{r.best_epoch_rate / base:>14.2f}x")


def checks(results: dict[str, Result], notes: list[str]) -> list[Check]:
    """The ratios with limits; a side that was not measured adds a note instead."""
    def ratio(name: str, a: str, b: str, limit: float, best: bool = True) -> Check | None:
        if a not in results or b not in results:
            notes.append(f"{name}: not measured ({a if a not in results else b} missing)")
            return None
        ra, rb = results[a], results[b]
        va, vb = (ra.best_epoch_rate, rb.best_epoch_rate) if best else (ra.rate, rb.rate)
        return Check(name, va / vb, limit, ">=", f"{va:,.0f} vs {vb:,.0f} img/s")

    out = [ratio("file (jpeg) vs ImageFolder", "formatlab file", "ImageFolder", TARGET,
                 best=False),
           ratio("numpy_mmap vs bare NumPy gather, one thread each (best epoch)",
                 "numpy_mmap, 0 workers", "bare NumPy gather", NUMPY_MMAP_VS_GATHER),
           ratio(f"packed ({PACKED_FORMAT}) vs FFCV JPEG, {SIZE} px (best epoch)",
                 "formatlab packed", "FFCV JPEG", PACKED_VS_FFCV)]
    return [c for c in out if c is not None]


def packed_checks(data: Data, args: argparse.Namespace, notes: list[str],
                  note: str | None) -> list[Check]:
    """The packed loader at 512 px against the bare decode, and streamed from loopback S3
    against its cached copy (two rounds each, interleaved)."""
    if note is not None:
        notes.append(f"packed at 512 px and streamed: not measured ({note})")
        return []
    timing = {"batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs}
    print(f"packed: {args.samples_512} 512x512 JPEGs against the bare decode"
          + ("" if args.no_s3 else "; streamed from loopback S3 against the cached copy"),
          flush=True)
    out = [check_512(data.root / "big", args.samples_512, args.seed, 2, timing)]
    if args.no_s3:
        notes.append("packed streamed first epoch vs cached: not measured (--no-s3)")
    else:
        out.append(streaming_check(data.root, "store", data.shards[PACKED_FORMAT], SIZE, 3,
                                   timing, PACKED_FORMAT))
    return out


def run(args: argparse.Namespace, root: Path) -> list[Check]:
    t0 = time.perf_counter()
    note = packed_note()
    formats = ("jpeg-q95", "npy") + ((PACKED_FORMAT,) if note is None else ())
    data = build_data(root, args.samples, args.seed, formats)
    warm_page_cache(root)
    print(f"{args.samples:,} {SIZE}x{SIZE} images, {len(data.shards['jpeg-q95'])} formatlab "
          f"shards per format, built in {time.perf_counter() - t0:.1f} s; batch "
          f"{args.batch_size}, {args.workers} workers, {args.epochs} epochs, shuffled, CPU",
          flush=True)
    notes = [] if note is None else [f"formatlab packed: skipped: {note}"]
    results: dict[str, Result] = {}
    for epochs, group in planned(data, args):
        rows = []
        for row in group:
            reason = unavailable(row.modules)
            if reason:
                print(f"  {row.label:<24} skipped: {reason}", flush=True)
                notes.append(f"{row.label}: skipped: {reason}")
            else:
                rows.append(row)
        results.update((r.label, r) for r in measure(rows, data, epochs))
    print_table(list(results.values()))
    found = checks(results, notes) + packed_checks(data, args, notes, note)
    for line in notes:
        print(f"note: {line}")
    if args.results:
        written = write_results(args.results, list(results.values()), args, SIZE, root)
        print(f"{written} runs written to {args.results} (dataset of the rows: "
              f"peers-{args.samples}x{SIZE}px-seed{args.seed})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, every loader")
    parser.add_argument("--samples-512", type=int, default=800,
                        help="512x512 JPEGs for the packed loader's bare-decode check")
    parser.add_argument("--no-s3", action="store_true",
                        help="skip the streamed-from-S3 check (no rclone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", metavar="URL",
                        help="also append runs and epochs rows to this results store")
    args = parser.parse_args(argv)
    if (min(args.samples, args.epochs, args.batch_size, args.samples_512) < 1
            or args.workers < 0):
        parser.error("--samples, --samples-512, --epochs and --batch-size must be >= 1, "
                     "--workers >= 0")
    # torchvision 0.29 warns that TorchCodec will take over image decoding; noise here.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    warnings.filterwarnings("ignore", category=UserWarning, module="webdataset")
    warnings.filterwarnings("ignore", category=UserWarning, module="streaming")
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        found = run(args, Path(tmp))
    return finish(found)


if __name__ == "__main__":
    sys.exit(main())
