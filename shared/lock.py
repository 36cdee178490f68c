"""One writer per dataset: a lock that a second job sees, and a killed job leaves behind.

Local stores (NFS included) use a kernel file lock (``fcntl.flock``) on
``<dataset>/.lock``: the kernel drops it when the holder dies, even by SIGKILL, so a
re-run after a kill proceeds at once. Object stores have no such lock, so the lock is
the object ``<dataset>/.lock.json`` holding the owner and a heartbeat that a thread
renews; a lock whose heartbeat is older than ``stale_s`` (or whose owner is a dead
process on this host) is taken over. Taking the object is write, wait, read back: of
two jobs that write at once, the one that reads its own token holds it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from shared.storage import Store

LOCK_FILE = ".lock"
LOCK_OBJECT = ".lock.json"
HEARTBEAT_S = 5.0
STALE_S = 60.0
SETTLE_S = 1.0  # between writing the lock object and reading it back


class DatasetBusy(Exception):
    """Another live job holds the dataset's lock."""


@dataclass
class DatasetLock:
    """Held while a job writes ``<store>/<dataset>/``; use as a context manager."""

    store: Store
    dataset: str
    stale_s: float = STALE_S
    owner: dict[str, Any] = field(default_factory=dict)
    _fd: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "DatasetLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`DatasetBusy` naming the holder."""
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": _process_start(os.getpid()), "token": uuid.uuid4().hex,
                      "since": time.time()}
        if self.store.is_local:
            self._acquire_file()
        else:
            self._acquire_object()

    def release(self) -> None:
        """Let the next job in (a no-op when not held)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)  # the lock file stays: deleting it would race a newcomer
            self._fd = None
        elif self.owner and (self._read() or {}).get("token") == self.owner["token"]:
            self.store.delete(self._rel)

    # -- local: a kernel lock, released by the kernel on any death
    def _acquire_file(self) -> None:
        import fcntl

        path = self.store.path(f"{self.dataset}/{LOCK_FILE}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise DatasetBusy(self._busy(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.owner).encode(), 0)
        self._fd = fd

    # -- object stores: owner + heartbeat, stale locks taken over
    @property
    def _rel(self) -> str:
        return f"{self.dataset}/{LOCK_OBJECT}"

    def _read(self) -> dict[str, Any] | None:
        try:
            return _parse(self.store.read_bytes(self._rel))
        except FileNotFoundError:
            return None

    def _acquire_object(self) -> None:
        holder = self._read()
        if holder is not None and not self._is_stale(holder):
            raise DatasetBusy(self._busy(holder))
        self._write()
        time.sleep(SETTLE_S)
        holder = self._read()
        if holder is None or holder.get("token") != self.owner["token"]:
            raise DatasetBusy(self._busy(holder))
        self._thread = threading.Thread(target=self._beat, name="dataset-lock", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.owner["heartbeat"] = time.time()
        self.store.write_bytes(self._rel, json.dumps(self.owner).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed beat only ages the lock
                pass

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if _process_start(holder["pid"]) != holder.get("started"):
                return True  # that process is gone (or its pid was reused)
        beat = holder.get("heartbeat")
        return not isinstance(beat, (int, float)) or time.time() - beat > self.stale_s

    def _busy(self, holder: dict[str, Any] | None) -> str:
        where = self.store.sub(self.dataset).display_url
        if not holder:
            return f"{where} is being written by another job; wait for it to finish"
        who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}"
        since = time.strftime("%H:%M:%S", time.gmtime(float(holder.get("since") or 0)))
        stale = "" if self.store.is_local else (
            f"; a killed job's lock is taken over {self.stale_s:.0f} s after its last heartbeat")
        return (f"{where} is being written by another job ({who}, since {since} UTC); "
                f"wait for it to finish{stale}")


def _parse(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8") or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _process_start(pid: int) -> float | None:
    """A process's start time (tells a live owner from a reused pid), None if gone."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied, no psutil
        return None
