"""``jp2-lossless`` and ``jp2-lossy``: one JPEG 2000 (JP2 container) per sample, OpenJPEG.

Both apply the multiple component transform (RCT when lossless, ICT when lossy), as
JPEG 2000 encoders do for RGB by default; Pillow leaves it off unless asked.
The lossy variant targets a PSNR rather than a compression ratio: a fixed ratio starves
small images (a 32x32 sample at 20:1 leaves ~150 bytes, less than the headers).
"""

from __future__ import annotations

from shared.formats.base import PillowFormat

LOSSY_PSNR_DB = 40


class Jp2Format(PillowFormat):
    """JPEG 2000: reversible 5/3 wavelet (lossless) or irreversible 9/7 at a target PSNR."""

    def __init__(self, lossless: bool) -> None:
        if lossless:
            super().__init__("jp2-lossless", "jp2", True, extension="jp2",
                             compression="lossless", pillow_format="JPEG2000",
                             save_options={"irreversible": False, "mct": 1, "no_jp2": False})
        else:
            super().__init__("jp2-lossy", "jp2", False, extension="jp2",
                             compression=f"psnr-{LOSSY_PSNR_DB}dB", pillow_format="JPEG2000",
                             save_options={"irreversible": True, "mct": 1, "no_jp2": False,
                                           "quality_mode": "dB",
                                           "quality_layers": [LOSSY_PSNR_DB]})
