"""``bmp``: one uncompressed 24-bit BMP per sample."""

from __future__ import annotations

from shared.formats.base import PillowFormat


class BmpFormat(PillowFormat):
    """Windows bitmap, 24 bits per pixel, no compression."""

    def __init__(self) -> None:
        super().__init__("bmp", "bmp", True, extension="bmp", compression="none",
                         pillow_format="BMP", save_options={})
