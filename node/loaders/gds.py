"""Whether GPUDirect Storage really moved a run's bytes: observations and one decision.

``io_path`` is ``gds`` only with evidence (DESIGN section 8). What can be observed, and
what each observation is worth, checked against kvikio 26.10's own source:

- ``DriverProperties::is_gds_available`` (cpp/src/cufile/driver.cpp) only says the
  nvidia-fs driver is loaded (its version is not 0.0). It does not test PCI P2PDMA and
  it does not say that any read went through GDS.
- ``FileHandle::pread`` (cpp/src/file_handle.cpp) serves reads below ``gds_threshold``
  with POSIX in the calling thread, whatever the mode.
- In AUTO mode a file falls back to POSIX on its own (``CompatModeManager``,
  cpp/src/compat_mode_manager.cpp) when its ``O_DIRECT`` open or
  ``cuFileHandleRegister`` fails; the global setting does not change, and Python
  exposes only ``is_direct_io_supported()`` per handle. With compat mode OFF the same
  failure raises.
- cuFile itself falls back to POSIX where its config allows it
  (``properties.allow_compat_mode``, true by default).

So the only positive evidence is the nvidia-fs read counters growing during the run
(system-wide: another process's GDS reads would count too, which the evidence says),
or a run that made fallback impossible: kvikio compat mode OFF *and* cuFile's
``allow_compat_mode`` false, so any fallback would have failed the run.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
NVFS_STATS = Path("/proc/driver/nvidia-fs/stats")
CUFILE_CONFIG = Path("/etc/cufile.json")  # cuFile's default; CUFILE_ENV_PATH_JSON overrides

IO_GDS = "gds"
IO_COMPAT = "compat"
IO_HOST = "host"


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
    """Bytes nvidia-fs has read so far (MiB granularity), or None where unreadable."""
    counters = nvfs_read_counters(path)
    return None if counters is None else counters.bytes


# --------------------------------------------------------------------------- cuFile config

def parse_cufile_allow_compat(text: str) -> bool | None:
    """``properties.allow_compat_mode`` of a cuFile JSON config (``//`` comments allowed).

    None when the text is not such a config or the key is absent.
    """
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("//")]
    try:
        value = json.loads("\n".join(lines)).get("properties", {}).get("allow_compat_mode")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def cufile_allow_compat(env: dict[str, str] | None = None) -> bool | None:
    """Whether cuFile may fall back to POSIX, from its config file; None if unknown.

    cuFile reads ``CUFILE_ENV_PATH_JSON`` or ``/etc/cufile.json``; without a file
    (or the key) its default is to allow compat mode, so that is answered ``True``.
    """
    env = os.environ if env is None else env
    path = Path(env.get("CUFILE_ENV_PATH_JSON") or CUFILE_CONFIG)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return True
    except OSError:
        return None
    value = parse_cufile_allow_compat(text)
    return True if value is None and text.strip() else value


# --------------------------------------------------------------------------- observations

@dataclass(frozen=True)
class GdsObservation:
    """What was seen of one run's cuFile reads.

    Attributes:
        library: ``kvikio`` or ``DALI`` (who called cuFile), for the evidence text.
        compat_requested: the mode asked for: ``OFF``, ``ON`` or ``AUTO``; DALI, which
            calls cuFile with no POSIX path of its own, passes ``OFF``. None if unknown.
        compat_preferred: kvikio's ``is_compat_mode_preferred()`` (False for DALI).
        nvfs_loaded: cuFile's ``is_gds_available`` (nvidia-fs loaded); None if unknown.
        allow_compat: cuFile config ``allow_compat_mode``; None if unknown.
        before, after: nvidia-fs counters around the run's reads; None if unreadable.
        cufile_bytes: bytes in reads at or above ``gds_threshold``; None if unknown.
        fallback_files: files whose handle could not use ``O_DIRECT`` (kvikio falls
            back to POSIX for them in AUTO mode); None if unknown.
    """

    library: str
    compat_requested: str | None
    compat_preferred: bool | None
    nvfs_loaded: bool | None
    allow_compat: bool | None
    before: NvfsReads | None = None
    after: NvfsReads | None = None
    cufile_bytes: int | None = None
    fallback_files: int | None = None


def decide_io_path(obs: GdsObservation) -> tuple[str, str]:
    """``("gds" | "compat", evidence)`` for one run's cuFile reads; pure.

    ``gds`` only when the nvidia-fs counters grew by at least half of the bytes sent
    to cuFile (MiB-granular, one MiB of slack), or, with the counters unreadable, when
    no fallback was possible (compat OFF and cuFile's ``allow_compat_mode`` false).
    """
    lib = obs.library
    if obs.compat_preferred is None:
        return IO_COMPAT, f"{lib}'s compat mode could not be read"
    if obs.compat_preferred:
        return IO_COMPAT, f"{lib} prefers compat mode (POSIX reads through a host bounce buffer)"
    if obs.nvfs_loaded is not True:
        return IO_COMPAT, ("nvidia-fs driver not loaded (is_gds_available checks only that; "
                           "P2PDMA is not detected), cuFile reads go through POSIX")
    if obs.fallback_files:
        return IO_COMPAT, f"{obs.fallback_files} files could not be opened with O_DIRECT (POSIX)"
    if obs.cufile_bytes is not None and obs.cufile_bytes <= 0:
        return IO_COMPAT, "every read was below gds_threshold, which kvikio serves with POSIX"
    if obs.before is not None and obs.after is not None:
        return _from_counters(obs)
    forced = obs.compat_requested == "OFF" and obs.allow_compat is False
    if forced:
        return IO_GDS, ("nvidia-fs counters unreadable; forced: compat mode OFF and cuFile "
                        "allow_compat_mode false, so a fallback would have failed the run")
    return IO_COMPAT, (f"nvidia-fs counters unreadable and a fallback was possible "
                       f"(compat {obs.compat_requested or 'unknown'}, cuFile allow_compat_mode "
                       f"{_word(obs.allow_compat)})")


def _from_counters(obs: GdsObservation) -> tuple[str, str]:
    assert obs.before is not None and obs.after is not None
    ops, mib = obs.after.ops - obs.before.ops, obs.after.mib - obs.before.mib
    if ops <= 0:
        return IO_COMPAT, "nvidia-fs read counters did not move (cuFile fell back to POSIX)"
    seen = f"nvidia-fs counted {ops} reads, {mib} MiB during the run (system-wide counters)"
    if obs.cufile_bytes is not None and (mib + 1) * MIB < obs.cufile_bytes / 2:
        return IO_COMPAT, (f"{seen}, less than half of the {obs.cufile_bytes // MIB} MiB sent "
                           "to cuFile")
    return IO_GDS, seen


def _word(value: bool | None) -> str:
    return "unknown" if value is None else str(value).lower()


# --------------------------------------------------------------------------- probes

def o_direct_reason(path: str | Path) -> str | None:
    """None when ``path`` opens and reads with ``O_DIRECT``, else one line naming the fs.

    DALI's cuFile stream opens every file ``O_RDONLY | O_DIRECT`` and fails outright
    where that is refused (dali/util/std_cufile.cc ``cufile_open``). Which file systems
    refuse depends on the kernel: tmpfs does before Linux 6.6 and accepts it here
    (6.18); overlay and procfs refuse. So the probe tries, it does not guess by name.
    """
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return "this platform has no O_DIRECT"
    try:
        fd = os.open(path, os.O_RDONLY | flag)
        try:
            with mmap.mmap(-1, 4096) as page:  # page-aligned, as O_DIRECT needs
                os.preadv(fd, [page], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return (f"cannot read {path} with O_DIRECT on a {file_system(path)} file system "
                f"({exc.strerror}); DALI's cuFile reader needs it: cache on local ext4/XFS")
    return None


def file_system(path: str | Path) -> str:
    """The type of the file system holding ``path`` (longest ``/proc/mounts`` match)."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def kvikio_observation(*, before: NvfsReads | None, after: NvfsReads | None,
                       cufile_bytes: int | None, fallback_files: int | None) -> GdsObservation:
    """This machine's kvikio/cuFile state plus the run's counters; never raises."""
    return GdsObservation("kvikio", _kvikio_compat_requested(), _kvikio_compat_preferred(),
                          _nvfs_loaded(), _allow_compat(), before, after, cufile_bytes,
                          fallback_files)


def dali_observation(*, before: NvfsReads | None, after: NvfsReads | None) -> GdsObservation:
    """DALI's cuFile reads: no POSIX path of DALI's own, cuFile's config decides."""
    return GdsObservation("DALI", "OFF", False, _nvfs_loaded(), _allow_compat(), before, after)


def _allow_compat() -> bool | None:
    value = _cufile_driver("allow_compat_mode")
    return bool(value) if value is not None else cufile_allow_compat()


def _nvfs_loaded() -> bool | None:
    value = _cufile_driver("is_gds_available")
    return None if value is None else bool(value)


def _cufile_driver(name: str) -> Any:
    try:
        import kvikio.cufile_driver as driver  # kvikio >= 25.02

        return driver.get(name)
    except Exception:  # noqa: BLE001 - not installed, or no cuFile: unknown
        return None


def _kvikio_compat_preferred() -> bool | None:
    try:
        import kvikio.defaults as defaults

        return bool(defaults.is_compat_mode_preferred())
    except Exception:  # noqa: BLE001
        return None


def _kvikio_compat_requested() -> str | None:
    value = kvikio_setting("compat_mode")
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    name = getattr(value, "name", None)
    return name if name in ("OFF", "ON", "AUTO") else None


def kvikio_setting(name: str) -> Any:
    """A kvikio default (``num_threads``, ``gds_threshold``...), or None if unreadable."""
    try:
        import kvikio.defaults as defaults

        return defaults.get(name)
    except Exception:  # noqa: BLE001
        return None


def set_kvikio_settings(**settings: Any) -> None:
    """Set kvikio defaults (``num_threads``, ``gds_threshold``) for this process."""
    import kvikio.defaults as defaults

    defaults.set(settings)
