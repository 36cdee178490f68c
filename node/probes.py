"""Probes of a process tree: CPU seconds, storage reads and memory (DESIGN section 8).

Each probe reads one kind of figure from a set of processes; :class:`node.telemetry.Sampler`
drives them from its thread and keeps the windows. The GPU probe reads NVML through
the driver helpers of :mod:`node.nvml`.

Children that exit: when a parent reaps a child, Linux adds the child's CPU times
(``cutime``/``cstime``) and I/O counters to the parent's, so summing the live tree
(each process's own *and* reaped-children figures) stays continuous. Adding up each
exited pid's last value as well would count its work twice. The sums are kept
monotonic (a running maximum), which absorbs the short gap between a child vanishing
from ``/proc`` and its parent's counters growing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import psutil

from node.nvml import nvml_close, nvml_open, visible_handles

ProcKey = tuple[int, float]  # (pid, create_time): survives pid reuse
Procs = dict[ProcKey, psutil.Process]


def tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and all its descendants (just ``root`` when they cannot be listed)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    # Reaped children's times live in children_user/system of their parent.
    return t.user + t.system + t.children_user + t.children_system


def _read_bytes(proc: psutil.Process) -> int | None:
    try:
        return int(proc.io_counters().read_bytes)
    except (psutil.AccessDenied, AttributeError, NotImplementedError):
        return None


def disk_read_bytes(pid: int | None = None) -> int | None:
    """Bytes the OS read from storage for a process tree, summed over live processes.

    Counts of reaped children are already inside their parent's counters (see module
    docstring). For a continuous figure across children coming and going, use
    :meth:`node.telemetry.Sampler.disk_read_bytes`.

    Args:
        pid: root of the tree; this process when None.

    Returns:
        The sum, or None where ``/proc/<pid>/io`` cannot be read (e.g. not Linux).
    """
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return None
    if _read_bytes(root) is None:
        return None
    total = 0
    for proc in tree(root):
        try:
            total += _read_bytes(proc) or 0
        except psutil.NoSuchProcess:
            continue
    return total


class CpuDiskProbe:
    """Monotonic CPU seconds and storage read bytes of the tree since the first read.

    Attributes:
        cpu_s: tree CPU seconds since the first :meth:`read`.
        disk: tree ``read_bytes`` since the first :meth:`read`.
        disk_ok: False once the root's ``/proc/<pid>/io`` proved unreadable.
    """

    def __init__(self, root: psutil.Process) -> None:
        self._root = root
        self._cpu_base: float | None = None
        self._disk_base = 0
        self.cpu_s = 0.0
        self.disk = 0
        self.disk_ok = True

    def read(self, procs: Procs, forget: Callable[[ProcKey], None]) -> None:
        """Add up the live tree; processes gone since the scan are ``forget``-ed."""
        cpu_live, disk_live = 0.0, 0
        for key, proc in list(procs.items()):
            try:
                cpu_live += _cpu_seconds(proc)
                read = _read_bytes(proc)
            except psutil.NoSuchProcess:
                forget(key)
                continue
            except psutil.AccessDenied:
                continue
            if read is None:
                if proc is self._root:
                    self.disk_ok = False
            else:
                disk_live += read
        if self._cpu_base is None:
            self._cpu_base, self._disk_base = cpu_live, disk_live
        self.cpu_s = max(self.cpu_s, cpu_live - self._cpu_base)
        self.disk = max(self.disk, disk_live - self._disk_base)


class Memory(NamedTuple):
    """One process's (or a tree's) memory: total, anonymous and file-backed bytes.

    ``anon`` counts anonymous and shared-memory pages (worker batches in ``/dev/shm``),
    ``file`` pages mapped from files (an mmap loader's dataset, libraries); None where
    the kernel does not split them.
    """

    total: int
    anon: int | None
    file: int | None


_PSS_KEYS = {"Pss:": "total", "Pss_Anon:": "anon", "Pss_Shmem:": "shmem", "Pss_File:": "file"}
_RSS_KEYS = {"VmRSS:": "total", "RssAnon:": "anon", "RssShmem:": "shmem", "RssFile:": "file"}


def _proc_fields(path: str, keys: dict[str, str]) -> dict[str, int]:
    """kB fields of a ``/proc`` status-like file, in bytes, under ``keys``' names."""
    out: dict[str, int] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if name in keys:
                out[keys[name]] = int(rest.split()[0]) * 1024
    return out


def _memory(fields: dict[str, int]) -> Memory:
    split = "anon" in fields and "file" in fields
    return Memory(fields["total"],
                  fields["anon"] + fields.get("shmem", 0) if split else None,
                  fields["file"] if split else None)


def _io_error(exc: OSError, proc: psutil.Process) -> Exception:
    """The psutil error a failed ``/proc`` read of ``proc`` means."""
    if isinstance(exc, FileNotFoundError) or not proc.is_running():
        return psutil.NoSuchProcess(proc.pid)
    return psutil.AccessDenied(proc.pid)


def pss_of(proc: psutil.Process) -> Memory:
    """Proportional set size from ``/proc/<pid>/smaps_rollup``: a page shared by k
    processes counts 1/k in each, so summed over the tree it counts once.

    Raises:
        psutil.AccessDenied: PSS cannot be read here (no smaps_rollup, not allowed).
        psutil.NoSuchProcess: the process is gone.
    """
    try:
        fields = _proc_fields(f"/proc/{proc.pid}/smaps_rollup", _PSS_KEYS)
    except OSError as exc:
        raise _io_error(exc, proc) from None
    if "total" not in fields:
        raise psutil.AccessDenied(proc.pid)
    return _memory(fields)


def rss_of(proc: psutil.Process) -> Memory:
    """Resident set size (shared pages counted in every process that maps them)."""
    try:
        fields = _proc_fields(f"/proc/{proc.pid}/status", _RSS_KEYS)
        if "total" in fields:
            return _memory(fields)
    except OSError:
        pass
    return Memory(int(proc.memory_info().rss), None, None)


class MemoryProbe:
    """The tree's memory, PSS where readable, else RSS for every process.

    Reading PSS walks the page tables (about 10 ms for a 1 GB PyTorch process), so the
    sampler reads memory as often as ``budget_pct`` of one core allows, between every
    tick and every ``max_interval_s``.

    Attributes:
        kind: ``"pss"`` or ``"rss"`` (PSS proved unreadable; from then on RSS for all).
        last: the latest tree figure, None before the first read.
        reads: how many reads so far.
    """

    def __init__(self, interval_s: float, budget_pct: float, max_interval_s: float) -> None:
        self._min_interval_s = interval_s
        self._budget_pct = budget_pct
        self._max_interval_s = max(max_interval_s, interval_s)
        self.kind = "pss"
        self.last: Memory | None = None
        self.reads = 0
        self.next_due = 0.0
        self._cost_s: float | None = None

    @property
    def interval_s(self) -> float:
        """The current time between reads (adapts to their cost)."""
        if self._cost_s is None:
            return self._min_interval_s
        return min(self._max_interval_s,
                   max(self._min_interval_s, self._cost_s * 100.0 / self._budget_pct))

    def _of(self, proc: psutil.Process) -> Memory:
        if self.kind == "pss":
            try:
                return pss_of(proc)
            except psutil.AccessDenied:
                self.kind = "rss"  # for every process from now on, so figures compare
        return rss_of(proc)

    def read(self, procs: Procs, forget: Callable[[ProcKey], None]) -> Memory:
        """Sum the tree's memory now."""
        t0 = time.thread_time()
        for _ in range(2):  # a second pass only if PSS turned out unreadable mid-pass
            kind, total, anon, file = self.kind, 0, 0, 0
            split = True
            for key, proc in list(procs.items()):
                try:
                    m = self._of(proc)
                except psutil.NoSuchProcess:
                    forget(key)
                    continue
                except psutil.AccessDenied:
                    continue
                total += m.total
                if m.anon is None or m.file is None:
                    split = False
                else:
                    anon, file = anon + m.anon, file + m.file
            if kind == self.kind:
                break
        self.last = Memory(total, anon if split else None, file if split else None)
        self.reads += 1
        cost = time.thread_time() - t0
        # Smooth the cost so one slow read does not swing the interval.
        self._cost_s = cost if self._cost_s is None else 0.7 * self._cost_s + 0.3 * cost
        self.next_due = time.perf_counter() + self.interval_s
        return self.last


class GpuProbe:
    """NVML utilisation and GPU memory of the tree's processes on the visible GPUs.

    Attributes:
        vram_kind: ``"process"`` (NVML's per-process figures for the tree's pids) or
            ``"device"`` (the pids were not visible, e.g. another PID namespace, so the
            watched GPUs' whole used memory); None before the first read.
    """

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._gpus = handles
        self.vram_kind: str | None = None

    @classmethod
    def open(cls) -> GpuProbe | None:
        """A probe of the visible GPUs, or None without NVML or GPUs."""
        nvml = nvml_open()
        if nvml is None:
            return None
        try:
            handles = visible_handles(nvml)
        except Exception:  # noqa: BLE001
            handles = []
        if not handles:
            nvml_close(nvml)
            return None
        return cls(nvml, handles)

    def close(self) -> None:
        nvml_close(self._nvml)

    def read(self, pids: set[int]) -> tuple[float | None, int | None]:
        """Mean utilisation (of the GPUs our pids use, else all) and the tree's VRAM."""
        nvml = self._nvml
        utils_all: list[float] = []
        utils_ours: list[float] = []
        ours = device_used = 0
        matched = others_listed = False
        for h in self._gpus:
            util: float | None = None
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                utils_all.append(util)
            except Exception:  # noqa: BLE001 - e.g. not supported under MIG
                pass
            try:
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001
                procs = []
            on_this = [p for p in procs if p.pid in pids]
            if on_this:
                matched = True
                ours += sum(p.usedGpuMemory or 0 for p in on_this)
                if util is not None:
                    utils_ours.append(util)
            elif procs:
                others_listed = True
            try:
                device_used += int(nvml.nvmlDeviceGetMemoryInfo(h).used)
            except Exception:  # noqa: BLE001
                pass
        if not matched and not others_listed:  # NVML lists no process: no figure, not 0
            self.vram_kind, vram = None, None
        elif matched:
            self.vram_kind, vram = "process", ours
        else:
            # Processes are listed but none of our pids: a container's PID namespace.
            self.vram_kind, vram = "device", device_used
        utils = utils_ours or utils_all
        return (sum(utils) / len(utils) if utils else None), vram
