"""``jpeg-qN`` and ``jpeg-qN-444``: one baseline JPEG per sample at quality N (libjpeg via
Pillow), with 4:2:0 chroma subsampling (Pillow's default) or none (4:4:4).

Subsampling halves the chroma resolution: on small images it costs more PSNR than the
quality setting does (q95 on 32x32: about 37 dB at 4:2:0, 44 dB at 4:4:4, for about 10 %
more bytes), so the 4:4:4 variant lets a study show that trade.
"""

from __future__ import annotations

from shared.formats.base import PillowFormat

SUBSAMPLING = "4:2:0"
SUBSAMPLINGS = {"4:2:0": "", "4:4:4": "-444"}  # subsampling -> format id suffix


class JpegFormat(PillowFormat):
    """JPEG at a fixed quality and chroma subsampling."""

    def __init__(self, quality: int, subsampling: str = SUBSAMPLING) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        if subsampling not in SUBSAMPLINGS:
            raise ValueError(f"JPEG subsampling must be one of {', '.join(SUBSAMPLINGS)}, "
                             f"got {subsampling!r}")
        suffix = SUBSAMPLINGS[subsampling]
        super().__init__(f"jpeg-q{quality}{suffix}", "jpeg", False, extension="jpg",
                         compression=f"q{quality}{suffix}", pillow_format="JPEG",
                         save_options={"quality": quality, "subsampling": subsampling,
                                       "optimize": False})
