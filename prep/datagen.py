"""Synthetic datasets in the sources' real on-disk formats, for tests and demos.

Every generator writes the layout the real download has (a CIFAR-10 python or binary
tarball, a Tiny ImageNet folder or zip, a folder of class sub-folders) and returns what
it wrote, so tests can compare. Images are learnable, and what storage loses can cost
accuracy: pairs of classes share a coarse look (hue band, wide stripes) and the two
classes of a pair differ only in a fine texture that low-quality JPEG removes (see
:func:`render_images`); a small ConvNet tells the pairs apart within an epoch or two.

CLI::

    python -m prep.datagen {cifar10,cifar10-binary,tiny-imagenet,image-folder} --out PATH
        [--train N] [--test N] [--classes K] [--size S] [--seed N] [--zip]
        [--splits] [--no-odd-files]
"""

from __future__ import annotations

import argparse
import builtins
import io
import os
import pickle
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from prep.sources.cifar10 import TEST_BATCH, TRAIN_BATCHES

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")
_PIXEL_BUDGET = 4_000_000  # pixels rendered per vectorised chunk


# --------------------------------------------------------------------------- pixels


def render_images(labels: np.ndarray, *, height: int, width: int, num_classes: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Learnable synthetic images, one per label, as (n, height, width, 3) uint8.

    Classes come in pairs. A pair shares a coarse look: a hue band (neighbouring pairs'
    bands overlap) and wide stripes of one orientation and width, which any storage
    keeps. The two classes of a pair differ only in a fine texture, a grating of about
    2.5 pixels' period (at 32 pixels; it scales with the image) running across or along
    the image: lossless formats and high-quality JPEG keep it, low-quality JPEG
    quantises it away, and the model can then tell only the pair. Mean colour says
    little: it cannot separate the two classes of a pair and blurs neighbouring pairs.
    Orientations are horizontal or vertical only, so a horizontal flip (the training
    augmentation) keeps an image in its class. An image draws its hue within the band,
    the phases of both gratings, its brightness and pixel noise.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    side = float(min(height, width))
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float32) / side,
                         np.arange(width, dtype=np.float32) / side, indexing="ij")
    pairs = (num_classes + 1) // 2
    chunk = max(1, _PIXEL_BUDGET // (height * width))
    for start in range(0, n, chunk):
        lab = labels[start:start + chunk]
        m = len(lab)
        pair, fine = lab // 2, lab % 2
        hue = ((pair + rng.uniform(-0.75, 0.75, m)) / pairs) % 1.0
        coarse = _grating(pair % 2, 1.5 + (pair // 2) % 3, rng, xx, yy)      # wide stripes
        texture = _grating(fine, 0.4 * 32, rng, xx, yy)                     # ~2.5 px at 32
        bright = rng.uniform(0.7, 1.0, m).astype(np.float32)[:, None, None]
        shade = (0.55 + 0.25 * coarse + 0.1 * texture) * bright             # 0.14 .. 0.9
        # Noise on the shade, shared by the channels: a third of the work of colour noise.
        noise = rng.integers(-12, 13, shade.shape, dtype=np.int8)
        shade += noise * np.float32(1.0 / 255.0)
        np.clip(shade, 0.0, 1.0, out=shade)
        rgb = (_hsv_to_rgb(hue, 0.6, 1.0) * 255.0).astype(np.float32)  # (m, 3)
        block = out[start:start + m]
        for c in range(3):
            block[..., c] = shade * rgb[:, c, None, None]
    return out


def _grating(vertical: np.ndarray, cycles: np.ndarray | float, rng: np.random.Generator,
             xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """(m, h, w) sine gratings in -1..1 with ``cycles`` per image side and a random phase,
    varying along x where ``vertical`` (vertical stripes), along y elsewhere."""
    m = len(vertical)
    cycles = np.broadcast_to(np.asarray(cycles, dtype=np.float32), (m,))
    phase = rng.uniform(0.0, 2.0 * np.pi, m).astype(np.float32)[:, None, None]
    along = np.where(np.asarray(vertical, dtype=bool)[:, None, None], xx[None], yy[None])
    return np.sin((2.0 * np.pi * cycles)[:, None, None] * along + phase)


def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    vv = np.full_like(h, v)
    pp = np.full_like(h, p)
    table = np.stack([
        np.stack([vv, t, pp], -1), np.stack([q, vv, pp], -1), np.stack([pp, vv, t], -1),
        np.stack([pp, q, vv], -1), np.stack([t, pp, vv], -1), np.stack([vv, pp, q], -1),
    ])
    return table[i, np.arange(len(h))]


def _jpeg(img: np.ndarray | Image.Image, quality: int = 90, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    pil.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def _png(img: np.ndarray | Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    pil.save(buf, "PNG", **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------- CIFAR-10


@dataclass(frozen=True)
class GeneratedCifar:
    """What a CIFAR-10 generator wrote.

    Attributes:
        path: The archive written.
        class_names: The ten class names, as batches.meta holds them.
        train_images: (5 * train_per_batch, 32, 32, 3) uint8, batch 1 rows first.
        train_labels: Matching labels.
        test_images: (test, 32, 32, 3) uint8.
        test_labels: Matching labels.
        train_per_batch: Rows in each data_batch_N.
    """

    path: Path
    class_names: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_per_batch: int

    def lookup(self, key: str) -> tuple[np.ndarray, int]:
        """The image and label a source key (``"data_batch_2:7"``, ``"test_batch.bin:0"``) names."""
        batch, _, row_text = key.rpartition(":")
        batch = batch.removesuffix(".bin")
        row = int(row_text)
        if batch == TEST_BATCH:
            return self.test_images[row], int(self.test_labels[row])
        index = (TRAIN_BATCHES.index(batch)) * self.train_per_batch + row
        return self.train_images[index], int(self.train_labels[index])


def _cifar_arrays(train_per_batch: int, test: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    n_train = 5 * train_per_batch
    train_labels = rng.integers(0, 10, n_train)
    test_labels = rng.integers(0, 10, test)
    train = render_images(train_labels, height=32, width=32, num_classes=10, rng=rng)
    test_images = render_images(test_labels, height=32, width=32, num_classes=10, rng=rng)
    return train, train_labels, test_images, test_labels


def _chw_rows(images: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) -> (n, 3072) with the red, green and blue planes in turn, as CIFAR stores them."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _cifar_batches(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                   test_labels: np.ndarray, per_batch: int):
    for i, name in enumerate(TRAIN_BATCHES):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        yield name, f"training batch {i + 1} of 5", train[sl], train_labels[sl]
    yield TEST_BATCH, "testing batch 1 of 1", test, test_labels


def _write_tar(path: Path, members: Sequence[tuple[str, bytes]], folder: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=0) as tar:
        info = tarfile.TarInfo(folder)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1243555200
        tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1243555200
            tar.addfile(info, io.BytesIO(data))


def make_cifar10_python(path: str | os.PathLike[str], *, train_per_batch: int = 10_000,
                        test: int = 10_000, seed: int = 0,
                        style: Literal["py2", "py3"] = "py2") -> GeneratedCifar:
    """Write a ``cifar-10-python.tar.gz`` like the official one.

    Args:
        path: The archive to write.
        train_per_batch: Rows in each of data_batch_1..5.
        test: Rows in test_batch.
        seed: Seed for labels and pixels (same seed, same data as :func:`make_cifar10_binary`).
        style: ``"py2"`` writes the opcodes Python 2's cPickle wrote for the original
            (byte strings, ``numpy.core.multiarray._reconstruct``); ``"py3"`` is what
            ``pickle.dump(..., protocol=2)`` writes today (bytes via ``_codecs.encode``).
    """
    path = Path(path)
    train, train_labels, test_images, test_labels = _cifar_arrays(train_per_batch, test, seed)
    dump = _py2_pickle if style == "py2" else (lambda obj: pickle.dumps(obj, protocol=2))
    members = [("batches.meta", dump({
        b"num_cases_per_batch": train_per_batch,
        b"label_names": [n.encode() for n in CIFAR_CLASSES],
        b"num_vis": 3072,
    }))]
    for name, title, images, labels in _cifar_batches(train, train_labels, test_images,
                                                      test_labels, train_per_batch):
        members.append((name, dump({
            b"batch_label": title.encode(),
            b"labels": [int(v) for v in labels],
            b"data": _chw_rows(images),
            b"filenames": [f"synthetic_{name}_{i}.png".encode() for i in range(len(images))],
        })))
    members.append(("readme.html", b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; "
                                   b"url=http://www.cs.toronto.edu/~kriz/cifar.html\">\n"))
    _write_tar(path, members, "cifar-10-batches-py")
    return GeneratedCifar(path, CIFAR_CLASSES, train, train_labels, test_images, test_labels,
                          train_per_batch)


def make_cifar10_binary(path: str | os.PathLike[str], *, train_per_batch: int = 10_000,
                        test: int = 10_000, seed: int = 0) -> GeneratedCifar:
    """Write a ``cifar-10-binary.tar.gz`` like the official one.

    Each record is one label byte and 3072 pixel bytes; arguments as for
    :func:`make_cifar10_python`.
    """
    path = Path(path)
    train, train_labels, test_images, test_labels = _cifar_arrays(train_per_batch, test, seed)
    members = [("batches.meta.txt", ("\n".join(CIFAR_CLASSES) + "\n\n").encode())]
    for name, _, images, labels in _cifar_batches(train, train_labels, test_images,
                                                  test_labels, train_per_batch):
        records = np.empty((len(images), 3073), dtype=np.uint8)
        records[:, 0] = labels
        records[:, 1:] = _chw_rows(images)
        members.append((f"{name}.bin", records.tobytes()))
    members.append(("readme.html", b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; "
                                   b"url=http://www.cs.toronto.edu/~kriz/cifar.html\">\n"))
    _write_tar(path, members, "cifar-10-batches-bin")
    return GeneratedCifar(path, CIFAR_CLASSES, train, train_labels, test_images, test_labels,
                          train_per_batch)


class _Trap:
    """Pickles as a call of ``func(*args)``: what a malicious CIFAR file would hold."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def make_booby_trapped_cifar(path: str | os.PathLike[str], *, marker: str = "/tmp/PWNED",
                             call: Literal["os.system", "builtins.eval"] = "os.system") -> Path:
    """Write a python-format CIFAR-10 archive whose data_batch_1 pickle runs a command.

    Unpickled with plain :func:`pickle.load`, the file would create ``marker``; a safe
    reader refuses it without running anything.
    """
    path = Path(path)
    make_cifar10_python(path, train_per_batch=4, test=4, seed=1)
    if call == "os.system":
        trap = _Trap(os.system, (f"touch {marker}",))
    else:
        trap = _Trap(eval, (f"__import__('os').system('touch {marker}')",))
    evil = pickle.dumps({b"batch_label": b"training batch 1 of 5", b"labels": [0, 1, 2, 3],
                         b"data": trap, b"filenames": []}, protocol=2)
    with tarfile.open(path, "r:gz") as tar:
        members = [(m.name.split("/", 1)[1], tar.extractfile(m).read())  # type: ignore[union-attr]
                   for m in tar.getmembers() if m.isfile()]
    members = [(name, evil if name == "data_batch_1" else data) for name, data in members]
    _write_tar(path, members, "cifar-10-batches-py")
    return path


# Python 2 cPickle opcodes (protocol 2), written by hand because Python 3 spells byte
# strings as _codecs.encode calls in protocol 2 and the original files do not.
def _py2_pickle(obj: Any) -> bytes:
    out = bytearray(b"\x80\x02")
    _py2_emit(obj, out)
    out += b"."
    return bytes(out)


def _py2_emit(obj: Any, out: bytearray) -> None:
    if obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out += b"K" + bytes([obj])
        elif 0 <= obj < 65536:
            out += b"M" + struct.pack("<H", obj)
        else:
            out += b"J" + struct.pack("<i", obj)
    elif isinstance(obj, bytes):
        out += (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<i", len(obj))) + obj
    elif isinstance(obj, tuple):
        out += b"("
        for value in obj:
            _py2_emit(value, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]"
        for i in range(0, len(obj), 1000):
            out += b"("
            for value in obj[i:i + 1000]:
                _py2_emit(value, out)
            out += b"e"
    elif isinstance(obj, dict):
        out += b"}("
        for key, value in obj.items():
            _py2_emit(key, out)
            _py2_emit(value, out)
        out += b"u"
    elif isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8:
            raise TypeError("only uint8 arrays are written")
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        _py2_emit((0,), out)
        _py2_emit(b"b", out)
        out += b"\x87R"  # TUPLE3, REDUCE
        out += b"("
        _py2_emit(1, out)
        _py2_emit(tuple(obj.shape), out)
        out += b"cnumpy\ndtype\n"
        _py2_emit((b"u1", 0, 1), out)
        out += b"R"
        _py2_emit((3, b"|", None, None, None, -1, -1, 0), out)
        out += b"b"  # BUILD
        _py2_emit(False, out)
        _py2_emit(np.ascontiguousarray(obj).tobytes(), out)
        out += b"tb"  # TUPLE, BUILD
    else:
        raise TypeError(f"cannot write {type(obj).__name__} as a Python 2 pickle")


# --------------------------------------------------------------------------- Tiny ImageNet


@dataclass(frozen=True)
class GeneratedTiny:
    """What :func:`make_tiny_imagenet` wrote.

    Attributes:
        path: The zip, or the ``tiny-imagenet-200`` folder.
        wnids: Class ids in wnids.txt order (the label order).
        class_names: First synonym of each class in words.txt, in label order.
        labels: Source key -> label, for every train and val image.
        splits: Image count per split (``train``, ``val``).
        grayscale: Keys of the images stored as grayscale JPEGs.
        test_images: Unlabelled images in test/images.
    """

    path: Path
    wnids: tuple[str, ...]
    class_names: tuple[str, ...]
    labels: dict[str, int]
    splits: dict[str, int]
    grayscale: tuple[str, ...]
    test_images: int


def make_tiny_imagenet(path: str | os.PathLike[str], *, classes: int = 10,
                       train_per_class: int = 50, val_per_class: int = 10,
                       test_images: int | None = None, size: int = 64, zip: bool = False,
                       seed: int = 0) -> GeneratedTiny:
    """Write Tiny ImageNet's layout: a ``tiny-imagenet-200`` folder, or ``tiny-imagenet-200.zip``.

    Args:
        path: Folder to create ``tiny-imagenet-200/`` (or the zip) in; a path ending in
            ``.zip`` is the zip itself.
        classes: Number of wnids.
        train_per_class: Images in each ``train/<wnid>/images``.
        val_per_class: Images per class in ``val/images``.
        test_images: Unlabelled images in ``test/images`` (default: ``val_per_class * classes``).
        size: Image side.
        zip: Write the zip instead of the folder.
        seed: Seed for everything random.
    """
    rng = np.random.default_rng(seed)
    path = Path(path)
    wnids_sorted = [f"n{1440000 + 7919 * i:08d}" for i in range(classes)]
    wnids = [wnids_sorted[i] for i in rng.permutation(classes)]  # the real file is not sorted
    names = [f"synthetic thing {i}" for i in range(classes)]
    name_of = dict(builtins.zip(wnids_sorted, names, strict=True))
    words = ["n00001740\tentity"] + [f"{w}\t{name_of[w]}, thing {w[-4:]}, object" for w in wnids_sorted]

    files: list[tuple[str, bytes]] = [
        ("wnids.txt", ("\n".join(wnids) + "\n").encode()),
        ("words.txt", ("\n".join(words) + "\n").encode()),
    ]
    labels: dict[str, int] = {}
    grayscale: list[str] = []
    top = "tiny-imagenet-200"
    counter = 0

    def image_bytes(label: int) -> tuple[bytes, bool]:
        nonlocal counter
        counter += 1
        img = render_images(np.array([label]), height=size, width=size, num_classes=classes, rng=rng)[0]
        gray = counter % 7 == 0
        pil = Image.fromarray(img).convert("L") if gray else Image.fromarray(img)
        return _jpeg(pil, quality=85), gray

    for label, wnid in enumerate(wnids):
        boxes = []
        for i in range(train_per_class):
            name = f"{wnid}_{i}.JPEG"
            rel = f"train/{wnid}/images/{name}"
            data, gray = image_bytes(label)
            files.append((rel, data))
            labels[f"{top}/{rel}"] = label
            if gray:
                grayscale.append(f"{top}/{rel}")
            boxes.append(f"{name}\t{size // 8}\t{size // 8}\t{size - size // 8}\t{size - size // 8}")
        files.append((f"train/{wnid}/{wnid}_boxes.txt", ("\n".join(boxes) + "\n").encode()))
    val_labels = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    annotations = []
    for j, label in enumerate(val_labels.tolist()):
        rel = f"val/images/val_{j}.JPEG"
        data, gray = image_bytes(label)
        files.append((rel, data))
        labels[f"{top}/{rel}"] = label
        if gray:
            grayscale.append(f"{top}/{rel}")
        annotations.append(f"val_{j}.JPEG\t{wnids[label]}\t0\t0\t{size - 1}\t{size - 1}")
    files.append(("val/val_annotations.txt", ("\n".join(annotations) + "\n").encode()))
    n_test = classes * val_per_class if test_images is None else test_images
    for k in range(n_test):
        files.append((f"test/images/test_{k}.JPEG", image_bytes(int(rng.integers(classes)))[0]))

    if zip:
        target = path if path.suffix == ".zip" else path / "tiny-imagenet-200.zip"
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zf:
            # The real zip lists its folders too.
            folders = {top + "/"} | {f"{top}/{'/'.join(rel.split('/')[:i])}/"
                                     for rel, _ in files for i in range(1, rel.count("/") + 1)}
            for folder in sorted(folders):
                zf.writestr(folder, b"")
            for rel, data in files:
                zf.writestr(f"{top}/{rel}", data)
    else:
        target = path / top
        for rel, data in files:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    splits = {"train": classes * train_per_class, "val": classes * val_per_class}
    return GeneratedTiny(target, tuple(wnids), tuple(name_of[w] for w in wnids), labels, splits,
                         tuple(grayscale), n_test)


# --------------------------------------------------------------------------- image folder

_FOLDER_CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")


def make_image_folder(path: str | os.PathLike[str], *, classes: int = 3, per_class: int = 10,
                      size: tuple[int, int] = (640, 480), splits: bool = False,
                      odd_files: bool = True, seed: int = 0) -> dict[str, Any]:
    """Write a folder of class sub-folders of JPEG and PNG photos, optionally with odd files.

    Args:
        path: The root folder.
        classes: Number of class folders.
        per_class: Photos per class (per class in ``train`` when ``splits``; ``val`` and
            ``test`` then get a fifth as many, at least one).
        size: Nominal (width, height); each photo varies by up to an eighth.
        splits: Put class folders under ``train/``, ``val/`` and ``test/``.
        odd_files: Add the awkward files real folders hold (see Returns).
        seed: Seed for everything random.

    Returns:
        A dict with ``root`` (Path), ``classes`` (sorted names; label = index),
        ``files`` (rel -> {"split": split folder or None, "label": int, "kind": str,
        "expect": "ok" or the start of the reject reason}), ``rejects`` (rel -> reason
        start, for files the transform rejects), ``listing_rejects`` (rel -> reason, for
        files the listing rejects), ``hidden`` (files a listing skips) and ``special``
        (kind -> rel for the odd files that must convert: ``cmyk``, ``gray``, ``i16``,
        ``palette``, ``palette_alpha``, ``rgba``, ``exif_rotated``) plus
        ``exif_stored_size`` ((w, h) of the rotated JPEG as stored).
    """
    rng = np.random.default_rng(seed)
    root = Path(path)
    names = sorted(_FOLDER_CLASSES[i] if i < len(_FOLDER_CLASSES) else f"class_{i:03d}"
                   for i in range(classes))
    split_counts = ({"train": per_class, "val": max(1, per_class // 5), "test": max(1, per_class // 5)}
                    if splits else {None: per_class})
    files: dict[str, dict[str, Any]] = {}

    def put(rel: str, data: bytes, split: str | None, label: int, kind: str, expect: str = "ok") -> None:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        files[rel] = {"split": split, "label": label, "kind": kind, "expect": expect}

    def photo(label: int, w: int, h: int) -> np.ndarray:
        return render_images(np.array([label]), height=h, width=w, num_classes=classes, rng=rng)[0]

    w0, h0 = size
    for split, count in split_counts.items():
        prefix = f"{split}/" if split else ""
        for label, cls in enumerate(names):
            for i in range(count):
                w = w0 + int(rng.integers(0, max(1, w0 // 8)))
                h = h0 + int(rng.integers(0, max(1, h0 // 8)))
                img = photo(label, w, h)
                if i % 4 == 3:
                    put(f"{prefix}{cls}/img_{i:04d}.png", _png(img), split, label, "png")
                else:
                    put(f"{prefix}{cls}/img_{i:04d}.jpg", _jpeg(img), split, label, "jpeg")

    special: dict[str, str] = {}
    rejects: dict[str, str] = {}
    listing_rejects: dict[str, str] = {}
    hidden: list[str] = []
    exif_stored_size = (0, 0)
    if odd_files:
        split = "train" if splits else None
        prefix = f"{split}/{names[0]}/" if split else f"{names[0]}/"
        base = photo(0, 320, 240)
        good = _jpeg(base)

        def odd(name: str, data: bytes, kind: str, reject: str | None = None) -> None:
            put(prefix + name, data, split, 0, kind, reject or "ok")
            if reject:
                rejects[prefix + name] = reject
            else:
                special[kind] = prefix + name

        odd("corrupt.jpg", _corrupt_jpeg(good, rng), "corrupt", "truncated or corrupt image")
        odd("truncated.jpg", good[: len(good) * 6 // 10], "truncated", "truncated or corrupt image")
        odd("empty.jpg", b"", "empty", "empty file")
        odd("notes.jpg", b"Scanned by the clinic front desk; see attached.\n", "text",
            "not an image (unrecognised content)")
        odd("huge.png", _png_bomb(20000, 20000), "bomb", "decompression bomb")
        odd("cmyk.jpg", _jpeg(Image.fromarray(base).convert("CMYK")), "cmyk")
        odd("gray.jpg", _jpeg(Image.fromarray(base).convert("L")), "gray")
        deep = (base[:, :, 1].astype(np.uint16) * 257)
        odd("deep16.png", _png(Image.fromarray(deep)), "i16")
        odd("palette.png", _png(Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE)),
            "palette")
        pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
        odd("palette_alpha.png", _png(pal, transparency=0), "palette_alpha")
        rgba = np.dstack([base, np.where(np.arange(320)[None, :] < 160, 0, 255).astype(np.uint8)
                          .repeat(240, 0)])
        odd("rgba.png", _png(Image.fromarray(rgba, "RGBA")), "rgba")
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        odd("rotated.jpg", _jpeg(base, exif=exif.tobytes()), "exif_rotated")
        exif_stored_size = (320, 240)
        (root / prefix / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        hidden.append(prefix + ".DS_Store")
        (root / "README.txt").write_text("Photos collected for the study.\n")
        listing_rejects["README.txt"] = "not inside a class folder"
    return {
        "root": root,
        "classes": names,
        "files": files,
        "rejects": rejects,
        "listing_rejects": listing_rejects,
        "hidden": hidden,
        "special": special,
        "exif_stored_size": exif_stored_size,
    }


def _corrupt_jpeg(good: bytes, rng: np.random.Generator) -> bytes:
    """Valid JPEG headers followed by random entropy-coded data."""
    sos = good.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big")
    noise = rng.integers(0, 256, len(good) - start - 2, dtype=np.uint8).tobytes()
    return good[:start] + noise + good[-2:]


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's signature."""
    data = bytearray(_png(Image.new("L", (1, 1))))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), then width, height
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13]))
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


# --------------------------------------------------------------------------- CLI


def _parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        width = int(w)
        height = int(h) if h else width
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Write one synthetic dataset; see the module docstring for the flags."""
    parser = argparse.ArgumentParser(prog="python -m prep.datagen", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("cifar10", "cifar10-binary", "tiny-imagenet", "image-folder"))
    parser.add_argument("--out", required=True, type=Path,
                        help="archive path (cifar10*: .tar.gz, tiny --zip: .zip) or folder to write into")
    parser.add_argument("--train", type=_positive,
                        help="cifar10: train images in all (a multiple of 5; default 50000); "
                             "tiny-imagenet: per class (default 100); image-folder: per class (default 20)")
    parser.add_argument("--test", type=_positive,
                        help="cifar10: test images (default 10000); tiny-imagenet: val images per class "
                             "(default 20); image-folder: unused (val and test get a fifth of --train)")
    parser.add_argument("--classes", type=_positive,
                        help="tiny-imagenet (default 10) and image-folder (default 3); CIFAR-10 has 10")
    parser.add_argument("--size", type=_parse_size,
                        help="tiny-imagenet: side (default 64); image-folder: WxH (default 640x480)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--zip", action="store_true", help="tiny-imagenet: write tiny-imagenet-200.zip")
    parser.add_argument("--splits", action="store_true",
                        help="image-folder: put class folders under train/ val/ test/")
    parser.add_argument("--no-odd-files", action="store_true",
                        help="image-folder: leave out the corrupt, empty, odd-mode and hidden files")
    args = parser.parse_args(argv)

    if args.kind.startswith("cifar10"):
        if args.classes not in (None, 10):
            parser.error("CIFAR-10 always has 10 classes")
        train = 50_000 if args.train is None else args.train
        if train % 5:
            parser.error("--train for cifar10 must be a multiple of 5 (five batch files)")
        binary = args.kind == "cifar10-binary"
        out = args.out if args.out.name.endswith(".tar.gz") else args.out / (
            "cifar-10-binary.tar.gz" if binary else "cifar-10-python.tar.gz")
        make = make_cifar10_binary if binary else make_cifar10_python
        made = make(out, train_per_batch=train // 5, test=10_000 if args.test is None else args.test,
                    seed=args.seed)
        print(f"wrote {made.path}: {len(made.train_labels)} train, {len(made.test_labels)} test")
    elif args.kind == "tiny-imagenet":
        tiny = make_tiny_imagenet(args.out, classes=args.classes or 10,
                                  train_per_class=100 if args.train is None else args.train,
                                  val_per_class=20 if args.test is None else args.test,
                                  size=args.size[0] if args.size else 64, zip=args.zip, seed=args.seed)
        print(f"wrote {tiny.path}: {len(tiny.wnids)} classes, train {tiny.splits['train']}, "
              f"val {tiny.splits['val']}, test {tiny.test_images}")
    else:
        made_folder = make_image_folder(args.out, classes=args.classes or 3,
                                        per_class=20 if args.train is None else args.train,
                                        size=args.size or (640, 480), splits=args.splits,
                                        odd_files=not args.no_odd_files, seed=args.seed)
        print(f"wrote {made_folder['root']}: {len(made_folder['files'])} files in "
              f"{len(made_folder['classes'])} classes, {len(made_folder['rejects'])} meant to be rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
