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


