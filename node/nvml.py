"""Which NVML devices are the CUDA devices this process uses.

CUDA numbers devices fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and NVML
numbers them in PCI order, so an index means different GPUs to each. A device is
matched by what both report the same way: its UUID (``GPU-...``, or ``MIG-...`` for a
MIG instance, which NVML resolves to the instance's own handle) and, failing that, its
PCI bus id. ``CUDA_VISIBLE_DEVICES`` needs no parsing here: torch's devices already
are the visible ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CudaIdentity:
    """What CUDA says about one device: UUID (no prefix, as torch prints it) and PCI ids."""

    uuid: str | None
    pci_domain: int | None = None
    pci_bus: int | None = None
    pci_device: int | None = None


@dataclass(frozen=True)
class NvmlDevice:
    """One NVML device: ``uuid`` as NVML prints it, ``bus_id`` as ``nvmlPciInfo_t.busId``."""

    uuid: str
    bus_id: str | None = None


def normal_uuid(uuid: str) -> str:
    """A UUID without its ``GPU-``/``MIG-`` prefix, lower case, for comparing."""
    text = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def normal_bus_id(bus_id: str) -> str:
    """``domain:bus:device.function`` with a 4-digit domain (NVML prints 8 digits)."""
    domain, _, rest = bus_id.strip().lower().partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else bus_id.lower()


def cuda_bus_id(cuda: CudaIdentity) -> str | None:
    if cuda.pci_bus is None or cuda.pci_device is None:
        return None
    return f"{cuda.pci_domain or 0:04x}:{cuda.pci_bus:02x}:{cuda.pci_device:02x}.0"


def match(cuda: Sequence[CudaIdentity], nvml: Sequence[NvmlDevice]) -> list[NvmlDevice | None]:
    """For each CUDA device the NVML device that is the same GPU (or MIG instance), or None.

    By UUID first; by PCI bus id only where CUDA gave no UUID (several MIG instances
    share one bus id, so a bus id cannot tell them apart).
    """
    by_uuid = {normal_uuid(d.uuid): d for d in nvml}
    by_bus = {normal_bus_id(d.bus_id): d for d in nvml if d.bus_id}
    out: list[NvmlDevice | None] = []
    for c in cuda:
        if c.uuid:
            out.append(by_uuid.get(normal_uuid(c.uuid)))
            continue
        bus = cuda_bus_id(c)
        out.append(by_bus.get(bus) if bus else None)
    return out


def torch_identities() -> list[CudaIdentity]:
    """The CUDA devices torch sees (the visible ones), or [] without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        uuid = getattr(p, "uuid", None)
        out.append(CudaIdentity(str(uuid) if uuid is not None else None,
                                getattr(p, "pci_domain_id", None), getattr(p, "pci_bus_id", None),
                                getattr(p, "pci_device_id", None)))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_devices(nvml: Any) -> list[NvmlDevice]:
    """Every NVML device and MIG instance, by UUID and bus id."""
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        bus = _text(nvml.nvmlDeviceGetPciInfo(h).busId)
        out.append(NvmlDevice(_text(nvml.nvmlDeviceGetUUID(h)), bus))
        try:
            count = nvml.nvmlDeviceGetMaxMigDeviceCount(h)
        except Exception:  # noqa: BLE001 - not MIG-capable
            count = 0
        for k in range(count):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, k)
            except Exception:  # noqa: BLE001 - an empty slot
                continue
            out.append(NvmlDevice(_text(nvml.nvmlDeviceGetUUID(mig)), bus))
    return out


def cuda_handles(nvml: Any) -> list[Any] | None:
    """NVML handles of torch's CUDA devices, in CUDA order; None when CUDA is not in use.

    Devices that cannot be matched are left out (their figures would be someone else's).
    """
    cuda = torch_identities()
    if not cuda:
        return None
    found = match(cuda, nvml_devices(nvml))
    return [nvml.nvmlDeviceGetHandleByUUID(d.uuid) for d in found if d is not None]


# --------------------------------------------------------------------------- driver


def nvml_open() -> Any | None:
    """The initialised ``pynvml`` module, or None without a usable NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - any NVML failure means "no GPU figures"
        return None


def _nvml_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_handles(nvml: Any) -> list[Any]:
    """NVML handles of the GPUs this process may use (``CUDA_VISIBLE_DEVICES``)."""
    handles = cuda_handles(nvml)  # by UUID / bus id: CUDA's order is not NVML's
    if handles is not None:
        return handles
    count = nvml.nvmlDeviceGetCount()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return handles
    chosen = []
    for item in (v.strip() for v in visible.split(",") if v.strip()):
        if item.lstrip("-").isdigit():
            index = int(item)
            if index < 0:  # CUDA stops at the first invalid entry
                break
            if index < count:
                chosen.append(handles[index])
            continue
        for h in handles:  # a UUID or its unique prefix
            try:
                if _nvml_str(nvml.nvmlDeviceGetUUID(h)).startswith(item):
                    chosen.append(h)
                    break
            except Exception:  # noqa: BLE001
                continue
    return chosen


def gpu_name(index: int = 0) -> str | None:
    """The model name of the ``index``-th visible GPU, or None without one."""
    nvml = nvml_open()
    if nvml is not None:
        try:
            handles = visible_handles(nvml)
            if index < len(handles):
                return _nvml_str(nvml.nvmlDeviceGetName(handles[index]))
        except Exception:  # noqa: BLE001
            pass
        finally:
            nvml_close(nvml)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and index < torch.cuda.device_count():
        return str(torch.cuda.get_device_name(index))
    return None


def nvml_close(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


def nvml_hardware() -> dict[str, Any]:
    """The GPU part of :func:`node.machine.hardware_info`; empty without NVML."""
    info: dict[str, Any] = {}
    nvml = nvml_open()
    if nvml is None:
        return info
    try:
        info["gpu_driver"] = _nvml_str(nvml.nvmlSystemGetDriverVersion())
        v = nvml.nvmlSystemGetCudaDriverVersion_v2()
        info["cuda_driver_version"] = f"{v // 1000}.{v % 1000 // 10}"
        info["gpus"] = [{"name": _nvml_str(nvml.nvmlDeviceGetName(h)),
                         "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).total)}
                        for h in visible_handles(nvml)]
    except Exception:  # noqa: BLE001 - partial GPU info beats none
        pass
    finally:
        nvml_close(nvml)
    return info
