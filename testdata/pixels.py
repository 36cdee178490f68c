"""Learnable synthetic pixels and the encoded files the generators write."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

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

