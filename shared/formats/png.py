"""``png``: one PNG per sample (zlib level 6, Pillow's default)."""

from __future__ import annotations

from shared.formats.base import PillowFormat

COMPRESS_LEVEL = 6


class PngFormat(PillowFormat):
    """8-bit RGB PNG."""

    def __init__(self) -> None:
        super().__init__("png", "png", True, extension="png",
                         compression=f"deflate-{COMPRESS_LEVEL}", pillow_format="PNG",
                         save_options={"compress_level": COMPRESS_LEVEL})
