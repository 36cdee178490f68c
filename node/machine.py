"""The machine a run measures: page cache, CPU budget, hardware, package versions.

:func:`evict_page_cache` is what ``--cold`` does before each epoch (DESIGN section 8);
:func:`cpu_budget` the cores a run may use; :func:`hardware_info` and
:func:`hardware_id` the ``runs.hardware`` JSON and the short hash the report groups by.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

# --------------------------------------------------------------------------- page cache


def _files(paths: Iterable[Path | str]) -> Iterator[str]:
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            for dirpath, _, names in os.walk(path):
                for name in names:
                    yield os.path.join(dirpath, name)
        else:
            yield path


@dataclass
class Eviction:
    """What :func:`evict_page_cache` did.

    Attributes:
        files: files flushed and advised.
        bytes: their total size.
        failed: files that could not be advised (or no ``posix_fadvise`` here: all).
        mapped: files this process still maps: their pages stay resident.
    """

    files: int = 0
    bytes: int = 0
    failed: int = 0
    mapped: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every file was advised and none is still mapped."""
        return self.failed == 0 and not self.mapped


def mapped_files(pid: int | str = "self") -> set[str]:
    """Paths of the files a process maps (``/proc/<pid>/maps``); empty where unreadable."""
    out: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.add(parts[5].rstrip("\n"))
    except OSError:
        pass
    return out


def evict_page_cache(paths: Iterable[Path | str]) -> Eviction:
    """Drop the page cache of files (folders: every file below) so reads hit the disk.

    Each file is flushed first (``fdatasync``: ``DONTNEED`` drops clean pages only, and
    the cache writes without syncing), then ``posix_fadvise(POSIX_FADV_DONTNEED)``,
    which needs no root. Pages a process still maps stay resident: close maps first
    (:meth:`node.loaders.base.Loader.release`); files this process maps are listed in
    :attr:`Eviction.mapped`. Files that cannot be opened are skipped.
    """
    report = Eviction()
    if not hasattr(os, "posix_fadvise"):
        report.failed = sum(1 for _ in _files(paths))
        return report
    names = list(_files(paths))
    mapped = mapped_files()
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            report.files += 1
            report.bytes += os.fstat(fd).st_size
        except OSError:
            report.failed += 1
        finally:
            os.close(fd)
        if os.path.realpath(name) in mapped:
            report.mapped.append(name)
    return report


def page_cache_fits(total_bytes: int) -> bool:
    """Whether ``total_bytes`` of data fit in the memory available now.

    Compares with ``psutil.virtual_memory().available`` (free plus reclaimable cache),
    the memory the page cache could hold the data in without swapping.
    """
    return total_bytes <= psutil.virtual_memory().available


# --------------------------------------------------------------------------- CPU budget


def _cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller -> cgroup path from ``/proc/self/cgroup`` text (``""`` = v2)."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2]
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota_cores(quota: str | None, period: str | None) -> float | None:
    if quota is None or period is None or quota in ("max", "-1"):
        return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _walk_up(mount: Path, rel: str) -> Iterator[Path]:
    """The cgroup's folder and its parents up to the mount (a container sees ``/``)."""
    here = mount / rel.strip("/")
    while True:
        yield here
        if here == mount or mount not in here.parents:
            return
        here = here.parent


