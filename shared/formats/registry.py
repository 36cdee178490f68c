"""The one registry of storage formats, keyed by format id.

Fixed ids map to factories; ``jpeg-qN``, ``jpeg-qN-444`` and ``webp-qN`` (N = 1..100)
are parsed.
The CLI's choices, ``--formats all`` and error messages all come from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from shared.formats.base import Format, UnknownFormat
from shared.formats.bmp import BmpFormat
from shared.formats.hdf5 import Hdf5Format
from shared.formats.jp2 import Jp2Format
from shared.formats.jpeg import JpegFormat
from shared.formats.npy import NpyFormat
from shared.formats.npy_files import NpyFilesFormat
from shared.formats.png import PngFormat
from shared.formats.tiff import TiffFormat
from shared.formats.wds import PACKED_GROUP, PACKED_HELP, PACKED_PREFIX, packed_format, packed_ids
from shared.formats.webp import WebpFormat
from shared.formats.zarr_format import ZarrFormat

FIXED_FORMATS: dict[str, Callable[[], Format]] = {
    "bmp": BmpFormat,
    "png": PngFormat,
    "tiff": lambda: TiffFormat("tiff"),
    "tiff-lzw": lambda: TiffFormat("tiff-lzw"),
    "tiff-zip": lambda: TiffFormat("tiff-zip"),
    "jp2-lossless": lambda: Jp2Format(lossless=True),
    "jp2-lossy": lambda: Jp2Format(lossless=False),
    "webp-lossless": WebpFormat,
    "npy": NpyFormat,
    "npy-files": NpyFilesFormat,
    "hdf5": lambda: Hdf5Format("hdf5"),
    "hdf5-gzip": lambda: Hdf5Format("hdf5-gzip"),
    "hdf5-lzf": lambda: Hdf5Format("hdf5-lzf"),
    "zarr": lambda: ZarrFormat(zstd=False),
    "zarr-zstd": lambda: ZarrFormat(zstd=True),
}

# Quality-parameterised families: prefix and suffix around N -> factory taking N
# (canonical spelling only).
QUALITY_FORMATS: dict[tuple[str, str], Callable[[int], Format]] = {
    ("jpeg-q", ""): JpegFormat,
    ("jpeg-q", "-444"): lambda n: JpegFormat(n, "4:4:4"),
    ("webp-q", ""): WebpFormat,
}
_QUALITY_ID = re.compile(r"^(?P<family>[a-z]+-q)(?P<n>[1-9][0-9]?|100)(?P<suffix>-444)?$")

CATALOG: tuple[str, ...] = (
    "bmp", "png", "tiff", "tiff-lzw", "tiff-zip", "jpeg-q95", "jpeg-q95-444", "jpeg-q75",
    "jp2-lossless", "jp2-lossy", "webp-lossless", "webp-q90",
    "npy", "npy-files", "hdf5", "hdf5-gzip", "hdf5-lzf", "zarr", "zarr-zstd",
)


def format_id_help() -> str:
    """One line naming every valid format id, for ``--help`` and error messages."""
    fixed = [i for i in FIXED_FORMATS if i not in CATALOG]
    catalog_extra = [f"{prefix}N{suffix} (N = 1..100)" for prefix, suffix in QUALITY_FORMATS]
    return (", ".join([*CATALOG, *fixed, *catalog_extra, PACKED_HELP])
            + f", or 'all' (the catalog) or '{PACKED_GROUP}' (its image codecs packed)")


def get_format(format_id: str) -> Format:
    """The format registered under ``format_id``.

    Raises:
        UnknownFormat: the id is not registered; the message lists the valid ones.
    """
    factory = FIXED_FORMATS.get(format_id)
    if format_id.startswith(PACKED_PREFIX):
        return packed_format(format_id, get_format)
    if factory is not None:
        return factory()
    match = _QUALITY_ID.match(format_id)
    family = (match["family"], match["suffix"] or "") if match else None
    if family in QUALITY_FORMATS:
        return QUALITY_FORMATS[family](int(match["n"]))
    raise UnknownFormat(f"unknown format {format_id!r}; valid: {format_id_help()}")


def chroma_subsampling(fmt: Format) -> str:
    """The chroma subsampling of what ``fmt`` stores: ``4:2:0`` for JPEG's default and
    lossy WebP (VP8 always subsamples), ``4:4:4`` for everything that keeps full chroma."""
    fmt = getattr(fmt, "codec", fmt)  # a packed format stores its codec's files
    if fmt.family == "jpeg":
        return str(fmt.params.get("subsampling", "4:2:0"))
    if fmt.family == "webp" and not fmt.lossless:
        return "4:2:0"
    return "4:4:4"


def parse_format_list(text: str) -> list[Format]:
    """Formats named by a comma-separated list; ``all`` means the catalog, ``packed`` the
    packed variants of its image codecs.

    Repeats are dropped, first occurrence kept.

    Raises:
        UnknownFormat: an id is not registered, or the list is empty.
    """
    ids: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if token:
            ids.extend(CATALOG if token == "all" else packed_ids(CATALOG, get_format)
                       if token == PACKED_GROUP else [token])
    if not ids:
        raise UnknownFormat(f"no format given; valid: {format_id_help()}")
    unknown = []
    formats: dict[str, Format] = {}
    for format_id in ids:
        if format_id in formats:
            continue
        try:
            formats[format_id] = get_format(format_id)
        except UnknownFormat:
            unknown.append(format_id)
    if unknown:
        names = ", ".join(repr(u) for u in dict.fromkeys(unknown))
        raise UnknownFormat(f"unknown format {names}; valid: {format_id_help()}")
    return list(formats.values())
