"""The one registry of storage formats: :data:`FORMATS`, keyed by each format's own id.

An entry is a factory of the format; fixed ids are registered under the id the built
format reports, so no id is spelled twice. The quality families ``jpeg-qN``,
``jpeg-qN-444`` and ``webp-qN`` (N = 1..100, canonical spelling only) are registered
as patterns, and so is every image codec's packed variant ``wds-<codec id>``
(:mod:`shared.formats.wds`; the ``packed`` group). The CLI's choices, ``--formats all`` (:data:`CATALOG`) and the error
messages all come from here.

Adding a format is one module under ``shared/formats/`` and one :func:`register` line
below (before :data:`CATALOG` is taken).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from shared.formats.base import Format, UnknownFormat
from shared.formats.bmp import BmpFormat
from shared.formats.hdf5 import HDF5_VARIANTS, Hdf5Format
from shared.formats.jp2 import Jp2Format
from shared.formats.jpeg import JpegFormat
from shared.formats.npy import NpyFormat
from shared.formats.npy_files import NpyFilesFormat
from shared.formats.png import PngFormat
from shared.formats.tiff import TIFF_VARIANTS, TiffFormat
from shared.formats.wds import PACKED_GROUP, PACKED_HELP, PACKED_PREFIX, packed_format, packed_ids
from shared.formats.webp import WebpFormat
from shared.formats.zarr_format import ZarrFormat
from shared.registry import Registry

FormatFactory = Callable[[], Format]
_QUALITY = r"(?P<n>[1-9][0-9]?|100)"


class FormatRegistry(Registry[FormatFactory]):
    """Format factories; help and the unknown-id message name the catalog first."""

    def __init__(self) -> None:
        super().__init__("format", error=UnknownFormat)
        self.catalog: list[str] = []

    def help(self) -> str:
        fixed = [i for i in self.names() if i not in self.catalog]
        families = [f.help for f in self._families]
        return (", ".join([*self.catalog, *fixed, *families])
                + f", or 'all' (the catalog) or '{PACKED_GROUP}' (its image codecs packed)")

    def unknown_message(self, name: str) -> str:
        return f"unknown format {name!r}; valid: {self.help()}"


FORMATS = FormatRegistry()


def register(build: FormatFactory, *, catalog: bool = True) -> FormatFactory:
    """Register ``build`` under the id of the format it builds; ``catalog``: part of
    ``--formats all``."""
    format_id = build().id
    FORMATS.add(format_id, build)
    if catalog:
        FORMATS.catalog.append(format_id)
    return build


def register_quality_family(prefix: str, suffix: str, build: Callable[[int], Format]) -> None:
    """Register ``<prefix>N<suffix>`` for N = 1..100, built by ``build(N)``."""
    FORMATS.family(re.escape(prefix) + _QUALITY + re.escape(suffix),
                   lambda match: partial(build, int(match["n"])),
                   help=f"{prefix}N{suffix} (N = 1..100)")


# -- registration, in catalog order
register(BmpFormat)
register(PngFormat)
for _variant in TIFF_VARIANTS:
    register(partial(TiffFormat, _variant))
register(partial(JpegFormat, 95))
register(partial(JpegFormat, 95, "4:4:4"))
register(partial(JpegFormat, 75))
register(partial(Jp2Format, lossless=True))
register(partial(Jp2Format, lossless=False))
register(WebpFormat)
register(partial(WebpFormat, 90))
register(NpyFormat)
register(NpyFilesFormat)
for _variant in HDF5_VARIANTS:
    register(partial(Hdf5Format, _variant))
register(partial(ZarrFormat, zstd=False))
register(partial(ZarrFormat, zstd=True))
register_quality_family("jpeg-q", "", JpegFormat)
register_quality_family("jpeg-q", "-444", lambda n: JpegFormat(n, "4:4:4"))
register_quality_family("webp-q", "", WebpFormat)
FORMATS.family(re.escape(PACKED_PREFIX) + r".+",
               lambda match: partial(packed_format, match[0], get_format), help=PACKED_HELP)

CATALOG: tuple[str, ...] = tuple(FORMATS.catalog)


def format_id_help() -> str:
    """One line naming every valid format id, for ``--help`` and error messages."""
    return FORMATS.help()


def get_format(format_id: str) -> Format:
    """The format registered under ``format_id``.

    Raises:
        UnknownFormat: the id is not registered; the message lists the valid ones.
    """
    return FORMATS.get(format_id)()


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
    formats: dict[str, Format] = {}
    unknown = []
    for format_id in dict.fromkeys(ids):
        try:
            formats[format_id] = get_format(format_id)
        except UnknownFormat:  # a packed id is known only once its codec is resolved
            unknown.append(format_id)
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        raise UnknownFormat(f"unknown format {names}; valid: {format_id_help()}")
    return list(formats.values())


def registered_ids() -> tuple[str, ...]:
    """Every fixed id, then the packed variant of each catalog image codec: the ids the
    loader table and the loader contract test go through."""
    return (*FORMATS, *packed_ids(FORMATS.catalog, get_format))


def formats_help(accepts: Callable[[Format], bool]) -> str:
    """The registered formats that ``accepts`` admits, in registration order, one entry
    per codec family: the id where the family has one (``png``), else a glob of the
    family's ids (``jpeg-*``, ``tiff*``). For the loader table and its refusals."""
    families: dict[str, list[str]] = {}
    for format_id in registered_ids():
        fmt = get_format(format_id)
        if accepts(fmt):
            families.setdefault(fmt.family, []).append(format_id)
    out = []
    for family, ids in families.items():
        if ids == [family]:
            out.append(family)
        elif all(i.startswith(f"{family}-") for i in ids):
            out.append(f"{family}-*")
        else:
            out.append(f"{family}*")
    return ", ".join(out)
