"""The loader registry: :data:`LOADER_SPECS`, one :class:`LoaderSpec` per loader,
registered by its own name, described without importing it (see :mod:`node.loaders`)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.registry import Registry

if TYPE_CHECKING:
    from node.loaders.base import Loader
    from shared.formats import Format

NO_GPU = "needs an NVIDIA GPU; no NVIDIA driver answers here (NVML)"


@dataclass(frozen=True)
class Reads:
    """Which formats a loader reads: formats of these kinds, of these codec families
    (None: every family of those kinds). The one declaration; ``supports`` and the
    formats column of the loader table both come from it.

    Attributes:
        kinds: :class:`~shared.formats.FormatKind` values (``files``, ``array``).
        families: format families (``jpeg``, ``npy``...), or None for all.
    """

    kinds: tuple[str, ...] = ("files", "array")
    families: tuple[str, ...] | None = None

    def accepts(self, fmt: Format) -> bool:
        return fmt.kind.value in self.kinds and (
            self.families is None or fmt.family in self.families)

    def help(self) -> str:
        """The registered formats it admits, e.g. ``jpeg-*, png`` (imports the formats)."""
        from shared.formats.registry import formats_help

        return formats_help(self.accepts)


@dataclass(frozen=True)
class LoaderSpec:
    """One registered loader, described without importing it.

    Attributes:
        name: the ``--loader`` value.
        target: ``module:Class`` of the implementation.
        device_kind: ``cpu`` or ``cuda``.
        reads: the formats it reads.
        summary: one line: the data path.
        requires: import names of the optional packages it needs (beyond torch).
        streams: it can read straight from the store URL (``--no-cache``).
    """

    name: str
    target: str
    device_kind: str
    reads: Reads
    summary: str
    requires: tuple[str, ...] = ()
    streams: bool = False

    @property
    def formats_help(self) -> str:
        """The formats it reads, for the loader table (``jpeg-*, png, ...``)."""
        return self.reads.help()

    def supports(self, fmt: Format) -> bool:
        """Whether the loader reads ``fmt``."""
        return self.reads.accepts(fmt)

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


class UnknownLoader(ValueError):
    """A loader name the registry does not know."""


LOADER_SPECS: Registry[LoaderSpec] = Registry("loader", error=UnknownLoader)
_IMAGE_FAMILIES = ("jpeg", "png", "bmp", "tiff", "jp2", "webp")  # what DALI's decoder reads
LOADER_SPECS.register(LoaderSpec(
    "file", "node.loaders.file:FileLoader", "cpu", Reads(kinds=("files",)),
    "decode in DataLoader workers (torchvision.io for JPEG/PNG/WebP, "
    "Pillow for the rest), batched fetches, pinned memory"))
LOADER_SPECS.register(LoaderSpec(
    "numpy_mmap", "node.loaders.numpy_mmap:NumpyMmapLoader", "cpu", Reads(families=("npy",)),
    "memory-mapped array, whole-batch gathers with sorted indices"))
LOADER_SPECS.register(LoaderSpec(
    "hdf5", "node.loaders.hdf5:Hdf5Loader", "cpu", Reads(families=("hdf5",)),
    "h5py, file opened per worker, batched reads", ("h5py",)))
LOADER_SPECS.register(LoaderSpec(
    "zarr", "node.loaders.zarr_loader:ZarrLoader", "cpu", Reads(families=("zarr",)),
    "zarr reads, from the cache or straight from the store URL", ("zarr",), streams=True))
LOADER_SPECS.register(LoaderSpec(
    "cupy", "node.loaders.cupy_loader:CupyLoader", "cuda", Reads(families=("npy",)),
    "whole shards into GPU memory with CuPy (pinned chunked copies, "
    "or kvikio where GDS works), to PyTorch by DLPack, GPU gathers", ("cupy",)))
LOADER_SPECS.register(LoaderSpec(
    "kvikio", "node.loaders.kvikio_loader:KvikioLoader", "cuda",
    Reads(families=("npy", "npy-files")),
    "kvikio CuFile reads into GPU memory (GPUDirect Storage or its "
    "compat mode), coalesced 4 KiB-aligned reads, batches on the GPU", ("cupy", "kvikio")))
LOADER_SPECS.register(LoaderSpec(
    "dali", "node.loaders.dali:DaliLoader", "cuda", Reads(("files",), _IMAGE_FAMILIES),
    'DALI file reader and decoders.image(device="mixed") (nvJPEG), '
    "files read on DALI's CPU threads", ("nvidia.dali",)))
LOADER_SPECS.register(LoaderSpec(
    "dali_gds", "node.loaders.dali:DaliGdsLoader", "cuda", Reads(families=("npy-files",)),
    'DALI readers.numpy(device="gpu"): cuFile reads of npy-files '
    "into GPU memory (GPUDirect Storage from local NVMe)", ("nvidia.dali",)))
LOADER_SPECS.register(LoaderSpec(
    "dali_packed", "node.loaders.dali_packed:DaliPackedLoader", "cuda", Reads(kinds=("packed",)),
    'DALI readers.webdataset over the packed tars (index files from the shard index), '
    'decoders.image(device="mixed")', ("nvidia.dali",)))
LOADER_SPECS.register(LoaderSpec(
    "nvjpeg", "node.loaders.nvjpeg:NvjpegLoader", "cuda", Reads(("files",), ("jpeg",)),
    "file bytes read by DataLoader workers, batch-decoded on the GPU "
    "by torchvision.io.decode_jpeg (nvJPEG)"))
LOADER_SPECS.register(LoaderSpec(
    "packed", "node.loaders.packed:PackedLoader", "cpu", Reads(kinds=("packed",)),
    "members copied out of memory-mapped tars (cache) or block GETs (streaming), batch "
    "decode in threads (JPEG through libturbojpeg in a compiled loop, streaming, large "
    "images) or DataLoader workers", streams=True))
LOADER_SPECS.register(LoaderSpec(
    "webdataset", "node.loaders.webdataset_loader:WebDatasetLoader", "cpu",
    Reads(kinds=("packed",)),
    "the WebDataset library's own pipeline in DataLoader workers (peers extra)",
    ("webdataset",)))


class _LazyLoaders(Mapping[str, "type[Loader]"]):
    """``LOADERS[name]`` is the class; iterating names imports nothing."""

    def __getitem__(self, name: str) -> type[Loader]:
        return LOADER_SPECS[name].load()

    def __contains__(self, name: object) -> bool:
        return name in LOADER_SPECS

    def __iter__(self) -> Iterator[str]:
        return iter(LOADER_SPECS)

    def __len__(self) -> int:
        return len(LOADER_SPECS)


LOADERS: Mapping[str, type[Loader]] = _LazyLoaders()


def get_spec(name: str) -> LoaderSpec:
    """The registry entry of loader ``name`` (imports nothing).

    Raises:
        UnknownLoader: with the valid names.
    """
    return LOADER_SPECS.get(name)


def get_loader(name: str) -> type[Loader]:
    """The loader class registered as ``name``.

    Raises:
        UnknownLoader: with the valid names.
    """
    return get_spec(name).load()
