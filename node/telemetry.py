"""What the machine did during a run: CPU, memory, GPU, disk reads (DESIGN section 8).

:class:`Sampler` is a thread that watches the whole process tree (this process and
every descendant, e.g. DataLoader workers) at 10 Hz by default:

- **CPU** in percent of *one* core, like ``top`` (200 = two cores busy); also divided by
  the logical core count. Computed from cumulative CPU seconds of the tree, so a
  sample never misses work done between ticks.
- **Memory** as the tree's summed proportional set size (PSS, Linux
  ``smaps_rollup``): pages shared by workers (fork copy-on-write, ``mmap`` of the same
  shard) count once in total, not once per worker. Where PSS cannot be read the
  resident set size (RSS) is used and ``memory_kind`` says so. Reading PSS walks the
  page tables (about 10 ms for a 1 GB PyTorch process), so the sampler reads it as
  often as a CPU budget allows (``memory_budget_pct``, between every tick and every
  ``max_memory_interval_s``) and always at :meth:`Sampler.mark` and
  :meth:`Sampler.window`; peaks shorter than that interval can be missed.
- **GPU** utilisation and this tree's GPU memory from NVML (``nvidia-ml-py``) where it
  initialises, else None.
- **Disk** bytes the OS read from storage for the tree (``/proc/<pid>/io``
  ``read_bytes``).

Children that exit: when a parent reaps a child, Linux adds the child's CPU times
(``cutime``/``cstime``) and I/O counters to the parent's, so summing the live tree
(each process's own *and* reaped-children figures) stays continuous. Adding up each
exited pid's last value as well would count its work twice. The sums are kept
monotonic (a running maximum), which absorbs the short gap between a child vanishing
from ``/proc`` and its parent's counters growing.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

_ProcKey = tuple[int, float]  # (pid, create_time): survives pid reuse


# --------------------------------------------------------------------------- process tree


def _tree(root: psutil.Process) -> list[psutil.Process]:
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
    :meth:`Sampler.disk_read_bytes`.

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
    for proc in _tree(root):
        try:
            total += _read_bytes(proc) or 0
        except psutil.NoSuchProcess:
            continue
    return total


# --------------------------------------------------------------------------- NVML


def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None without a usable NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - any NVML failure means "no GPU figures"
        return None


def _nvml_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_handles(nvml: Any) -> list[Any]:
    """NVML handles of the GPUs this process may use (``CUDA_VISIBLE_DEVICES``)."""
    from node.nvml import cuda_handles  # by UUID / bus id: CUDA's order is not NVML's

    handles = cuda_handles(nvml)
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
    nvml = _nvml()
    if nvml is not None:
        try:
            handles = _visible_handles(nvml)
            if index < len(handles):
                return _nvml_str(nvml.nvmlDeviceGetName(handles[index]))
        except Exception:  # noqa: BLE001
            pass
        finally:
            _nvml_shutdown(nvml)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and index < torch.cuda.device_count():
        return str(torch.cuda.get_device_name(index))
    return None


def _nvml_shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- sampler


@dataclass(frozen=True)
class WindowStats:
    """Figures of the process tree over a time window.

    Attributes:
        duration_s: length of the window.
        samples: sampler ticks in the window.
        cpu_util_mean_pct: mean CPU use in percent of one core (like ``top``).
        cpu_util_machine_pct: the same divided by the logical core count (0..100).
        peak_ram_bytes: highest summed memory of the tree (see ``memory_kind``).
        memory_kind: ``"pss"`` or ``"rss"`` (PSS unreadable here).
        memory_interval_s: how often memory was read, on average.
        gpu_util_mean_pct: mean NVML utilisation of the watched GPUs; None without NVML.
        peak_vram_bytes: highest GPU memory of the tree; None without NVML.
        vram_kind: ``"process"`` (NVML's per-process figures for the tree's pids) or
            ``"device"`` (the pids were not visible, e.g. another PID namespace, so the
            watched GPUs' whole used memory); None without NVML.
        disk_read_bytes: bytes read from storage by the tree; None where unreadable.
    """

    duration_s: float
    samples: int
    cpu_util_mean_pct: float | None
    cpu_util_machine_pct: float | None
    peak_ram_bytes: int | None
    memory_kind: str
    memory_interval_s: float | None
    gpu_util_mean_pct: float | None
    peak_vram_bytes: int | None
    vram_kind: str | None
    disk_read_bytes: int | None

    def columns(self) -> dict[str, Any]:
        """The figures under their ``epochs``/``runs`` column names."""
        return {"peak_ram_bytes": self.peak_ram_bytes,
                "peak_vram_bytes": self.peak_vram_bytes,
                "cpu_util_mean_pct": self.cpu_util_mean_pct,
                "gpu_util_mean_pct": self.gpu_util_mean_pct,
                "disk_read_bytes": self.disk_read_bytes}


class _Window:
    """Running figures since a start point."""

    def __init__(self, t: float, cpu_s: float, disk: int, memory_reads: int) -> None:
        self.t0, self.cpu0, self.disk0, self.memory_reads0 = t, cpu_s, disk, memory_reads
        self.samples = 0
        self.peak_ram: int | None = None
        self.gpu_util_sum = 0.0
        self.gpu_util_n = 0
        self.peak_vram: int | None = None

    def add(self, ram: int | None, gpu_util: float | None, vram: int | None) -> None:
        self.samples += 1
        if ram is not None:
            self.peak_ram = ram if self.peak_ram is None else max(self.peak_ram, ram)
        if gpu_util is not None:
            self.gpu_util_sum += gpu_util
            self.gpu_util_n += 1
        if vram is not None:
            self.peak_vram = vram if self.peak_vram is None else max(self.peak_vram, vram)


class Sampler:
    """A background thread sampling the process tree's resource use.

    Use as a context manager, or :meth:`start` / :meth:`stop`. :meth:`mark` starts a
    window (e.g. an epoch) and :meth:`window` reads it; :meth:`totals` covers the
    time since :meth:`start`.

    Args:
        interval_s: time between ticks (CPU, GPU, disk); 0.1 s = 10 Hz.
        pid: root of the watched tree; this process when None.
        gpu: read NVML figures (pass False for a CPU-only run on a GPU machine).
        scan_interval_s: how often to look for new descendants, at least (longer on
            machines with many processes: listing the tree reads every process's
            ``/proc/<pid>/stat``, kept under 0.5% of a core). Their CPU and disk
            counters are cumulative, so work done before they are found still counts.
        memory_budget_pct: share of one core that PSS reads may use; sets how often
            memory is read (at most every tick).
        max_memory_interval_s: longest time between memory reads whatever they cost.
    """

    def __init__(self, interval_s: float = 0.1, *, pid: int | None = None, gpu: bool = True,
                 scan_interval_s: float = 1.0, memory_budget_pct: float = 1.5,
                 max_memory_interval_s: float = 5.0) -> None:
        if interval_s <= 0 or interval_s > 0.2:
            raise ValueError(f"interval_s must be in (0, 0.2] (at least 5 Hz), got {interval_s}")
        if memory_budget_pct <= 0:
            raise ValueError(f"memory_budget_pct must be > 0, got {memory_budget_pct}")
        self.interval_s = interval_s
        self.scan_interval_s = scan_interval_s
        self.memory_budget_pct = memory_budget_pct
        self.max_memory_interval_s = max(max_memory_interval_s, interval_s)
        self._root = psutil.Process(pid)
        self._want_gpu = gpu
        self._cores = psutil.cpu_count() or 1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: dict[_ProcKey, psutil.Process] = {}
        self._nvml: Any | None = None
        self._gpus: list[Any] = []
        self.memory_kind = "pss"
        self.vram_kind: str | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.count = 0
        self._cpu_live_base: float | None = None
        self._disk_live_base: int | None = None
        self._cpu_s = 0.0        # monotonic tree CPU seconds since start
        self._disk = 0           # monotonic tree read_bytes since start
        self._disk_ok = True
        self._next_scan = 0.0
        self._next_memory = 0.0
        self._memory_cost_s: float | None = None
        self._memory_reads = 0
        self._ram: int | None = None
        self._overhead_s = 0.0
        self._last_gpu_util: float | None = None
        self._last_vram: int | None = None
        self._t_start = self._t_last = time.perf_counter()
        self._run = _Window(self._t_start, 0.0, 0, 0)
        self._win = self._run

    # -- lifecycle

    def start(self) -> Sampler:
        """Take a first sample and start the thread."""
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._nvml = _nvml() if self._want_gpu else None
        if self._nvml is not None:
            try:
                self._gpus = _visible_handles(self._nvml)
            except Exception:  # noqa: BLE001
                self._gpus = []
            if not self._gpus:
                _nvml_shutdown(self._nvml)
                self._nvml = None
        self._stop.clear()
        self._reset_counters()
        with self._lock:
            self._sample(force=True)
            self._run = _Window(self._t_last, self._cpu_s, self._disk, self._memory_reads)
            self._run.add(self._ram, None, None)
            self._win = self._run
        self._thread = threading.Thread(target=self._loop, name="formatlab-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (idempotent); figures stay readable."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        if self._nvml is not None:
            _nvml_shutdown(self._nvml)
            self._nvml = None

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        due = time.perf_counter() + self.interval_s
        while not self._stop.wait(max(0.0, due - time.perf_counter())):
            with self._lock:
                self._sample()
            due += self.interval_s
            now = time.perf_counter()
            if due < now:  # fell behind (e.g. a long PSS read): skip, don't burst
                due = now + self.interval_s

    # -- windows

    def mark(self) -> None:
        """Start a new window now (with a fresh sample, memory included)."""
        with self._lock:
            self._sample(force=True)
            self._win = _Window(self._t_last, self._cpu_s, self._disk, self._memory_reads)
            self._win.add(self._ram, self._last_gpu_util, self._last_vram)

    def window(self) -> WindowStats:
        """Figures since the last :meth:`mark` (or start), with a fresh sample."""
        with self._lock:
            self._sample(force=True)
            return self._stats(self._win)

    def totals(self) -> WindowStats:
        """Figures since :meth:`start` (with a fresh sample while running)."""
        with self._lock:
            if self._thread is not None:
                self._sample(force=True)
            return self._stats(self._run)

    def disk_read_bytes(self) -> int | None:
        """Bytes the tree read from storage since :meth:`start`; None where unreadable."""
        with self._lock:
            if self._thread is not None:
                self._sample()
            return self._disk if self._disk_ok else None

    @property
    def overhead_pct(self) -> float:
        """CPU the sampler itself used, in percent of one core, since start."""
        elapsed = time.perf_counter() - self._t_start
        return 100.0 * self._overhead_s / elapsed if elapsed > 0 else 0.0

    @property
    def memory_interval_s(self) -> float:
        """The current time between PSS reads (adapts to their cost)."""
        if self._memory_cost_s is None:
            return self.interval_s
        return min(self.max_memory_interval_s,
                   max(self.interval_s, self._memory_cost_s * 100.0 / self.memory_budget_pct))

    def _stats(self, w: _Window) -> WindowStats:
        duration = self._t_last - w.t0
        cpu = 100.0 * (self._cpu_s - w.cpu0) / duration if duration > 0 else None
        reads = self._memory_reads - w.memory_reads0
        return WindowStats(
            duration_s=duration,
            samples=w.samples,
            cpu_util_mean_pct=cpu,
            cpu_util_machine_pct=None if cpu is None else cpu / self._cores,
            peak_ram_bytes=w.peak_ram,
            memory_kind=self.memory_kind,
            memory_interval_s=duration / reads if reads > 0 and duration > 0 else None,
            gpu_util_mean_pct=w.gpu_util_sum / w.gpu_util_n if w.gpu_util_n else None,
            peak_vram_bytes=w.peak_vram,
            vram_kind=self.vram_kind,
            disk_read_bytes=(self._disk - w.disk0) if self._disk_ok else None,
        )

    # -- sampling (called with the lock held)

    def _sample(self, force: bool = False) -> None:
        cost0 = time.thread_time()
        now = time.perf_counter()
        new = self._scan() if force or now >= self._next_scan else []

        cpu_live, disk_live = 0.0, 0
        for key, proc in list(self._procs.items()):
            try:
                cpu_live += _cpu_seconds(proc)
                read = _read_bytes(proc)
            except psutil.NoSuchProcess:
                self._forget(key)
                continue
            except psutil.AccessDenied:
                continue
            if read is None:
                if proc is self._root:
                    self._disk_ok = False
            else:
                disk_live += read
        if self._cpu_live_base is None:
            self._cpu_live_base, self._disk_live_base = cpu_live, disk_live
        self._cpu_s = max(self._cpu_s, cpu_live - self._cpu_live_base)
        self._disk = max(self._disk, disk_live - (self._disk_live_base or 0))

        if force or new or now >= self._next_memory:
            self._read_memory()
        gpu_util, vram = self._read_gpu() if self._nvml is not None else (None, None)
        self._last_gpu_util, self._last_vram = gpu_util, vram
        self._t_last = time.perf_counter()
        self.count += 1
        self._run.add(self._ram, gpu_util, vram)
        if self._win is not self._run:
            self._win.add(self._ram, gpu_util, vram)
        self._overhead_s += time.thread_time() - cost0

    def _scan(self) -> list[_ProcKey]:
        t0 = time.thread_time()
        seen: dict[_ProcKey, psutil.Process] = {}
        for proc in _tree(self._root):
            try:
                key = (proc.pid, proc.create_time())
            except psutil.Error:
                continue
            seen[key] = self._procs.get(key, proc)
        new = [k for k in seen if k not in self._procs]
        self._procs = seen
        cost = time.thread_time() - t0
        self._next_scan = time.perf_counter() + max(self.scan_interval_s, cost * 200)
        return new

    def _forget(self, key: _ProcKey) -> None:
        self._procs.pop(key, None)

    def _memory_of(self, proc: psutil.Process) -> int:
        if self.memory_kind == "pss":
            try:
                return int(proc.memory_full_info().pss)
            except (psutil.AccessDenied, AttributeError, NotImplementedError):
                # From now on RSS for every process, so figures stay comparable.
                self.memory_kind = "rss"
        return int(proc.memory_info().rss)

    def _read_memory(self) -> None:
        t0 = time.thread_time()
        for _ in range(2):  # a second pass only if PSS turned out unreadable mid-pass
            kind, total = self.memory_kind, 0
            for key, proc in list(self._procs.items()):
                try:
                    total += self._memory_of(proc)
                except psutil.NoSuchProcess:
                    self._forget(key)
                except psutil.AccessDenied:
                    continue
            if kind == self.memory_kind:
                break
        self._ram = total
        self._memory_reads += 1
        cost = time.thread_time() - t0
        # Smooth the cost so one slow read does not swing the interval.
        self._memory_cost_s = cost if self._memory_cost_s is None else (
            0.7 * self._memory_cost_s + 0.3 * cost)
        self._next_memory = time.perf_counter() + self.memory_interval_s

    def _read_gpu(self) -> tuple[float | None, int | None]:
        nvml = self._nvml
        pids = {pid for pid, _ in self._procs}
        utils_all: list[float] = []
        utils_ours: list[float] = []
        ours = 0
        matched = False
        others_listed = False
        device_used = 0
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


def evict_page_cache(paths: Iterable[Path | str]) -> int:
    """Drop the page cache of files (folders: every file below) so reads hit the disk.

    Uses ``posix_fadvise(POSIX_FADV_DONTNEED)``, which needs no root. Clean pages only:
    fine for the read-only cache files. Files that cannot be opened are skipped.

    Returns:
        How many files were advised; 0 where ``posix_fadvise`` does not exist.
    """
    if not hasattr(os, "posix_fadvise"):
        return 0
    done = 0
    for name in _files(paths):
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return done


def page_cache_fits(total_bytes: int) -> bool:
    """Whether ``total_bytes`` of data fit in the memory available now.

    Compares with ``psutil.virtual_memory().available`` (free plus reclaimable cache),
    the memory the page cache could hold the data in without swapping.
    """
    return total_bytes <= psutil.virtual_memory().available


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
    nvml = _nvml()
    if nvml is not None:
        try:
            info["gpu_driver"] = _nvml_str(nvml.nvmlSystemGetDriverVersion())
            v = nvml.nvmlSystemGetCudaDriverVersion_v2()
            info["cuda_driver_version"] = f"{v // 1000}.{v % 1000 // 10}"
            for h in _visible_handles(nvml):
                info["gpus"].append({"name": _nvml_str(nvml.nvmlDeviceGetName(h)),
                                     "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).total)})
        except Exception:  # noqa: BLE001 - partial GPU info beats none
            pass
        finally:
            _nvml_shutdown(nvml)
    try:
        import torch.version

        info["cuda_runtime_version"] = torch.version.cuda
    except ImportError:
        pass
    return info


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
