"""PSNR and SSIM (shared.quality) on images whose values are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.quality import C1, C2, Quality, gaussian_window, measure, psnr, ssim


def brute_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM straight from its definition, one 11x11 window at a time (2-D, one channel)."""
    g = gaussian_window()
    w2 = np.outer(g, g)
    x, y = x.astype(np.float64), y.astype(np.float64)
    scores = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w2 * a).sum(), (w2 * b).sum()
            va, vb = (w2 * (a - ma) ** 2).sum(), (w2 * (b - mb) ** 2).sum()
            cab = (w2 * (a - ma) * (b - mb)).sum()
            scores.append(((2 * ma * mb + C1) * (2 * cab + C2))
                          / ((ma * ma + mb * mb + C1) * (va + vb + C2)))
    return float(np.mean(scores))


def test_identical_images() -> None:
    img = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_known_psnr() -> None:
    a = np.full((16, 16, 3), 100, dtype=np.uint8)
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE 1: 48.13 dB
    assert psnr(a, a + 10) == pytest.approx(20 * math.log10(25.5), abs=1e-9)  # MSE 100: 28.13


def test_flat_images_give_the_luminance_term() -> None:
    a, b = np.full((16, 16), 100, np.uint8), np.full((16, 16), 150, np.uint8)
    expected = (2 * 100 * 150 + C1) / (100**2 + 150**2 + C1)  # 0.92309
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.92309, abs=1e-5)


def test_ssim_matches_its_definition_window_by_window() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (18, 21), dtype=np.uint8)
    noisy = np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    assert ssim(x, noisy) == pytest.approx(brute_ssim(x, noisy), rel=1e-10)
    assert 0 < ssim(x, noisy) < 1
    rgb = np.stack([x, noisy, x[::-1]], axis=-1)
    back = np.stack([noisy, x, x[::-1]], axis=-1)
    per_channel = np.mean([brute_ssim(x, noisy), brute_ssim(noisy, x), 1.0])
    assert ssim(rgb, back) == pytest.approx(per_channel, rel=1e-10)


def test_quality_sums_pool_mse_and_average_ssim() -> None:
    a = np.full((12, 12, 3), 100, dtype=np.uint8)
    q = measure([a, a], [a + 1, a])
    assert q.images == 2 and q.values == 2 * a.size
    assert q.psnr_db == pytest.approx(10 * math.log10(255**2 / 0.5))  # pooled MSE 0.5
    assert q.ssim == pytest.approx((ssim(a, a + 1) + 1.0) / 2)
    assert (q + Quality()).psnr_db == q.psnr_db and Quality().psnr_db is None


def test_too_small_or_mismatched_images_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
