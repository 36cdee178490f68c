"""Decode a raw sample once and bring it to the dataset's shape: uint8 HWC RGB, square.

Policy, applied the same way to every source:

- EXIF orientation is applied, so pixels come out as a viewer shows them.
- Every mode becomes 8-bit RGB. Grayscale is replicated to three channels; 16-bit
  samples keep their top 8 bits (divide by 256); 32-bit integer samples are treated as
  16-bit when they fit in 0..65535 and rescaled from their own range otherwise; float
  samples are taken as 0..1 when they lie there and rescaled from their range otherwise.
  Alpha (RGBA, LA, PA, palette transparency) is composited onto white, since fully
  transparent pixels often hold arbitrary colour. CMYK uses Pillow's conversion
  (embedded ICC profiles are not applied).
- With a ``size``, the shorter side is resized to ``size`` (bicubic, antialiased) and
  the centre ``size`` x ``size`` square kept; both happen in one resampling of the
  centre region. JPEGs at least twice the target are first decoded at a reduced DCT
  scale (Pillow's draft mode), which never goes below the target size.
- Anything wrong with the input raises :class:`RejectError` with a short reason;
  nothing else escapes and no Pillow warning is shown. Truncated files are detected
  because Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default, False.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 120_000_000
_RESAMPLE = Image.Resampling.BICUBIC
# Integer pre-reduction before the bicubic pass: far faster on big photos, visually equal.
_REDUCING_GAP = 3.0
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class RejectError(Exception):
    """The input cannot become a sample; ``reason`` is short enough for the manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def prepare_image(payload: np.ndarray | bytes, size: int | None, *,
                  max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True) -> np.ndarray:
    """Turn a source payload into a C-contiguous uint8 HWC RGB image.

    Args:
        payload: A decoded uint8 array (HW, HWC with 1, 3 or 4 channels) or encoded
            image bytes in any format Pillow reads.
        size: Side of the square output; None keeps the image's own size.
        max_pixels: Images with more pixels than this are rejected before decoding.
        draft: Let large JPEGs decode at a reduced DCT scale (False: always full
            decode; for measuring what draft mode saves).

    Returns:
        ``(size, size, 3)`` uint8, or the oriented native size when ``size`` is None.

    Raises:
        RejectError: Empty, not an image, truncated or corrupt, or too large.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be positive, got {size}")
    # Pillow warns about odd EXIF, palette transparency and large images; the verdict
    # is this function's result, so none of that should reach the conversion log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(payload, np.ndarray):
            return _from_array(payload, size)
        return _from_bytes(bytes(payload), size, max_pixels, draft)


def _from_array(arr: np.ndarray, size: int | None) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise RejectError(f"unsupported array dtype {arr.dtype} (expected uint8)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 3 and (size is None or arr.shape[:2] == (size, size)):
        return np.ascontiguousarray(arr)
    modes = {2: "L", 3: "RGB", 4: "RGBA"}
    mode = modes.get(arr.shape[2]) if arr.ndim == 3 else "L" if arr.ndim == 2 else None
    if mode is None or min(arr.shape[:2]) < 1:
        raise RejectError(f"unsupported array shape {arr.shape} (expected HW or HWC, C in 1, 3, 4)")
    img = Image.fromarray(np.ascontiguousarray(arr), mode)
    return _to_array(_resize_crop(_to_8bit(img), size))


def _from_bytes(data: bytes, size: int | None, max_pixels: int,
                draft: bool = True) -> np.ndarray:
    if not data:
        raise RejectError("empty file")
    buf = io.BytesIO(data)
    try:
        img = _open(buf)
    except UnidentifiedImageError:
        raise RejectError("not an image (unrecognised content)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise many types on bad headers
        raise RejectError(f"truncated or corrupt image: {_short(exc)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise RejectError(f"decompression bomb: {width}x{height} pixels exceeds limit {max_pixels}")
    if width < 1 or height < 1:
        raise RejectError(f"truncated or corrupt image: size {width}x{height}")
    try:
        if (draft and size is not None and img.format == "JPEG"
                and min(width, height) >= 2 * size):
            # Draft scales by at most min(w, h) // size, so both sides stay >= size.
            img.draft("RGB", (size, size))
        img.load()  # the whole decode happens here, so truncation is caught here
        _apply_orientation(img)
        img = _resize_crop(_to_8bit(img), size)
        return _to_array(img)
    except RejectError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
        raise RejectError(f"truncated or corrupt image: {_short(exc)}") from None


def _open(buf: io.BytesIO) -> ImageFile.ImageFile:
    """``Image.open`` without Pillow's own pixel limit, which the caller replaces."""
    try:
        return Image.open(buf)
    except Image.DecompressionBombError:
        pass
    # Pillow refuses before returning the size; identify the file the way Image.open
    # does, minus its check, so the caller can apply max_pixels and report WxH.
    Image.init()
    prefix = buf.getvalue()[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        verdict = True if accept is None else accept(prefix)
        if verdict and not isinstance(verdict, str):  # a str is Pillow's "almost" warning
            buf.seek(0)
            try:
                return factory(buf, "")
            except (SyntaxError, IndexError, TypeError, ValueError):
                continue
    raise UnidentifiedImageError("cannot identify image")


def _apply_orientation(img: Image.Image) -> None:
    """Apply the EXIF orientation in place; unreadable EXIF leaves the pixels as stored."""
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode as ``L`` or ``RGB`` (grayscale stays one band until the end)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if (mode == "P" and "transparency" in img.info) or mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8), "L")
    if mode == "I":
        arr = np.asarray(img).astype(np.int64)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return Image.fromarray((arr >> 8).astype(np.uint8) if hi > 255 else arr.astype(np.uint8), "L")
        return Image.fromarray(_rescale(arr.astype(np.float64), lo, hi), "L")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            return Image.fromarray(np.round(arr * 255.0).astype(np.uint8), "L")
        return Image.fromarray(_rescale(arr, lo, hi), "L")
    if mode == "1":
        return img.convert("L")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise RejectError(f"unsupported image mode {mode}: {_short(exc)}") from None


def _rescale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _resize_crop(img: Image.Image, size: int | None) -> Image.Image:
    """Shorter side to ``size``, centre square kept: one resampling of the centre region."""
    if size is None:
        return img
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    if side == size and left.is_integer() and top.is_integer():
        return img.crop((int(left), int(top), int(left) + side, int(top) + side))
    return img.resize((size, size), _RESAMPLE, box=(left, top, left + side, top + side),
                      reducing_gap=_REDUCING_GAP)


def _to_array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] != 3:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
