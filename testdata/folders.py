"""A folder of class sub-folders of images, with the odd files real folders hold."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from testdata.pixels import _corrupt_jpeg, _jpeg, _png, _png_bomb, render_images

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
    out = _Writer(root, classes, rng)
    w0, h0 = size
    for split, count in split_counts.items():
        prefix = f"{split}/" if split else ""
        for label, cls in enumerate(names):
            for i in range(count):
                w = w0 + int(rng.integers(0, max(1, w0 // 8)))
                h = h0 + int(rng.integers(0, max(1, h0 // 8)))
                img = out.photo(label, w, h)
                if i % 4 == 3:
                    out.put(f"{prefix}{cls}/img_{i:04d}.png", _png(img), split, label, "png")
                else:
                    out.put(f"{prefix}{cls}/img_{i:04d}.jpg", _jpeg(img), split, label, "jpeg")
    made: dict[str, Any] = {"root": root, "classes": names, "files": out.files, "rejects": {},
                            "listing_rejects": {}, "hidden": [], "special": {},
                            "exif_stored_size": (0, 0)}
    if odd_files:
        made.update(_write_odd_files(out, names[0], "train" if splits else None))
    return made


class _Writer:
    """Writes a folder's files and records what each is meant to become."""

    def __init__(self, root: Path, classes: int, rng: np.random.Generator) -> None:
        self.root, self.classes, self.rng = root, classes, rng
        self.files: dict[str, dict[str, Any]] = {}

    def put(self, rel: str, data: bytes, split: str | None, label: int, kind: str,
            expect: str = "ok") -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        self.files[rel] = {"split": split, "label": label, "kind": kind, "expect": expect}

    def photo(self, label: int, w: int, h: int) -> np.ndarray:
        return render_images(np.array([label]), height=h, width=w, num_classes=self.classes,
                             rng=self.rng)[0]


def _write_odd_files(out: _Writer, first_class: str, split: str | None) -> dict[str, Any]:
    """The awkward files real folders hold, in the first class (label 0)."""
    prefix = f"{split}/{first_class}/" if split else f"{first_class}/"
    base = out.photo(0, 320, 240)
    good = _jpeg(base)
    special: dict[str, str] = {}
    rejects: dict[str, str] = {}

    def odd(name: str, data: bytes, kind: str, reject: str | None = None) -> None:
        out.put(prefix + name, data, split, 0, kind, reject or "ok")
        if reject:
            rejects[prefix + name] = reject
        else:
            special[kind] = prefix + name

    odd("corrupt.jpg", _corrupt_jpeg(good, out.rng), "corrupt", "truncated or corrupt image")
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
    (out.root / prefix / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (out.root / "README.txt").write_text("Photos collected for the study.\n")
    return {"rejects": rejects, "special": special, "hidden": [prefix + ".DS_Store"],
            "listing_rejects": {"README.txt": "not inside a class folder"},
            "exif_stored_size": (320, 240)}
