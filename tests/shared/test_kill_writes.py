"""Atomic writes for real: writer processes SIGKILLed mid-write, local and S3.

A child process rewrites one object over and over (each version whole and
self-checking) through ``Store.write_bytes``; the test reads it while it is written and
SIGKILLs the writer at seeded random moments. Readers never see a partial object, and
the object is whole after every kill. A results write killed halfway through its bytes
(``FORMATLAB_KILL_AT=results-write:1``) leaves a readable table without that file.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.results import read_table, write_rows
from shared.storage import Store, parse_storage_options

REPO = Path(__file__).resolve().parents[2]
SIZE = 6 << 20  # large enough that a PUT or a write takes a while

_WRITER = """
import hashlib, os, sys
from shared.storage import Store, parse_storage_options
store = Store.open(sys.argv[1], parse_storage_options(None))
n = 0
while True:
    n += 1
    body = os.urandom(16) * ({size} // 16)
    store.write_bytes("obj.bin", hashlib.sha256(body).digest() + body)
    print(n, flush=True)
"""


def whole(data: bytes) -> bool:
    return len(data) == 32 + SIZE and hashlib.sha256(data[32:]).digest() == data[:32]


def start_writer(url: str, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(size=SIZE), url], cwd=REPO,
                            env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "1"
    return proc


def kill_writes(url: str, options: dict, env: dict[str, str], kills: int, seed: int) -> int:
    """SIGKILL a rewriting writer ``kills`` times; every read in between must be whole."""
    store = Store.open(url, options)
    rng = random.Random(seed)
    reads = 0
    for _ in range(kills):
        proc = start_writer(url, env)
        deadline = time.monotonic() + rng.uniform(0.05, 1.5)
        try:
            while time.monotonic() < deadline:
                assert whole(store.read_bytes("obj.bin")), "a reader saw a partial object"
                reads += 1
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        assert whole(store.read_bytes("obj.bin")), "the object is partial after a kill"
    return reads


def test_local_writer_killed_mid_write(tmp_path: Path) -> None:
    assert kill_writes(str(tmp_path / "store"), {}, dict(os.environ), kills=6, seed=1) > 0
    names = os.listdir(tmp_path / "store")
    assert "obj.bin" in names  # (temporaries of killed writes may remain, hidden names)
    assert all(n == "obj.bin" or n.startswith(".obj.bin.tmp-") for n in names)


def test_s3_writer_killed_mid_put(s3_server, s3_bucket: str) -> None:
    env = s3_server.env()
    assert kill_writes(f"{s3_bucket}/store", s3_server.storage_options, env, kills=4,
                       seed=2) > 0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_results_write_killed_halfway(where: str, tmp_path: Path, request) -> None:
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        url, env = request.getfixturevalue("s3_bucket") + "/results", server.env()
    else:
        url, env = str(tmp_path / "results"), dict(os.environ)
    options = parse_storage_options(None) if where == "local" else \
        request.getfixturevalue("s3_server").storage_options
    store = Store.open(url, options)
    write_rows(store, "conversions", [{"job_id": "kept", "format": "png"}])
    code = ("import sys; from shared.results import write_rows; "
            "from shared.storage import Store, parse_storage_options; "
            "write_rows(Store.open(sys.argv[1], parse_storage_options(None)), 'conversions', "
            "[{'job_id': 'killed', 'format': 'npy'}])")
    proc = subprocess.run([sys.executable, "-c", code, url], cwd=REPO, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO),
                               "FORMATLAB_KILL_AT": "results-write:1"})
    assert proc.returncode == -signal.SIGKILL
    assert list(read_table(store, "conversions")["job_id"]) == ["kept"]
    if where == "local":
        import pandas as pd

        assert list(pd.read_parquet(f"{url}/conversions")["job_id"]) == ["kept"]
