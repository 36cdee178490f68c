"""CIFAR-10 in its python (pickled) and binary archive layouts, plus a booby-trapped pickle."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from prep.sources.cifar10 import TEST_BATCH, TRAIN_BATCHES
from testdata.pixels import render_images

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")


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


