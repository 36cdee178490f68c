"""A test hook: SIGKILL this process at the Nth arrival at a named point of the code.

Fault tests set ``FORMATLAB_KILL_AT=<point>:<N>`` to kill a real conversion, cache fill
or results write at a chosen phase (a real SIGKILL, not an exception). With
``FORMATLAB_KILL_STATE=<dir>`` arrivals are counted over every process that sees the
variable (Ray workers too), and the kill fires once. Unset, a point costs one lookup.

Points: ``plan`` (the driver, after planning), ``shard-stage`` (a shard encoded in
staging), ``shard-data`` (its data in place, no index yet), and, halfway through an
atomic write's bytes, ``index-write``, ``manifest-write``, ``results-write`` or
``write`` (any other file).
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "FORMATLAB_KILL_AT"
KILL_STATE_ENV = "FORMATLAB_KILL_STATE"
RESULT_TABLES = ("runs/", "epochs/", "conversions/")
_arrivals: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process if ``FORMATLAB_KILL_AT`` names this arrival at ``name``."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, _, nth = spec.rpartition(":")
    if point != name or not nth.isdigit():
        return
    state = os.environ.get(KILL_STATE_ENV)
    count = _count_shared(state, name) if state else _count_local(name)
    if count == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def write_point(rel: str) -> str:
    """The point name of an atomic write of store path ``rel``."""
    if rel.endswith("index.parquet"):
        return "index-write"
    if rel.endswith("manifest.json"):
        return "manifest-write"
    if rel.startswith(RESULT_TABLES):
        return "results-write"
    return "write"


def _count_local(name: str) -> int:
    _arrivals[name] = _arrivals.get(name, 0) + 1
    return _arrivals[name]


def _count_shared(state: str, name: str) -> int:
    import fcntl

    os.makedirs(state, exist_ok=True)
    fd = os.open(os.path.join(state, f"{name}.count"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        count = int(os.pread(fd, 32, 0) or b"0") + 1
        os.pwrite(fd, str(count).encode().ljust(32), 0)
        os.fsync(fd)
        return count
    finally:
        os.close(fd)
