"""``jpeg-qN``: one baseline JPEG per sample at quality N (libjpeg via Pillow)."""

from __future__ import annotations

from shared.formats.base import PillowFormat

SUBSAMPLING = "4:2:0"


class JpegFormat(PillowFormat):
    """JPEG at a fixed quality with 4:2:0 chroma subsampling."""

    def __init__(self, quality: int) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        super().__init__(f"jpeg-q{quality}", "jpeg", False, extension="jpg",
                         compression=f"q{quality}", pillow_format="JPEG",
                         save_options={"quality": quality, "subsampling": SUBSAMPLING,
                                       "optimize": False})
