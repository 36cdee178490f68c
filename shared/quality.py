"""Image quality of lossy formats against the decoded source: PSNR and SSIM.

SSIM follows Wang et al. (2004): 8-bit constants ``C1 = (0.01 * 255)**2`` and
``C2 = (0.03 * 255)**2``, an 11x11 Gaussian window with sigma 1.5, statistics over each
window position that lies wholly inside the image (as scikit-image's
``structural_similarity(gaussian_weights=True, use_sample_covariance=False,
data_range=255)`` after its border crop), averaged over positions and channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2
WINDOW = 11
SIGMA = 1.5
PEAK = 255.0


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian the 2-D window is separable into."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Valid-mode separable filtering of a (H, W, C) float array along H then W."""
    a = np.tensordot(sliding_window_view(a, len(w), axis=0), w, axes=([-1], [0]))
    return np.tensordot(sliding_window_view(a, len(w), axis=1), w, axes=([-1], [0]))


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean SSIM of two uint8 (H, W[, C]) images; 1.0 for identical images.

    Raises:
        ValueError: shapes differ, or the image is smaller than the 11x11 window.
    """
    x, y = _pair(reference, test)
    if min(x.shape[:2]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW}, got {x.shape[:2]}")
    w = gaussian_window()
    mx, my = _filter(x, w), _filter(y, w)
    vx = _filter(x * x, w) - mx * mx
    vy = _filter(y * y, w) - my * my
    cxy = _filter(x * y, w) - mx * my
    s = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2))
    return float(s.mean())


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (``inf`` when identical)."""
    x, y = _pair(reference, test)
    return psnr_from_mse(float(np.mean((x - y) ** 2)))


def psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(PEAK * PEAK / mse)


def _pair(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {test.shape}")
    x, y = reference.astype(np.float64), test.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    return x, y


@dataclass(frozen=True)
class Quality:
    """Sums over a sample of images, to merge across shards and then average.

    Attributes:
        squared_error: sum of squared pixel differences.
        values: pixels compared.
        ssim_sum: sum of per-image SSIM.
        images: images compared.
    """

    squared_error: float = 0.0
    values: int = 0
    ssim_sum: float = 0.0
    images: int = 0

    def __add__(self, other: "Quality") -> "Quality":
        return Quality(self.squared_error + other.squared_error, self.values + other.values,
                       self.ssim_sum + other.ssim_sum, self.images + other.images)

    @property
    def psnr_db(self) -> float | None:
        """PSNR of the pooled mean squared error (finite unless every pixel matched)."""
        return psnr_from_mse(self.squared_error / self.values) if self.values else None

    @property
    def ssim(self) -> float | None:
        return self.ssim_sum / self.images if self.images else None


def measure(references: Sequence[np.ndarray], decoded: Sequence[np.ndarray]) -> Quality:
    """The :class:`Quality` sums of decoded images against their references."""
    total = Quality()
    for ref, got in zip(references, decoded, strict=True):
        x, y = _pair(ref, got)
        score = ssim(ref, got) if min(ref.shape[:2]) >= WINDOW else 0.0
        total += Quality(float(np.sum((x - y) ** 2)), x.size, score,
                         1 if min(ref.shape[:2]) >= WINDOW else 0)
    return total
