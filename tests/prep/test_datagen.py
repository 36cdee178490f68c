"""The generated images can show what storage costs: mean colour does not give the class away,
and the fine texture that tells paired classes apart survives lossless storage and JPEG q95
but not JPEG q10."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from testdata.datagen import render_images

CLASSES, N, SIDE = 10, 1200, 32
FINE_CYCLES = 13  # the texture's cycles per side at 32 pixels (0.4 per pixel)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, N)
    return render_images(labels, height=SIDE, width=SIDE, num_classes=CLASSES, rng=rng), labels


def _jpeg(batch: np.ndarray, quality: int) -> np.ndarray:
    out = []
    for img in batch:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return np.stack(out)


def _mean_colour_accuracy(batch: np.ndarray, labels: np.ndarray) -> float:
    """Nearest centroid on the mean RGB, fitted on the first three quarters."""
    colour = batch.reshape(len(batch), -1, 3).mean(1)
    fit = len(batch) * 3 // 4
    centroids = np.stack([colour[:fit][labels[:fit] == k].mean(0) for k in range(CLASSES)])
    guess = ((colour[fit:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((guess == labels[fit:]).mean())


def _texture_contrast(batch: np.ndarray, labels: np.ndarray) -> float:
    """How much more fine-grating energy an image has across its own class's orientation than
    across the other one (1.0: the texture no longer tells the pair's classes apart)."""
    grey = batch.astype(np.float32).mean(-1)
    spectrum = np.abs(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True)))
    band = slice(FINE_CYCLES - 1, FINE_CYCLES + 2)
    along_x, along_y = spectrum[:, 0, band].sum(1), spectrum[:, band, 0].sum(1)
    vertical = labels % 2 == 1  # odd classes: vertical fine stripes (varying along x)
    own = np.where(vertical, along_x, along_y)
    other = np.where(vertical, along_y, along_x)
    return float(own.mean() / other.mean())


def test_mean_colour_does_not_give_the_class_away(images: tuple[np.ndarray, np.ndarray]) -> None:
    batch, labels = images
    # Chance is 0.1; each pair shares its colours, so no colour rule can exceed 0.5.
    assert _mean_colour_accuracy(batch, labels) < 0.5
    assert _mean_colour_accuracy(_jpeg(batch, 10), labels) < 0.5


@pytest.mark.parametrize("quality,kept", [(None, True), (95, True), (10, False)])
def test_fine_texture_survives_only_good_storage(images: tuple[np.ndarray, np.ndarray],
                                                 quality: int | None, kept: bool) -> None:
    batch, labels = images
    stored = batch if quality is None else _jpeg(batch, quality)
    contrast = _texture_contrast(stored, labels)
    assert (contrast > 4.0) if kept else (contrast < 2.0), contrast


def test_generators_stay_out_of_the_product_and_their_cli_runs(tmp_path) -> None:
    """testdata/ is importable from the repository root but not in the installed packages."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    from setuptools import find_packages

    repo = Path(__file__).resolve().parents[2]
    find = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = find_packages(str(repo), include=find["packages"]["find"]["include"])
    assert {"prep", "prep.sources", "node", "shared"} <= set(packages)
    assert not [p for p in packages if p.split(".")[0] in ("testdata", "tests", "benchmarks")]
    assert not list((repo / "prep").rglob("datagen.py"))
    out = tmp_path / "c.tar.gz"
    proc = subprocess.run([sys.executable, "-m", "testdata.datagen", "cifar10", "--out", str(out),
                           "--train", "10", "--test", "2"], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "10 train, 2 test" in proc.stdout
