"""High-resolution test photos for benchmarks/bench_scale.py.

Each photo is about 12 megapixels (4000x3000 and the other common camera sizes, either
orientation), a JPEG at quality 92 with an EXIF orientation tag (1, 3, 6 or 8, so the
conversion must rotate) and camera make/model tags. The content has texture at every
scale: the learnable gratings of the test-data generator at a quarter of the size, plus
value noise at three scales, upsampled, plus per-pixel sensor noise; about 4-5 MB per
photo, like a camera's. Three class folders, as the masks set has.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from testdata.pixels import render_images

CLASSES = ("mask_weared_incorrect", "with_mask", "without_mask")
SIZES = ((4000, 3000), (4032, 3024), (4608, 3456), (3264, 2448))
ORIENTATIONS = (1, 3, 6, 8)
_DONE = ".generated.json"


def photo_bytes(label: int, width: int, height: int, orientation: int,
                rng: np.random.Generator) -> bytes:
    """One textured JPEG of ``width x height`` with EXIF ``orientation``."""
    w, h = width // 4, height // 4
    base = render_images(np.array([label]), height=h, width=w, num_classes=len(CLASSES),
                         rng=rng)[0].astype(np.int16)
    for scale, weight in ((3, 0.3), (20, 0.4), (120, 0.5)):
        small = rng.integers(0, 256, (h // scale + 2, w // scale + 2, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
        base += (weight * (up - 128)).astype(np.int16)
    full = np.asarray(Image.fromarray(base.clip(0, 255).astype(np.uint8))
                      .resize((width, height), Image.BICUBIC), np.int16)
    full = full + rng.integers(-10, 11, (height, width, 1), dtype=np.int16)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F], exif[0x0110] = "formatlab", "synthetic camera"
    buf = io.BytesIO()
    Image.fromarray(full.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92,
                                                             exif=exif.tobytes())
    return buf.getvalue()


def _one(args: tuple[Path, int, int]) -> None:
    root, i, seed = args
    rng = np.random.default_rng([seed, i])
    label = i % len(CLASSES)
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    if rng.random() < 0.3:  # portrait as stored
        width, height = height, width
    orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    path = root / CLASSES[label] / f"IMG_{i:05d}.jpg"
    path.write_bytes(photo_bytes(label, width, height, orientation, rng))


def make_photos(root: Path, n: int, *, seed: int = 0) -> Path:
    """``n`` photos in class folders under ``root``; kept and reused when ``root``
    already holds the same ``n`` and ``seed``."""
    spec = {"n": n, "seed": seed, "sizes": SIZES}
    marker = root / _DONE
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return root
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_one, [(root, i, seed) for i in range(n)], chunksize=4))
    marker.write_text(json.dumps(spec))
    return root


def subset(photos: Path, root: Path, n: int) -> Path:
    """The first ``n`` photos (by number) of ``photos`` under ``root``, hard-linked."""
    shutil.rmtree(root, ignore_errors=True)
    chosen = sorted(photos.rglob("IMG_*.jpg"), key=lambda p: p.name)[:n]
    for path in chosen:
        dest = root / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dest)
    return root

