"""Two jobs, one destination: a second conversion of the same --dst/--name is refused.

Real processes throughout: a holder process takes the dataset lock (local: a kernel
file lock; S3: a lock object with a heartbeat), a real ``prep/convert.py`` is refused
with exit 2 and one line and writes nothing; after the holder is SIGKILLed a re-run
proceeds at once. Two conversions started together never interleave.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testdata import datagen
from shared.lock import LOCK_OBJECT, DatasetBusy, DatasetLock
from shared.manifest import MANIFEST_FILE, Manifest
from shared.storage import Store
from test_convert import (CONVERT, REPO, assert_exactly_once, assert_no_index_without_data,
                          assert_one_line_error, cifar_args, cifar_expected)

_HOLD = """
import sys, time
from shared.lock import DatasetLock
from shared.storage import Store, parse_storage_options
lock = DatasetLock(Store.open(sys.argv[1], parse_storage_options(None)), "cifar10")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> datagen.GeneratedCifar:
    return datagen.make_cifar10_python(tmp_path_factory.mktemp("lock") / "c.tar.gz",
                                       train_per_batch=40, test=40, seed=4)


def hold_lock(dst: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A real process holding the dataset lock of ``dst``/cifar10 until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, dst], cwd=REPO,
                            env={**(env or os.environ), "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def sigkill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def run_convert(argv: list[str], env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, CONVERT, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def written(root: Path) -> list[Path]:
    """Files under ``root`` other than the lock's own."""
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".lock")]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_job_refused_then_proceeds_after_kill(where: str, gen: datagen.GeneratedCifar,
                                                     tmp_path: Path, request) -> None:
    env = None
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        env = server.env()
        dst = request.getfixturevalue("s3_bucket") + "/store"
        root = server.root / dst.removeprefix("s3://")
        options = server.storage_options
    else:
        dst, options = str(tmp_path / "store"), {}
        root = tmp_path / "store"
    argv = cifar_args(gen.path, dst, "png,npy", "--address", "inline")
    holder = hold_lock(dst, env)
    try:
        refused = run_convert(argv, env)
        assert refused.returncode == 2, refused.stderr
        line = assert_one_line_error(refused.stderr)
        assert "being written by another job" in line and f"pid {holder.pid}" in line, line
        assert written(root) == []  # nothing written while another job holds it
    finally:
        sigkill(holder)  # the holder dies without releasing: a stale lock stays behind
    done = run_convert(argv, env)
    assert done.returncode == 0, done.stderr[-2000:]
    m = Manifest.load(Store.open(dst, options), "cifar10")
    assert_exactly_once(root / "cifar10", m, cifar_expected(gen))
    assert not (root / "cifar10" / LOCK_OBJECT).exists()  # released at the end (S3)


def test_s3_lock_taken_over_when_heartbeat_is_stale(s3_server, s3_bucket: str) -> None:
    store = Store.open(f"{s3_bucket}/store", s3_server.storage_options)
    foreign = {"host": "elsewhere-" + socket.gethostname(), "pid": 1, "token": "t",
               "since": time.time() - 999}
    store.write_bytes(f"cifar10/{LOCK_OBJECT}",
                      json.dumps({**foreign, "heartbeat": time.time()}).encode())
    with pytest.raises(DatasetBusy, match="elsewhere"):
        DatasetLock(store, "cifar10").acquire()
    store.write_bytes(f"cifar10/{LOCK_OBJECT}",
                      json.dumps({**foreign, "heartbeat": time.time() - 999}).encode())
    with DatasetLock(store, "cifar10") as lock:
        held = json.loads(store.read_bytes(f"cifar10/{LOCK_OBJECT}"))
        assert held["token"] == lock.owner["token"]
    assert not store.exists(f"cifar10/{LOCK_OBJECT}")


def test_two_conversions_started_together_never_interleave(gen: datagen.GeneratedCifar,
                                                           tmp_path: Path) -> None:
    """The measured fault: two jobs one second apart on one --dst/--name. Now one
    converts; the other is refused (exit 2, one line) or finds everything committed."""
    store = tmp_path / "store"
    argv = [sys.executable, CONVERT,
            *cifar_args(gen.path, store, "png,npy,hdf5", "--address", "inline")]
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        time.sleep(1)
    outcomes = [(p.wait(300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 2]), outcomes
    for code, err in outcomes:
        if code == 2:
            assert "being written by another job" in assert_one_line_error(err)
        assert "Errno" not in err
    m = Manifest.load(Store.open(str(store)), "cifar10")
    assert_exactly_once(store / "cifar10", m, cifar_expected(gen))
    assert assert_no_index_without_data(store / "cifar10") == 3 * len(m.format("png").shards)
    assert (store / "cifar10" / MANIFEST_FILE).is_file()
