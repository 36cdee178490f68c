"""What the machine did during a run: CPU, memory, GPU, disk reads (DESIGN section 8).

:class:`Sampler` is a thread that watches the whole process tree (this process and
every descendant, e.g. DataLoader workers) at 10 Hz by default, through one probe per
kind of figure (:mod:`node.probes`: CPU and disk, memory, GPU):

- **CPU** in percent of *one* core, like ``top`` (200 = two cores busy); also divided by
  the run's CPU budget (:func:`node.machine.cpu_budget`: affinity and cgroup quota).
  Computed from cumulative CPU seconds of the tree, so a sample never misses work
  done between ticks.
- **Memory** as the tree's summed proportional set size (PSS, Linux
  ``smaps_rollup``): pages shared by workers (fork copy-on-write, ``mmap`` of the same
  shard) count once in total, not once per worker; split into anonymous (with shared
  memory) and file-backed pages. Where PSS cannot be read the resident set size (RSS)
  is used and ``memory_kind`` says so. Read as often as a CPU budget allows and always
  at :meth:`Sampler.mark` and :meth:`Sampler.window`; shorter peaks can be missed.
- **GPU** utilisation and this tree's GPU memory from NVML (``nvidia-ml-py``) where it
  initialises, else None.
- **Disk** bytes the OS read from storage for the tree (``/proc/<pid>/io``
  ``read_bytes``).

Page cache, CPU budget, hardware and versions live in :mod:`node.machine`; the NVML
driver helpers (GPU names, visible devices) in :mod:`node.nvml`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

from node.machine import cpu_budget
from node.probes import CpuDiskProbe, GpuProbe, MemoryProbe, ProcKey, Procs, tree


# --------------------------------------------------------------------------- sampler


@dataclass(frozen=True)
class MemoryStats:
    """The tree's memory over a window.

    Attributes:
        peak_bytes: highest summed memory of the tree (see ``kind``).
        kind: ``"pss"`` or ``"rss"`` (PSS unreadable here).
        interval_s: how often memory was read, on average.
        peak_anon_bytes: highest anonymous (and shared-memory) part; None where the
            kernel does not split it. Each part has its own peak, so the two need not
            add up to ``peak_bytes``.
        peak_file_bytes: highest file-backed part (mapped dataset files, libraries).
    """

    peak_bytes: int | None
    kind: str
    interval_s: float | None
    peak_anon_bytes: int | None = None
    peak_file_bytes: int | None = None


@dataclass(frozen=True)
class GpuStats:
    """The watched GPUs over a window; every figure None without NVML.

    Attributes:
        util_mean_pct: mean NVML utilisation of the watched GPUs.
        peak_vram_bytes: highest GPU memory of the tree.
        vram_kind: see :attr:`node.probes.GpuProbe.vram_kind`.
    """

    util_mean_pct: float | None = None
    peak_vram_bytes: int | None = None
    vram_kind: str | None = None


@dataclass(frozen=True)
class WindowStats:
    """Figures of the process tree over a time window.

    Attributes:
        duration_s: length of the window.
        samples: sampler ticks in the window.
        cpu_util_mean_pct: mean CPU use in percent of one core (like ``top``).
        cpu_util_machine_pct: the same divided by the run's CPU budget (0..100).
        memory: the tree's memory.
        gpu: GPU utilisation and memory.
        disk_read_bytes: bytes read from storage by the tree; None where unreadable.
    """

    duration_s: float
    samples: int
    cpu_util_mean_pct: float | None
    cpu_util_machine_pct: float | None
    memory: MemoryStats
    gpu: GpuStats
    disk_read_bytes: int | None

    def columns(self) -> dict[str, Any]:
        """The figures under their ``epochs`` column names."""
        return {"peak_ram_bytes": self.memory.peak_bytes,
                "peak_ram_anon_bytes": self.memory.peak_anon_bytes,
                "peak_ram_file_bytes": self.memory.peak_file_bytes,
                "peak_vram_bytes": self.gpu.peak_vram_bytes,
                "cpu_util_mean_pct": self.cpu_util_mean_pct,
                "gpu_util_mean_pct": self.gpu.util_mean_pct,
                "disk_read_bytes": self.disk_read_bytes}


def _max(a: int | None, b: int | None) -> int | None:
    return a if b is None else b if a is None else max(a, b)


class _Window:
    """Running figures since a start point."""

    def __init__(self, t: float, cpu_s: float, disk: int, memory_reads: int) -> None:
        self.t0, self.cpu0, self.disk0, self.memory_reads0 = t, cpu_s, disk, memory_reads
        self.samples = 0
        self.peak_ram: int | None = None
        self.peak_anon: int | None = None
        self.peak_file: int | None = None
        self.gpu_util_sum = 0.0
        self.gpu_util_n = 0
        self.peak_vram: int | None = None

    def add(self, ram: Any, gpu_util: float | None, vram: int | None) -> None:
        self.samples += 1
        if ram is not None:
            self.peak_ram = _max(self.peak_ram, ram.total)
            self.peak_anon = _max(self.peak_anon, ram.anon)
            self.peak_file = _max(self.peak_file, ram.file)
        if gpu_util is not None:
            self.gpu_util_sum += gpu_util
            self.gpu_util_n += 1
        self.peak_vram = _max(self.peak_vram, vram)


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
        self._memory_args = (interval_s, memory_budget_pct, max_memory_interval_s)
        self._root = psutil.Process(pid)
        self._want_gpu = gpu
        self._cores = cpu_budget()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: Procs = {}
        self._gpu: GpuProbe | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.count = 0
        self._cpu_disk = CpuDiskProbe(self._root)
        self._memory = MemoryProbe(*self._memory_args)
        self._next_scan = 0.0
        self._overhead_s = 0.0
        self._last_gpu: tuple[float | None, int | None] = (None, None)
        self._t_start = self._t_last = time.perf_counter()
        self._run = self._win = self._new_window()

    @property
    def memory_kind(self) -> str:
        """``"pss"``, or ``"rss"`` once PSS proved unreadable."""
        return self._memory.kind

    @property
    def vram_kind(self) -> str | None:
        """``"process"`` or ``"device"`` (see :class:`GpuProbe`); None without NVML."""
        return self._gpu.vram_kind if self._gpu is not None else None

    # -- lifecycle

    def start(self) -> Sampler:
        """Take a first sample and start the thread."""
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._gpu = GpuProbe.open() if self._want_gpu else None
        self._stop.clear()
        self._reset_counters()
        with self._lock:
            self._sample(force=True)
            self._run = self._win = self._new_window()
            self._run.add(self._memory.last, None, None)
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
        if self._gpu is not None:
            self._gpu.close()

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

    def _new_window(self) -> _Window:
        return _Window(self._t_last, self._cpu_disk.cpu_s, self._cpu_disk.disk,
                       self._memory.reads)

    def mark(self) -> None:
        """Start a new window now (with a fresh sample, memory included)."""
        with self._lock:
            self._sample(force=True)
            self._win = self._new_window()
            self._win.add(self._memory.last, *self._last_gpu)

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
            return self._cpu_disk.disk if self._cpu_disk.disk_ok else None

    @property
    def overhead_pct(self) -> float:
        """CPU the sampler itself used, in percent of one core, since start."""
        elapsed = time.perf_counter() - self._t_start
        return 100.0 * self._overhead_s / elapsed if elapsed > 0 else 0.0

    @property
    def memory_interval_s(self) -> float:
        """The current time between PSS reads (adapts to their cost)."""
        return self._memory.interval_s

    def _stats(self, w: _Window) -> WindowStats:
        duration = self._t_last - w.t0
        cpu = 100.0 * (self._cpu_disk.cpu_s - w.cpu0) / duration if duration > 0 else None
        reads = self._memory.reads - w.memory_reads0
        return WindowStats(
            duration_s=duration,
            samples=w.samples,
            cpu_util_mean_pct=cpu,
            cpu_util_machine_pct=None if cpu is None else cpu / self._cores,
            memory=MemoryStats(
                peak_bytes=w.peak_ram, kind=self.memory_kind,
                interval_s=duration / reads if reads > 0 and duration > 0 else None,
                peak_anon_bytes=w.peak_anon, peak_file_bytes=w.peak_file),
            gpu=GpuStats(
                util_mean_pct=w.gpu_util_sum / w.gpu_util_n if w.gpu_util_n else None,
                peak_vram_bytes=w.peak_vram, vram_kind=self.vram_kind),
            disk_read_bytes=(self._cpu_disk.disk - w.disk0) if self._cpu_disk.disk_ok else None,
        )

    # -- sampling (called with the lock held)

    def _sample(self, force: bool = False) -> None:
        cost0 = time.thread_time()
        now = time.perf_counter()
        new = self._scan() if force or now >= self._next_scan else []
        self._cpu_disk.read(self._procs, self._forget)
        if force or new or now >= self._memory.next_due:
            self._memory.read(self._procs, self._forget)
        if self._gpu is not None:
            self._last_gpu = self._gpu.read({pid for pid, _ in self._procs})
        self._t_last = time.perf_counter()
        self.count += 1
        self._run.add(self._memory.last, *self._last_gpu)
        if self._win is not self._run:
            self._win.add(self._memory.last, *self._last_gpu)
        self._overhead_s += time.thread_time() - cost0

    def _scan(self) -> list[ProcKey]:
        t0 = time.thread_time()
        seen: Procs = {}
        for proc in tree(self._root):
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

    def _forget(self, key: ProcKey) -> None:
        self._procs.pop(key, None)
