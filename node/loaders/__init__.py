"""Loaders: one module each, one explicit registry. See :mod:`node.loaders.base`."""

from __future__ import annotations

from node.loaders.base import Batch, Loader, LoaderConfig, LoaderUnavailable, ShardSlice
from node.loaders.cupy_loader import CupyLoader
from node.loaders.dali import DaliGdsLoader, DaliLoader
from node.loaders.file import FileLoader
from node.loaders.hdf5 import Hdf5Loader
from node.loaders.kvikio_loader import KvikioLoader
from node.loaders.numpy_mmap import NumpyMmapLoader
from node.loaders.nvjpeg import NvjpegLoader
from node.loaders.zarr_loader import ZarrLoader

LOADERS: dict[str, type[Loader]] = {
    cls.name: cls
    for cls in (FileLoader, NumpyMmapLoader, Hdf5Loader, ZarrLoader,
                CupyLoader, KvikioLoader, DaliLoader, DaliGdsLoader, NvjpegLoader)
}


class UnknownLoader(ValueError):
    """A loader name the registry does not know."""


def get_loader(name: str) -> type[Loader]:
    """The loader class registered as ``name``.

    Raises:
        UnknownLoader: with the valid names.
    """
    try:
        return LOADERS[name]
    except KeyError:
        raise UnknownLoader(
            f"unknown loader {name!r}; valid loaders: {', '.join(LOADERS)}") from None


__all__ = ["LOADERS", "Batch", "Loader", "LoaderConfig", "LoaderUnavailable", "ShardSlice",
           "UnknownLoader", "get_loader"]
