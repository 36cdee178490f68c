"""Loaders: one module each, one explicit registry. See :mod:`node.loaders.base`.

The registry holds, per loader, what ``--help`` and ``node-agent loaders`` show (name,
device, formats, summary) and a quick availability check (an NVIDIA driver, the
packages found by ``importlib.util.find_spec``) that imports neither torch nor the
loader's libraries. A loader's module is imported only when the loader is used:
``LOADERS[name]`` or :func:`get_loader`. The full check (:meth:`Loader.unavailable_reason`:
CUDA through torch, packages that import, matching CUDA builds) runs then.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.loaders.base import Loader

NO_GPU = "needs an NVIDIA GPU; no NVIDIA driver answers here (NVML)"


@dataclass(frozen=True)
class LoaderSpec:
    """One registered loader, described without importing it.

    Attributes:
        name: the ``--loader`` value.
        target: ``module:Class`` of the implementation.
        device_kind: ``cpu`` or ``cuda``.
        formats_help: the formats it reads, for the loader table.
        summary: one line: the data path.
        requires: import names of the optional packages it needs (beyond torch).
    """

    name: str
    target: str
    device_kind: str
    formats_help: str
    summary: str
    requires: tuple[str, ...] = ()

    def load(self) -> type[Loader]:
        """The loader class (imports its module)."""
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)

    def quick_reason(self) -> str | None:
        """None when the loader looks runnable here, else one line saying why not.

        Imports nothing heavy: a GPU loader needs an NVIDIA driver (asked through NVML)
        and its packages present (``find_spec``).
        """
        if self.device_kind == "cuda" and not nvidia_gpu_present():
            return f"{self.name}: {NO_GPU}"
        for module in self.requires:
            if not module_present(module):
                return f"{self.name}: package {module} not installed"
        return None


def module_present(module: str) -> bool:
    """Whether ``module`` can be found on the path, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package (``nvidia``) is missing
        return False


def nvidia_gpu_present() -> bool:
    """Whether NVML reports at least one NVIDIA GPU (no torch, no CUDA runtime)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU
        return False


_FILE_FORMATS = "jpeg-*, png, bmp, tiff*, jp2-*, webp-*"
LOADER_SPECS: dict[str, LoaderSpec] = {s.name: s for s in (
    LoaderSpec("file", "node.loaders.file:FileLoader", "cpu", f"{_FILE_FORMATS}, npy-files",
               "decode in DataLoader workers (torchvision.io for JPEG/PNG/WebP, "
               "Pillow for the rest), batched fetches, pinned memory"),
    LoaderSpec("numpy_mmap", "node.loaders.numpy_mmap:NumpyMmapLoader", "cpu", "npy",
               "memory-mapped array, whole-batch gathers with sorted indices"),
    LoaderSpec("hdf5", "node.loaders.hdf5:Hdf5Loader", "cpu", "hdf5, hdf5-gzip, hdf5-lzf",
               "h5py, file opened per worker, batched reads", ("h5py",)),
    LoaderSpec("zarr", "node.loaders.zarr_loader:ZarrLoader", "cpu", "zarr, zarr-zstd",
               "zarr reads, from the cache or straight from the store URL", ("zarr",)),
    LoaderSpec("cupy", "node.loaders.cupy_loader:CupyLoader", "cuda", "npy",
               "whole shards into GPU memory with CuPy (pinned chunked copies, "
               "or kvikio where GDS works), to PyTorch by DLPack, GPU gathers", ("cupy",)),
    LoaderSpec("kvikio", "node.loaders.kvikio_loader:KvikioLoader", "cuda", "npy, npy-files",
               "kvikio CuFile reads into GPU memory (GPUDirect Storage or its "
               "compat mode), coalesced 4 KiB-aligned reads, batches on the GPU",
               ("cupy", "kvikio")),
    LoaderSpec("dali", "node.loaders.dali:DaliLoader", "cuda", _FILE_FORMATS,
               'DALI file reader and decoders.image(device="mixed") (nvJPEG), '
               "files read on DALI's CPU threads", ("nvidia.dali",)),
    LoaderSpec("dali_gds", "node.loaders.dali:DaliGdsLoader", "cuda", "npy-files",
               'DALI readers.numpy(device="gpu"): cuFile reads of npy-files '
               "into GPU memory (GPUDirect Storage from local NVMe)", ("nvidia.dali",)),
    LoaderSpec("packed", "node.loaders.packed:PackedLoader", "cpu", "wds-*",
               "positional reads of tar members (cache) or ranged GETs (streaming), "
               "batch decode in DataLoader workers (cache) or threads (streaming), "
               "libturbojpeg for JPEG where present"),
    LoaderSpec("nvjpeg", "node.loaders.nvjpeg:NvjpegLoader", "cuda", "jpeg-*",
               "file bytes read by DataLoader workers, batch-decoded on the GPU "
               "by torchvision.io.decode_jpeg (nvJPEG)"),
)}


class _LazyLoaders(Mapping[str, "type[Loader]"]):
    """``LOADERS[name]`` is the class; iterating names imports nothing."""

    def __getitem__(self, name: str) -> type[Loader]:
        return LOADER_SPECS[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(LOADER_SPECS)

    def __len__(self) -> int:
        return len(LOADER_SPECS)


LOADERS: Mapping[str, type[Loader]] = _LazyLoaders()


class UnknownLoader(ValueError):
    """A loader name the registry does not know."""


def get_spec(name: str) -> LoaderSpec:
    """The registry entry of loader ``name`` (imports nothing).

    Raises:
        UnknownLoader: with the valid names.
    """
    if name not in LOADER_SPECS:
        raise UnknownLoader(
            f"unknown loader {name!r}; valid loaders: {', '.join(LOADER_SPECS)}")
    return LOADER_SPECS[name]


def get_loader(name: str) -> type[Loader]:
    """The loader class registered as ``name``.

    Raises:
        UnknownLoader: with the valid names.
    """
    return get_spec(name).load()


_BASE_NAMES = ("Batch", "Loader", "LoaderConfig", "LoaderUnavailable", "ShardSlice")


def __getattr__(name: str) -> Any:
    # The contract's types live in base, which imports torch: only on first use.
    if name in _BASE_NAMES:
        from node.loaders import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LOADERS", "LOADER_SPECS", "Batch", "Loader", "LoaderConfig", "LoaderSpec",
           "LoaderUnavailable", "ShardSlice", "UnknownLoader", "get_loader", "get_spec"]
