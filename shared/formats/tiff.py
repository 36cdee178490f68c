"""``tiff``, ``tiff-lzw``, ``tiff-zip``: one TIFF per sample, written by libtiff via Pillow."""

from __future__ import annotations

from shared.formats.base import PillowFormat

# format id -> (report label, Pillow's name of the TIFF compression)
TIFF_VARIANTS: dict[str, tuple[str, str]] = {
    "tiff": ("none", "raw"),
    "tiff-lzw": ("lzw", "tiff_lzw"),
    "tiff-zip": ("deflate", "tiff_adobe_deflate"),
}


class TiffFormat(PillowFormat):
    """8-bit RGB TIFF, uncompressed, LZW or Deflate ("zip")."""

    def __init__(self, id: str) -> None:
        if id not in TIFF_VARIANTS:
            raise ValueError(f"unknown TIFF variant {id!r}; valid: {', '.join(TIFF_VARIANTS)}")
        label, compression = TIFF_VARIANTS[id]
        super().__init__(id, "tiff", True, extension="tiff", compression=label,
                         pillow_format="TIFF", save_options={"compression": compression})
