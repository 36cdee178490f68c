"""The one place that checks for a GPU, the optional GPU packages, and GDS.

Every GPU loader asks here whether it can run and, if not, gets one line saying why
(no CUDA, a package missing or built for another CUDA major version than torch, too
little free VRAM). Here too is the honest I/O label of DESIGN section 5: ``gds`` only
with evidence that GPUDirect Storage moved the bytes, ``compat`` for cuFile paths that
fell back (or may have fallen back) to POSIX reads, ``host`` for host-memory paths.

Optional packages (CuPy, kvikio, DALI) are imported only inside the functions that
need them, so importing this module costs nothing on a machine without them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.loaders.base import ShardSlice
from shared.storage import check_relative

GIB = 1 << 30
MIB = 1 << 20
NVFS_STATS = Path("/proc/driver/nvidia-fs/stats")

IO_GDS = "gds"
IO_COMPAT = "compat"
IO_HOST = "host"

# Pip names per CUDA major: {major} is torch's CUDA major version.
PIP_NAMES = {
    "cupy": "cupy-cuda{major}x",
    "kvikio": "kvikio-cu{major}",
    "nvidia.dali": "nvidia-dali-cuda{major}0",
}
# Installed distributions that say which CUDA major they were built for.
_DIST_CUDA = {
    "kvikio": re.compile(r"^kvikio-cu(\d+)$"),
    "nvidia.dali": re.compile(r"^nvidia-dali-cuda(\d+)0$"),
    "cupy": re.compile(r"^cupy-cuda(\d+)x$"),
}


# --------------------------------------------------------------------------- CUDA, packages

def torch_cuda_major() -> int | None:
    """The CUDA major version torch was built with (``torch.version.cuda``), or None."""
    version = torch.version.cuda
    if not version:
        return None
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def pip_name(module: str) -> str:
    """The pip package that provides ``module`` for torch's CUDA major version.

    Example: ``pip_name("kvikio")`` is ``kvikio-cu13`` next to a CUDA 13 torch.
    """
    template = PIP_NAMES.get(module)
    if template is None:
        return module
    major = torch_cuda_major()
    if major is None:  # a CPU-only torch: name both builds
        return " or ".join(template.format(major=m) for m in (12, 13))
    return template.format(major=major)


def cuda_reason() -> str | None:
    """None when torch sees a CUDA device, else the reason in words."""
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU; torch.cuda.is_available() is False"
    return None


@functools.cache
def package_reason(module: str, pip: str | None = None) -> str | None:
    """None when ``module`` imports, else why not.

    Args:
        module: the import name (``cupy``, ``kvikio``, ``nvidia.dali``).
        pip: the pip name to mention; by default chosen for torch's CUDA major.
    """
    pip = pip or pip_name(module)
    try:
        if importlib.util.find_spec(module) is None:
            return f"package {pip} not installed"
    except (ImportError, ValueError):  # a parent package (``nvidia``) is missing
        return f"package {pip} not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install (missing .so) is one line too
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"package {pip} is installed but does not import: {first}"
    return None


def installed_cuda_major(module: str) -> int | None:
    """The CUDA major version that the installed wheel of ``module`` names, or None.

    Read from the distribution name (``kvikio-cu12``, ``nvidia-dali-cuda130``,
    ``cupy-cuda12x``), since these packages ship one wheel per CUDA major.
    """
    pattern = _DIST_CUDA.get(module)
    if pattern is None:
        return None
    for name in _distribution_names():
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


@functools.lru_cache(maxsize=1)
def _distribution_names() -> tuple[str, ...]:
    names = []
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name") if dist.metadata else None
        if name:
            names.append(re.sub(r"[-_.]+", "-", name).lower())
    return tuple(names)


def cuda_mismatch_reason(package: str, package_major: int | None,
                         torch_major: int | None, module: str) -> str | None:
    """Why a package built for one CUDA major cannot share a process with torch's.

    None when either version is unknown or both agree.
    """
    if package_major is None or torch_major is None or package_major == torch_major:
        return None
    return (f"{package} is built for CUDA {package_major} but torch uses CUDA {torch_major}; "
            f"install {PIP_NAMES.get(module, module).format(major=torch_major)}")


def cupy_cuda_major() -> int | None:
    """The CUDA runtime major version CuPy loaded (``runtimeGetVersion() // 1000``)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:  # noqa: BLE001 - unknown is fine; the wheel name is the fallback
        return installed_cuda_major("cupy")


def dali_cuda_major() -> int | None:
    """The CUDA major version DALI was built for (wheel name, else ``__cuda_version__``)."""
    major = installed_cuda_major("nvidia.dali")
    if major is not None:
        return major
    try:
        import nvidia.dali

        return parse_dali_cuda_version(getattr(nvidia.dali, "__cuda_version__", None))
    except Exception:  # noqa: BLE001
        return None


def parse_dali_cuda_version(value: Any) -> int | None:
    """DALI's ``__cuda_version__`` is the toolkit version without dots (``130``, ``1180``)."""
    if value is None:
        return None
    digits = re.sub(r"\D", "", str(value))
    if not digits:
        return None
    # CUDA majors 10 and up start with "1" and take two digits; older ones one.
    return int(digits[:2]) if digits.startswith("1") and len(digits) >= 3 else int(digits[0])


def requirements_reason(loader: str, modules: tuple[str, ...]) -> str | None:
    """The first reason ``loader`` cannot run here, prefixed with its name, or None.

    Checks, in order: a CUDA device, each module importable, each module built for
    torch's CUDA major version.
    """
    reason = cuda_reason()
    if reason:
        return f"{loader}: {reason}"
    for module in modules:
        reason = package_reason(module)
        if reason:
            return f"{loader}: {reason}"
    torch_major = torch_cuda_major()
    for module in modules:
        if module == "cupy":
            major, label = cupy_cuda_major(), "CuPy"
        elif module == "nvidia.dali":
            major, label = dali_cuda_major(), "DALI"
        else:
            major, label = installed_cuda_major(module), module
        reason = cuda_mismatch_reason(label, major, torch_major, module)
        if reason:
            return f"{loader}: {reason}"
    return None


def torchvision_nvjpeg_reason() -> str | None:
    """None when torchvision can decode JPEG on the GPU (it was built with nvJPEG)."""
    try:
        import torchvision.io  # noqa: F401 - registers torch.ops.image
    except Exception as exc:  # noqa: BLE001
        return f"torchvision does not import: {(str(exc).splitlines() or [''])[0]}"
    try:
        torch.ops.image.decode_jpegs_cuda  # noqa: B018 - raises when the op is missing
    except (AttributeError, RuntimeError):
        return "torchvision was built without nvJPEG (no torch.ops.image.decode_jpegs_cuda)"
    return None

# --------------------------------------------------------------------------- VRAM

def format_gib(nbytes: float) -> str:
    """Bytes as GiB with one decimal (``12.3``)."""
    return f"{nbytes / GIB:.1f}"


def free_vram(device: torch.device | None = None) -> tuple[int, int]:
    """(free, total) bytes of the CUDA device, as the driver reports them."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def vram_reason(loader: str, need_bytes: int, free_bytes: int, what: str = "") -> str | None:
    """``"<loader>: needs X GiB, Y GiB free"`` when ``need_bytes`` exceeds ``free_bytes``."""
    if need_bytes <= free_bytes:
        return None
    detail = f" ({what})" if what else ""
    return (f"{loader}: needs {format_gib(need_bytes)} GiB, {format_gib(free_bytes)} GiB free"
            f"{detail}")


# --------------------------------------------------------------------------- nvidia-fs counters

@dataclass(frozen=True)
class NvfsReads:
    """The nvidia-fs driver's read counters (system-wide, since the driver loaded).

    Attributes:
        ops: read operations (``n=``).
        mib: MiB read (``readMiB=``), rounded down by the driver.
    """

    ops: int
    mib: int

    @property
    def bytes(self) -> int:
        return self.mib * MIB


_NVFS_READS = re.compile(r"^\s*Reads\s*:\s*n=(\d+)\b.*?\breadMiB=(\d+)", re.MULTILINE)


def parse_nvfs_reads(text: str) -> NvfsReads | None:
    """The ``Reads : n=... readMiB=...`` counters of ``/proc/driver/nvidia-fs/stats``.

    None when the line is missing, as it is while the driver's IO statistics are off
    (``rw_stats_enabled=0``: only ``Reads : err=... io_state_err=...`` is printed).
    """
    match = _NVFS_READS.search(text)
    if not match:
        return None
    return NvfsReads(ops=int(match.group(1)), mib=int(match.group(2)))


def nvfs_read_counters(path: Path = NVFS_STATS) -> NvfsReads | None:
    """The nvidia-fs read counters now, or None where they cannot be read."""
    try:
        return parse_nvfs_reads(path.read_text(errors="replace"))
    except OSError:
        return None


def nvfs_read_bytes(path: Path = NVFS_STATS) -> int | None:
    """Bytes nvidia-fs has read so far (MiB granularity), or None where unreadable.

    Read it before and after an epoch: GDS moved bytes only if it grew.
    """
    counters = nvfs_read_counters(path)
    return None if counters is None else counters.bytes


# --------------------------------------------------------------------------- GDS status

@dataclass(frozen=True)
class GdsFacts:
    """What kvikio/cuFile say about GPUDirect Storage on this machine.

    Attributes:
        kvikio_version: None when kvikio is not importable.
        compat_mode: True when kvikio reads through POSIX and a host bounce buffer;
            None when it could not be read.
        gds_available: cuFile's ``is_gds_available`` (nvidia-fs or P2P DMA present);
            None when it could not be read.
        gds_threshold: kvikio's smallest read it sends through cuFile, in bytes.
    """

    kvikio_version: str | None
    compat_mode: bool | None
    gds_available: bool | None
    gds_threshold: int | None = None


def probe_gds() -> GdsFacts:
    """Ask kvikio (and through it cuFile) about GDS; never raises."""
    try:
        import kvikio
    except Exception:  # noqa: BLE001 - not installed or broken: no evidence of GDS
        return GdsFacts(None, None, None)
    return GdsFacts(str(getattr(kvikio, "__version__", "?")), _kvikio_compat_mode(),
                    _cufile_gds_available(kvikio), kvikio_setting("gds_threshold"))


def _kvikio_compat_mode() -> bool | None:
    try:
        import kvikio.defaults as defaults  # a submodule: not an attribute until imported
    except Exception:  # noqa: BLE001
        return None
    # kvikio >= 24.12 resolves AUTO (try cuFile, else POSIX) into what it will really do.
    preferred = getattr(defaults, "is_compat_mode_preferred", None)
    if preferred is not None:
        try:
            return bool(preferred())
        except Exception:  # noqa: BLE001
            pass
    value: Any = None
    try:
        if hasattr(defaults, "get"):  # kvikio >= 25.04
            value = defaults.get("compat_mode")
        else:  # older: compat_mode() returns a bool or a CompatMode
            value = defaults.compat_mode()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(value, bool):  # the oldest releases answer True/False
        return value
    # kvikio.CompatMode is an IntEnum: OFF = 0, ON = 1, AUTO = 2 (unresolved: which path
    # reads take is not known, so no claim either way).
    name = getattr(value, "name", None)
    if name in ("OFF", "ON", "AUTO"):
        return {"OFF": False, "ON": True, "AUTO": None}[name]
    if isinstance(value, int):
        return {0: False, 1: True}.get(int(value))
    return None


def _cufile_gds_available(kvikio: Any) -> bool | None:
    # The API moved between releases: cufile_driver.get() (>= 25.02), then the
    # DriverProperties class in cufile_driver, then at the top level (older).
    attempts = []
    try:
        import kvikio.cufile_driver as driver

        attempts.append(lambda: driver.get("is_gds_available"))
        attempts.append(lambda: driver.DriverProperties().is_gds_available)
    except Exception:  # noqa: BLE001
        pass
    if hasattr(kvikio, "DriverProperties"):
        attempts.append(lambda: kvikio.DriverProperties().is_gds_available)
    for attempt in attempts:
        try:
            return bool(attempt())
        except Exception:  # noqa: BLE001 - next spelling
            continue
    return None


def kvikio_setting(name: str) -> Any:
    """A kvikio default (``num_threads``, ``gds_threshold``...), or None if unreadable."""
    try:
        import kvikio.defaults as defaults
    except Exception:  # noqa: BLE001
        return None
    try:
        if hasattr(defaults, "get"):
            return defaults.get(name)
        legacy = {"num_threads": "get_num_threads"}.get(name, name)
        return getattr(defaults, legacy)()
    except Exception:  # noqa: BLE001
        return None


def set_kvikio_threads(threads: int) -> None:
    """Size kvikio's I/O thread pool (its default is one thread, which serialises reads)."""
    import kvikio.defaults as defaults

    if hasattr(defaults, "set"):
        defaults.set("num_threads", int(threads))
    else:
        defaults.num_threads_reset(int(threads))


def decide_io_path(facts: GdsFacts, before: NvfsReads | None = None,
                   after: NvfsReads | None = None, *,
                   cufile_bytes: int | None = None) -> tuple[str, str]:
    """``("gds" | "compat", why)`` for reads that went through cuFile.

    ``gds`` needs all of: kvikio importable, kvikio not in compat mode, cuFile
    reporting GDS available, some bytes read through cuFile, and, where the nvidia-fs
    counters were readable before and after, those counters moved. Anything else is
    ``compat``: a run is never labelled GDS without evidence.

    Args:
        facts: from :func:`probe_gds`.
        before, after: nvidia-fs counters around the reads (None if unreadable).
        cufile_bytes: bytes the loader sent in reads large enough for cuFile
            (kvikio serves reads below its ``gds_threshold`` with POSIX); None if the
            loader cannot tell (DALI).
    """
    if facts.kvikio_version is None:
        return IO_COMPAT, "kvikio is not installed, so GDS cannot be confirmed"
    if facts.compat_mode is None:
        return IO_COMPAT, "kvikio's compat mode could not be resolved"
    if facts.compat_mode:
        return IO_COMPAT, "kvikio runs in compat mode (POSIX reads through a host bounce buffer)"
    if facts.gds_available is not True:
        return IO_COMPAT, "cuFile reports GDS unavailable (no nvidia-fs driver or P2P DMA)"
    if cufile_bytes is not None and cufile_bytes <= 0:
        return IO_COMPAT, (f"every read was below kvikio's gds_threshold "
                           f"({facts.gds_threshold} bytes), which kvikio serves with POSIX")
    if before is not None and after is not None:
        ops, mib = after.ops - before.ops, after.mib - before.mib
        if ops <= 0 and mib <= 0:
            return IO_COMPAT, "nvidia-fs read counters did not move (cuFile fell back to POSIX)"
        return IO_GDS, f"nvidia-fs counted {ops} reads, {mib} MiB (system-wide)"
    return IO_GDS, ("cuFile reports GDS available and kvikio's compat mode is off; "
                    "nvidia-fs counters not readable")


def gds_status(before: NvfsReads | None = None, after: NvfsReads | None = None, *,
               cufile_bytes: int | None = None) -> tuple[str, str]:
    """:func:`decide_io_path` with this machine's kvikio/cuFile facts."""
    return decide_io_path(probe_gds(), before, after, cufile_bytes=cufile_bytes)


def cuda_device_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device`` (``cuda`` alone means torch's current device)."""
    if device.type != "cuda":
        raise ValueError(f"expected a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


# --------------------------------------------------------------------------- shared by GPU loaders

def rank_files(shards: Sequence[ShardSlice]) -> list[str]:
    """Local paths of the rank's per-sample files, in rank sequence order.

    Names come from the shards' indexes and are checked to stay inside their shard
    folder (DESIGN section 9).

    Raises:
        ValueError: a shard's index lists no file for some sample.
    """
    paths: list[str] = []
    for s in shards:
        if s.files is None or len(s.files) < s.stop:
            raise ValueError(f"{s.location}: the index lists no file for every sample")
        root = os.path.abspath(s.location)
        paths.extend(os.path.join(root, check_relative(name)) for name in s.files[s.start:s.stop])
    return paths