def cgroup_cpu_limit(root: Path | str = "/sys/fs/cgroup",
                     proc_cgroup: str | None = None) -> float | None:
    """Cores the cgroup's CPU quota allows (v2 ``cpu.max``, v1 CFS quota); None: none.

    The tightest limit on the way from this process's cgroup up to the root counts.
    """
    root = Path(root)
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    paths = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    if "" in paths:
        for folder in _walk_up(root, paths[""]):
            text = _read(folder / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                limits.append(_quota_cores(quota, period or "100000") or math.inf)
    if "cpu" in paths:
        for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
            for folder in _walk_up(mount, paths["cpu"]):
                cores = _quota_cores(_read(folder / "cpu.cfs_quota_us"),
                                     _read(folder / "cpu.cfs_period_us"))
                limits.append(cores or math.inf)
    finite = [x for x in limits if x != math.inf]
    return min(finite) if finite else None


def cpu_budget() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

    A quota of 1.5 cores counts as 2 (the run can keep two cores partly busy).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mount_of(path: Path) -> dict[str, Any]:
    """File system type, source device and mount point holding ``path``."""
    path = path.expanduser()
    while not path.exists() and path != path.parent:  # cache dir may not exist yet
        path = path.parent
    resolved = path.resolve()
    info: dict[str, Any] = {"path": str(resolved), "fstype": None, "device": None,
                            "mount_point": None, "st_dev": None}
    try:
        st = os.stat(resolved)
        info["st_dev"] = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    except OSError:
        pass
    best = ""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                # /proc/mounts escapes spaces etc. as octal (\040).
                point = parts[1].encode().decode("unicode_escape")
                inside = str(resolved) == point or str(resolved).startswith(
                    point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best = point
                    info.update(fstype=parts[2], device=parts[0], mount_point=point)
    except OSError:
        pass
    return info


def hardware_info(cache_dir: Path | str) -> dict[str, Any]:
    """The machine as the ``runs.hardware`` JSON records it.

    Keys: ``cpu_model``, ``cpu_logical_cores``, ``cpu_physical_cores``,
    ``ram_total_bytes``, ``gpus`` (list of ``{"name", "memory_total_bytes"}``),
    ``gpu_driver``, ``cuda_driver_version`` (NVML), ``cuda_runtime_version``
    (``torch.version.cuda``), ``cache_fs`` (``path``, ``fstype``, ``device``,
    ``mount_point``, ``st_dev``), ``machine``, ``kernel``.
    """
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": psutil.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "ram_total_bytes": psutil.virtual_memory().total,
        "gpus": [],
        "gpu_driver": None,
        "cuda_driver_version": None,
        "cuda_runtime_version": None,
        "cache_fs": _mount_of(Path(cache_dir)),
        "machine": platform.machine(),
        "kernel": platform.release(),
    }
    from node.nvml import nvml_hardware  # imported late: only where hardware is asked for

    info.update(nvml_hardware())
    try:
        import torch.version

        info["cuda_runtime_version"] = torch.version.cuda
    except ImportError:
        pass
    return info


# Fields that describe the hardware; paths, kernel and driver versions change without it.
_HARDWARE_ID_KEYS = ("cpu_model", "cpu_logical_cores", "cpu_physical_cores",
                     "ram_total_bytes", "gpus", "machine")


def hardware_id(info: dict[str, Any]) -> str:
    """A short stable hash of the hardware in a :func:`hardware_info` dict.

    Covers CPU model and cores, RAM, GPU models and memory, architecture, and the cache
    file system's type and device; leaves out paths, mount points, the kernel and
    driver versions, so two runs on one machine (or two identical machines) share it.
    """
    fs = info.get("cache_fs") or {}
    key = {k: info.get(k) for k in _HARDWARE_ID_KEYS}
    key["cache_fs"] = {"fstype": fs.get("fstype"), "device": fs.get("device")}
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


_VERSIONED = ("formatlab", "torch", "torchvision", "numpy", "pillow", "h5py", "zarr",
              "pyarrow", "ray")
# Optional GPU packages: distribution names differ by CUDA major version.
_OPTIONAL = {"cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
             "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120"),
             "kvikio": ("kvikio-cu13", "kvikio-cu12", "kvikio")}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions_info() -> dict[str, str | None]:
    """Python's and the relevant packages' versions, from metadata (nothing imported).

    Core packages map to None when missing; optional GPU packages appear only when
    installed.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    out.update({name: _version(name) for name in _VERSIONED})
    for name, dists in _OPTIONAL.items():
        for dist in dists:
            v = _version(dist)
            if v is not None:
                out[name] = v
                break
    return out
