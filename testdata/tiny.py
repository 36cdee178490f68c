"""Tiny ImageNet in its folder and zip layouts."""

from __future__ import annotations

import builtins
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from testdata.pixels import _jpeg, render_images


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
    wnids, name_of, files = _class_files(classes, rng)
    labels: dict[str, int] = {}
    grayscale: list[str] = []
    top = "tiny-imagenet-200"
    image_bytes = _Images(size, classes, rng)

    def add(rel: str, label: int) -> None:
        data, gray = image_bytes(label)
        files.append((rel, data))
        labels[f"{top}/{rel}"] = label
        if gray:
            grayscale.append(f"{top}/{rel}")

    for label, wnid in enumerate(wnids):
        boxes = []
        for i in range(train_per_class):
            name = f"{wnid}_{i}.JPEG"
            add(f"train/{wnid}/images/{name}", label)
            boxes.append(f"{name}\t{size // 8}\t{size // 8}\t{size - size // 8}\t{size - size // 8}")
        files.append((f"train/{wnid}/{wnid}_boxes.txt", ("\n".join(boxes) + "\n").encode()))
    val_labels = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    annotations = []
    for j, label in enumerate(val_labels.tolist()):
        add(f"val/images/val_{j}.JPEG", label)
        annotations.append(f"val_{j}.JPEG\t{wnids[label]}\t0\t0\t{size - 1}\t{size - 1}")
    files.append(("val/val_annotations.txt", ("\n".join(annotations) + "\n").encode()))
    n_test = classes * val_per_class if test_images is None else test_images
    for k in range(n_test):
        files.append((f"test/images/test_{k}.JPEG", image_bytes(int(rng.integers(classes)))[0]))

    target = _write(path, top, files, zip)
    splits = {"train": classes * train_per_class, "val": classes * val_per_class}
    return GeneratedTiny(target, tuple(wnids), tuple(name_of[w] for w in wnids), labels, splits,
                         tuple(grayscale), n_test)


def _class_files(classes: int, rng: np.random.Generator
                 ) -> tuple[list[str], dict[str, str], list[tuple[str, bytes]]]:
    """The wnids (in the unsorted order of the real file), their names, and the two files."""
    wnids_sorted = [f"n{1440000 + 7919 * i:08d}" for i in range(classes)]
    wnids = [wnids_sorted[i] for i in rng.permutation(classes)]  # the real file is not sorted
    names = [f"synthetic thing {i}" for i in range(classes)]
    name_of = dict(builtins.zip(wnids_sorted, names, strict=True))
    words = ["n00001740\tentity"] + [f"{w}\t{name_of[w]}, thing {w[-4:]}, object" for w in wnids_sorted]
    return wnids, name_of, [("wnids.txt", ("\n".join(wnids) + "\n").encode()),
                            ("words.txt", ("\n".join(words) + "\n").encode())]


class _Images:
    """JPEG bytes of one image of a class; every seventh is grayscale, as in the real set."""

    def __init__(self, size: int, classes: int, rng: np.random.Generator) -> None:
        self.size, self.classes, self.rng, self.count = size, classes, rng, 0

    def __call__(self, label: int) -> tuple[bytes, bool]:
        self.count += 1
        img = render_images(np.array([label]), height=self.size, width=self.size,
                            num_classes=self.classes, rng=self.rng)[0]
        gray = self.count % 7 == 0
        pil = Image.fromarray(img).convert("L") if gray else Image.fromarray(img)
        return _jpeg(pil, quality=85), gray


def _write(path: Path, top: str, files: list[tuple[str, bytes]], as_zip: bool) -> Path:
    """Write ``files`` under ``top/`` as a folder or as the zip; returns what was written."""
    if as_zip:
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
        return target
    target = path / top
    for rel, data in files:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return target
