"""``webp-lossless`` and ``webp-qN``: one WebP per sample (libwebp via Pillow)."""

from __future__ import annotations

from shared.formats.base import PillowFormat

METHOD = 4  # libwebp's speed/size trade-off, 0 (fast) .. 6; 4 is its default


class WebpFormat(PillowFormat):
    """WebP, lossless (VP8L) when ``quality`` is None, else lossy (VP8) at ``quality``."""

    def __init__(self, quality: int | None = None) -> None:
        if quality is None:
            # For lossless WebP "quality" is encoder effort; exact keeps every RGB value.
            super().__init__("webp-lossless", "webp", True, extension="webp",
                             compression="lossless", pillow_format="WEBP",
                             save_options={"lossless": True, "quality": 80, "method": METHOD,
                                           "exact": True})
            return
        if not 1 <= quality <= 100:
            raise ValueError(f"WebP quality must be in 1..100, got {quality}")
        super().__init__(f"webp-q{quality}", "webp", False, extension="webp",
                         compression=f"q{quality}", pillow_format="WEBP",
                         save_options={"lossless": False, "quality": quality,
                                       "method": METHOD})
