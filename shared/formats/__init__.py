"""Storage formats: one module per codec family, one registry keyed by format id.

h5py and zarr are imported only by the readers and writers that use them.
"""

from shared.formats.base import (
    ArrayFormat,
    ArrayShardReader,
    FileFormat,
    FileShardReader,
    Format,
    FormatKind,
    FormatMismatch,
    ImageArray,
    PillowFormat,
    SampleFile,
    ShardReader,
    UnknownFormat,
)
from shared.formats.registry import (
    CATALOG,
    FORMATS,
    format_id_help,
    get_format,
    parse_format_list,
)

__all__ = [
    "CATALOG",
    "FORMATS",
    "ArrayFormat",
    "ArrayShardReader",
    "FileFormat",
    "FileShardReader",
    "Format",
    "FormatKind",
    "FormatMismatch",
    "ImageArray",
    "PillowFormat",
    "SampleFile",
    "ShardReader",
    "UnknownFormat",
    "format_id_help",
    "get_format",
    "parse_format_list",
]
