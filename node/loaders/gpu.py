"""The one place that checks for a GPU and the optional GPU packages.

Every GPU loader asks here whether it can run and, if not, gets one line saying why
(no CUDA, a package missing or built for another CUDA major version than torch, no
nvJPEG in torchvision, too little free VRAM). The honest I/O label of DESIGN section 5
is decided in :mod:`node.loaders.gds`.

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
from typing import Any

import torch

from node.loaders.base import ShardSlice
from shared.storage import check_relative

GIB = 1 << 30

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


# An 8x8 grey baseline JPEG, made with Pillow: the probe nvJPEG must decode.
_TINY_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300100b0c0e0c0a100e0d0e1211101318281a1816"
    "16183123251d283a333d3c3933383740485c4e404457453738506d51575f626768673e4d71797064785c6567"
    "63ffdb0043011112121815182f1a1a2f63423842636363636363636363636363636363636363636363636363"
    "6363636363636363636363636363636363636363636363636363ffc000110800080008030122000211010311"
    "01ffc40014000100000000000000000000000000000000ffc400141001000000000000000000000000000000"
    "00ffc40014010100000000000000000000000000000000ffc400141101000000000000000000000000000000"
    "00ffda000c03010002110311003f00000fffd9")


@functools.cache
def torchvision_nvjpeg_reason() -> str | None:
    """None when torchvision decodes a JPEG on CUDA, else why not (probed once).

    torchvision always registers ``decode_jpegs_cuda``; built without nvJPEG it is a
    stub that raises on use (torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp,
    ``#if !NVJPEG_FOUND``), so only a real decode tells.
    """
    try:
        from torchvision.io import decode_jpeg
    except Exception as exc:  # noqa: BLE001
        return f"torchvision does not import: {(str(exc).splitlines() or [''])[0]}"
    data = torch.frombuffer(bytearray(_TINY_JPEG), dtype=torch.uint8)
    try:
        decode_jpeg([data], device="cuda")
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"torchvision cannot decode JPEG on the GPU: {first}"
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


def ensure_open_files(needed: int) -> bool:
    """Raise the soft open-files limit towards ``needed`` (up to the hard limit).

    Returns:
        Whether ``needed`` descriptors may now be open.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return True
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target >= needed
