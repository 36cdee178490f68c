"""Fault injection (issue 8, DESIGN section 9): each promise proven by injecting the fault.

Covered here (the other fault cases live beside the code they test: killed and
outage-hit conversions, bad source files and the booby-trapped pickle in
tests/prep/test_convert.py; damaged, killed, shared and full caches in
tests/node/test_cache.py; concurrent local writers in tests/shared/test_results.py;
eight runs at once, a results outage during a run and bad node-agent flag values in
tests/node/test_faults_node.py):

1. the S3 store stopped in the middle of a cache fill, then restarted on the same port;
2. eight processes writing into one S3 results store at once;
3. a manifest, and an index, whose paths try to leave the dataset root;
4. a manifest with a wrong schema version or a missing field;
5. S3 credentials in the environment and in ``--storage-options`` through convert,
   cache, run and report (and failing commands): the secret is written nowhere.

Exit codes and "one line, no traceback" are checked on real processes; the many
variants of one refusal run in-process (Click's runner) to keep the suite fast.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from node.cli import cli
from prep.convert import PENDING_DIR
from testdata.datagen import make_cifar10_python
from shared.manifest import INDEX_FILE, MANIFEST_FILE, Manifest, ManifestError
from shared.shards import read_index
from shared.storage import Store, checksum_bytes, checksum_file

REPO = Path(__file__).resolve().parents[1]
CONVERT = str(REPO / "prep" / "convert.py")
DATASET = "cifar10"

# The root conftest under a name of its own (every conftest.py is "conftest" to pytest).
_spec = importlib.util.spec_from_file_location("_formatlab_root_conftest_faults",
                                               REPO / "tests" / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _root  # its dataclasses look their module up
_spec.loader.exec_module(_root)  # type: ignore[union-attr]
start_s3_server = _root.start_s3_server

_TMP = ".tmp-"  # every temporary name of an atomic write or download: ".<name>.tmp-<hex>"


# --------------------------------------------------------------------------- helpers


def kill_group(proc: subprocess.Popen) -> None:
    """End a process this test started, and its children, by its own group id."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def run_process(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | str = REPO,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group; on timeout the group is killed."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def agent(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``node-agent ARGS`` in a real process."""
    return run_process([sys.executable, "-m", "node.cli", *args], **kwargs)


def agent_in_process(*args: str) -> Any:
    """``node-agent ARGS`` through Click's runner; an escaped exception fails the test
    (a real process would have printed its traceback)."""
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"node-agent {' '.join(args)} raised {result.exception!r}")
    return result


def one_error_line(stderr: str) -> str:
    """The single ``node-agent: error: ...`` line of a failed command."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("node-agent: error: "), lines[0]
    return lines[0]


def convert_inline(src: Path, dst: str, formats: str, shard_samples: int,
                   *extra: str) -> None:
    """prep/convert.py in this process, without Ray."""
    from prep.convert import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["--source", "cifar10", "--src", str(src), "--dst", dst,
                     "--address", "inline", "--formats", formats,
                     "--shard-samples", str(shard_samples), *extra])
    assert code == 0, out.getvalue()


def is_temp(name: str) -> bool:
    return name.startswith(".") and _TMP in name


def check_cached_format(cache: Path, manifest: Manifest, fmt: str, *,
                        complete: bool) -> tuple[int, int]:
    """Every cached file of ``fmt`` matches its checksum; returns (valid files, temps).

    A present index must match the manifest (it commits the shard); every file it lists
    that is present under its own name must match the index; nothing else but
    temporaries lies in a shard folder. ``complete``: every file must be present.
    """
    valid = temps = 0
    for entry in manifest.format(fmt).shards:
        folder = cache / manifest.name / entry.path
        index_path = folder / INDEX_FILE
        if not index_path.exists():
            assert not complete, f"{index_path} missing"
            if folder.exists():
                assert all(is_temp(p.name) for p in folder.rglob("*") if p.is_file()), \
                    f"files without a committed index in {folder}"
            continue
        assert checksum_file(index_path) == entry.index_checksum, index_path
        valid += 1
        index = read_index(index_path)
        listed = dict(zip(index.column("file").to_pylist(),
                          index.column("checksum").to_pylist()))
        listed.update({f.path: f.checksum for f in entry.files})
        for path in folder.rglob("*"):
            if not path.is_file() or path.name == INDEX_FILE:
                continue
            if is_temp(path.name):  # may remain, never read as data
                temps += 1
                continue
            rel = path.relative_to(folder).as_posix()
            assert rel in listed, f"stray file {path} in the cache"
            assert checksum_file(path) == listed[rel], f"{path} fails its checksum"
            valid += 1
        if complete:
            missing = [n for n in listed if not (folder / n).is_file()]
            assert not missing, f"{folder}: {missing[:3]} missing"
    return valid, temps


def snapshot(root: Path, *skip: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` (outside ``skip``): path -> (size, mtime)."""
    skipped = [s.resolve() for s in skip]
    out = {}
    for path in root.rglob("*"):
        if any(path.resolve() == s or s in path.resolve().parents for s in skipped):
            continue
        if path.is_file() or path.is_symlink():
            st = path.lstat()
            out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 python archive: 100 train and 20 test images."""
    path = tmp_path_factory.mktemp("faults-src") / "cifar-10-python.tar.gz"
    make_cifar10_python(str(path), train_per_batch=20, test=20, seed=3)
    return path


@pytest.fixture(scope="module")
def local_store(small_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small archive converted to a local store, png and npy, shards of 50."""
    store = tmp_path_factory.mktemp("faults-store") / "store"
    convert_inline(small_archive, str(store), "png,npy", 50)
    return store


@pytest.fixture
def private_store(local_store: Path, tmp_path: Path) -> Path:
    """A copy of the local store that a test may damage."""
    dst = tmp_path / "store"
    shutil.copytree(local_store, dst)
    return dst


def load_manifest_json(store: Path) -> dict[str, Any]:
    return json.loads((store / DATASET / MANIFEST_FILE).read_text())


def save_manifest_json(store: Path, data: dict[str, Any]) -> None:
    (store / DATASET / MANIFEST_FILE).write_text(json.dumps(data, indent=2))


def format_json(data: dict[str, Any], fmt: str) -> dict[str, Any]:
    return next(f for f in data["formats"] if f["id"] == fmt)


# --------------------------------------------------------------------------- 1. outage


def test_store_outage_mid_cache_fill(start_s3: Callable[[], Any], tmp_path: Path) -> None:
    """The S3 server stops while ``node-agent cache`` fetches 600 PNGs: the command
    fails with one clean line (or completes), only verified files are cached, and a
    re-run against the restarted server completes, re-using what was cached."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10_python(str(archive), train_per_batch=100, test=100, seed=5)
    server = start_s3()
    port = int(server.endpoint.rsplit(":", 1)[1])
    store_url = server.bucket("outage") + "/store"
    convert_inline(archive, store_url, "png", 100, "--storage-options",
                   json.dumps(server.storage_options))
    manifest = Manifest.load(Store.open(store_url, server.storage_options), DATASET)
    total = sum(s.samples + 1 + len(s.files) for s in manifest.format("png").shards)
    assert total == 606  # 600 images and 6 indexes

    cache = tmp_path / "cache"
    args = ["cache", "--store", store_url, "--dataset", DATASET, "--format", "png",
            "--cache", str(cache)]
    argv = [sys.executable, "-m", "node.cli", *args]
    proc = subprocess.Popen(argv, cwd=REPO, env=server.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    restarted = None
    try:
        deadline = time.monotonic() + 120
        while not (cache.exists() and any(cache.rglob("*.png"))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the cache fill never started"
            time.sleep(0.01)
        running_at_stop = proc.poll() is None
        server.stop()  # the fault: the store goes away mid-fill
        out, err = proc.communicate(timeout=240)
        assert running_at_stop, "the fill finished before the server stopped"
        assert proc.returncode == 1, err  # stopped at its first file: 600 were left
        line = one_error_line(err)
        assert "s3://outage/store/cifar10/png/" in line, line
        assert server.secret not in out + err
        # Nothing half-written was committed: every cached file is a verified one.
        valid_before, _ = check_cached_format(cache, manifest, "png", complete=False)
        assert 0 < valid_before < total

        restarted = start_s3_server(server.root, port)
        done = agent(*args, env=restarted.env(), timeout=240)
        assert done.returncode == 0, done.stderr
        assert restarted.secret not in done.stdout + done.stderr
        match = re.search(r"(\d[\d,]*) files, [\d,]+ bytes, fetched (\d[\d,]*) files .*?"
                          r"(\d+) re-fetched", done.stdout, re.S)
        assert match, done.stdout
        files, fetched, refetched = (int(g.replace(",", "")) for g in match.groups())
        assert (files, refetched) == (total, 0), done.stdout
        assert fetched == total - valid_before, done.stdout  # what was cached is kept
        valid_after, _ = check_cached_format(cache, manifest, "png", complete=True)
        assert valid_after == total
    finally:
        kill_group(proc)
        if restarted is not None:
            restarted.stop()


# --------------------------------------------------------------------------- 2. results
# Eight concurrent writers into one S3 results store: tests/shared/test_results.py
# (test_eight_processes_s3), next to the local cases.


# --------------------------------------------------------------------------- 3. escapes

# Manifest tampering: (format, path inside the format entry, bad value, field named).
MANIFEST_ESCAPES = {
    "shard ../x": ("png", ("shards", 0, "path"), "../x", "shards.path"),
    "shard /etc": ("png", ("shards", 0, "path"), "/etc", "shards.path"),
    "shard out of the cache": ("npy", ("shards", 1, "path"), "../../escaped", "shards.path"),
    "file ../../etc/passwd": ("npy", ("shards", 0, "files", 0, "path"), "../../etc/passwd",
                              "files.path"),
}
LOADER = {"png": "file", "npy": "numpy_mmap"}


def tamper_manifest(store: Path, fmt: str, where: tuple, value: Any) -> None:
    data = load_manifest_json(store)
    target: Any = format_json(data, fmt)
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    save_manifest_json(store, data)


def tamper_index(store: Path, bad: str) -> None:
    """Put ``bad`` in the ``file`` column of png/train/shard-00000's index, and give the
    manifest the new index's checksum, so that only the path check can refuse it."""
    data = load_manifest_json(store)
    # The first shard a fill fetches, so that no other shard is cached before it.
    entry = next(s for s in format_json(data, "png")["shards"]
                 if s["path"] == "png/train/shard-00000")
    path = store / DATASET / entry["path"] / INDEX_FILE
    table = pq.read_table(path)
    files = table.column("file").to_pylist()
    files[1] = bad
    table = table.set_column(table.column_names.index("file"), "file",
                             pa.array(files, pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf)  # the schema metadata (shard files) goes along
    path.write_bytes(buf.getvalue())
    entry["index_checksum"] = checksum_bytes(buf.getvalue())
    save_manifest_json(store, data)


def command(kind: str, store: Path, fmt: str, tmp: Path) -> list[str]:
    base = ["--store", str(store), "--dataset", DATASET, "--format", fmt,
            "--cache", str(tmp / "cache")]
    if kind == "cache":
        return ["cache", *base]
    return ["run", *base, "--loader", LOADER[fmt], "--results", str(tmp / "results"),
            "--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--workers", "0",
            "--device", "cpu"]


def assert_nothing_written_outside(before: dict, tmp: Path, *allowed: Path) -> None:
    after = snapshot(tmp, *allowed)
    assert after == before, sorted(set(after) ^ set(before))
    for sentinel in (tmp / "escaped", tmp / "escaped.png", tmp / "x", tmp / "etc"):
        assert not sentinel.exists(), sentinel


@pytest.mark.parametrize("kind", ["cache", "run"])
@pytest.mark.parametrize("case", list(MANIFEST_ESCAPES))
def test_manifest_paths_escaping_are_refused(private_store: Path, tmp_path: Path,
                                             case: str, kind: str) -> None:
    fmt, where, bad, field = MANIFEST_ESCAPES[case]
    tamper_manifest(private_store, fmt, where, bad)
    before = snapshot(tmp_path)
    result = agent_in_process(*command(kind, private_store, fmt, tmp_path))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert repr(bad) in line and field in line, line
    assert not (tmp_path / "results").exists()  # refused before anything ran
    assert_nothing_written_outside(before, tmp_path)


# From <cache>/cifar10/png/train/shard-00000 (and the store's twin) five levels up is
# the test's own folder: the second one would land beside the cache.
INDEX_ESCAPES = ["../../etc/passwd", "../../../../../escaped.png", "/etc/passwd"]


@pytest.mark.parametrize("kind", ["cache", "run"])
@pytest.mark.parametrize("bad", INDEX_ESCAPES)
def test_index_paths_escaping_are_refused(private_store: Path, tmp_path: Path, bad: str,
                                          kind: str) -> None:
    tamper_index(private_store, bad)
    before = snapshot(tmp_path)
    result = agent_in_process(*command(kind, private_store, "png", tmp_path))
    assert result.exit_code == 2, result.output  # bad input: the dataset is refused
    line = one_error_line(result.stderr)
    assert repr(bad) in line and f"shard-00000/{INDEX_FILE}" in line, line
    # Only the cache (its verified index) was written; no results row for a refusal.
    assert_nothing_written_outside(before, tmp_path, tmp_path / "cache")
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()
              and p.name not in (INDEX_FILE,) and not p.name.endswith(".lock")]
    assert cached == [], cached  # no sample fetched from a refused index
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- 4. schema

# Manifest damage: (edit of the parsed JSON, the field the error must name).
SCHEMA_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "wrong schema_version": (lambda d: d.update(schema_version=99), "'schema_version'"),
    "no schema_version": (lambda d: d.pop("schema_version"), "'schema_version'"),
    "missing height": (lambda d: d.pop("height"), "'height'"),
    "missing index_checksum": (lambda d: [s.pop("index_checksum") for f in d["formats"]
                                          for s in f["shards"]],
                               "'formats.shards.index_checksum'"),
}


@pytest.mark.parametrize("kind", ["cache", "run"])
@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_bad_manifest_schema_is_refused(private_store: Path, tmp_path: Path, case: str,
                                        kind: str) -> None:
    edit, field = SCHEMA_CASES[case]
    data = load_manifest_json(private_store)
    edit(data)
    save_manifest_json(private_store, data)
    result = agent_in_process(*command(kind, private_store, "npy", tmp_path))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert field in line and "manifest field" in line, line
    assert not (tmp_path / "results").exists()
    assert not any((tmp_path / "cache").rglob("*.npy"))


def test_refusals_in_real_processes(local_store: Path, tmp_path: Path) -> None:
    """The same refusals from a real process: exit code, one line, no traceback."""
    cases = []
    for name, edit in (("escape", lambda s: tamper_manifest(s, "png", ("shards", 0, "path"),
                                                            "../x")),
                       ("schema", lambda s: save_manifest_json(
                           s, load_manifest_json(s) | {"schema_version": 2})),
                       ("index", lambda s: tamper_index(s, "../../etc/passwd"))):
        store = tmp_path / name / "store"
        shutil.copytree(local_store, store)
        edit(store)
        cases.append((name, store))
    expect = {"escape": ("run", 2, "'../x'"), "schema": ("cache", 2, "'schema_version'"),
              "index": ("cache", 2, "'../../etc/passwd'")}
    for name, store in cases:
        kind, code, needle = expect[name]
        before = snapshot(tmp_path / name)
        proc = agent(*command(kind, store, "png", tmp_path / name), timeout=180)
        assert proc.returncode == code, (name, proc.stderr)
        assert needle in one_error_line(proc.stderr), (name, proc.stderr)
        assert_nothing_written_outside(before, tmp_path / name, tmp_path / name / "cache")


# --------------------------------------------------------------------------- 5. secrets


def parquet_text(path: Path) -> str:
    """Everything a Parquet file says once decoded (compressed columns hide bytes)."""
    try:
        table = pq.read_table(path)
    except Exception:  # noqa: BLE001 - not Parquet after all
        return ""
    meta = {k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in (table.schema.metadata or {}).items()}
    return json.dumps(meta) + json.dumps(table.to_pylist(), default=str)


def assert_secret_nowhere(secret: str, roots: list[Path], texts: dict[str, str]) -> int:
    """``secret`` is in no file below ``roots`` (raw bytes, and decoded Parquet) and in
    none of ``texts``; returns the number of files searched."""
    needle = secret.encode()
    hits, searched = [], 0
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            searched += 1
            if needle in path.read_bytes() or (path.suffix == ".parquet"
                                               and secret in parquet_text(path)):
                hits.append(str(path))
    assert not hits, f"secret found in files: {hits}"
    leaked = [name for name, text in texts.items() if secret in text]
    assert not leaked, f"secret found in the output of: {leaked}"
    return searched


def test_secrets_appear_nowhere(start_s3: Callable[[], Any], small_archive: Path,
                                tmp_path: Path) -> None:
    """Credentials in the environment and in --storage-options, through convert, cache,
    run and report, and through failing commands: the secret key is written nowhere."""
    server = start_s3()
    secret = server.secret
    bucket = server.bucket("secrets")
    store, results = f"{bucket}/store", f"{bucket}/results"
    options = json.dumps(server.storage_options)
    work, home, tmpdir, logs = (tmp_path / n for n in ("work", "home", "tmp", "logs"))
    for d in (work, home, tmpdir, logs):
        d.mkdir()
    # Both: the AWS environment and --storage-options; HOME and TMPDIR private so that
    # anything a tool writes there is searched too.
    env = server.env() | {"HOME": str(home), "TMPDIR": str(tmpdir),
                          "XDG_CACHE_HOME": str(home / ".cache")}
    cache, report = work / "cache", work / "report"
    common = ["--store", store, "--dataset", DATASET, "--storage-options", options]
    steps = {
        "convert": [sys.executable, CONVERT, "--source", "cifar10", "--src", str(small_archive),
                    "--dst", store, "--formats", "png,npy", "--shard-samples", "50",
                    "--address", "inline", "--results", results, "--storage-options", options],
        "cache": [sys.executable, "-m", "node.cli", "cache", *common, "--format", "png",
                  "--cache", str(cache)],
        "run": [sys.executable, "-m", "node.cli", "run", *common, "--format", "png",
                "--loader", "file", "--cache", str(cache), "--results", results,
                "--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--workers", "0",
                "--device", "cpu"],
        "report": [sys.executable, "-m", "node.cli", "report", "--results", results,
                   "--out", str(report), "--storage-options", options],
    }
    texts: dict[str, str] = {}
    for name, argv in steps.items():
        proc = run_process(argv, env=env, cwd=work, timeout=300)
        texts[f"{name} stdout"], texts[f"{name} stderr"] = proc.stdout, proc.stderr
        (logs / f"{name}.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    so = server.storage_options
    runs = pd.read_parquet(f"{results}/runs", storage_options=so)
    assert list(runs["status"]) == ["ok"]
    assert len(pd.read_parquet(f"{results}/conversions", storage_options=so)) >= 2
    assert any(report.rglob("*.png")) and any(report.rglob("*.csv"))

    # Failing commands with the secret in their storage options (and environment).
    wrong = "wr0ng-" + secret[::-1]
    failures = {
        "missing bucket": (["cache", "--store", "s3://no-such-bucket-fl/store", "--dataset",
                            DATASET, "--format", "png", "--cache", str(cache),
                            "--storage-options", options], (1, 2)),
        "wrong secret": (["cache", "--store", store, "--dataset", DATASET, "--format", "npy",
                          "--cache", str(cache), "--storage-options",
                          json.dumps(so | {"secret": wrong})], (1, 2)),
        "secret in the URL": (["report", "--results",
                               f"s3://{server.key}:{secret}@secrets/results",
                               "--out", str(work / "report2"), "--storage-options", options],
                              (0, 1, 2)),
    }
    for name, (args, codes) in failures.items():
        proc = run_process([sys.executable, "-m", "node.cli", *args], env=env, cwd=work,
                           timeout=240)
        texts[f"{name} stdout"], texts[f"{name} stderr"] = proc.stdout, proc.stderr
        (logs / f"{name}.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode in codes, (name, proc.returncode, proc.stderr[-2000:])
        if proc.returncode:
            one_error_line(proc.stderr)
        assert wrong not in proc.stdout + proc.stderr, name

    roots = [server.root, work, home, tmpdir, logs]
    searched = assert_secret_nowhere(secret, roots, texts)
    assert_secret_nowhere(wrong, roots, texts)
    assert searched > 100  # the store, the cache, the report and the logs were searched


def test_multi_line_store_error_keeps_its_reason(s3_server: Any, tmp_path: Path) -> None:
    """Credentials in the URL (s3://KEY:SECRET@bucket) make botocore refuse the bucket
    name in a two-line message: the one line must still say why, without the secret."""
    result = agent_in_process(
        "cache", "--store", f"s3://{s3_server.key}:{s3_server.secret}@secrets/store",
        "--dataset", DATASET, "--format", "png", "--cache", str(tmp_path / "cache"),
        "--storage-options", json.dumps(s3_server.storage_options))
    assert result.exit_code in (1, 2), result.output
    line = one_error_line(result.stderr)
    assert s3_server.secret not in line
    assert "Invalid bucket name" in line, line


# --------------------------------------------------------------------------- 6. killed fills

CACHE_KILLS = [("cache-download", 40), ("cache-rename", 1), ("cache-rename", 103)]


@pytest.mark.parametrize(("point", "nth"), CACHE_KILLS, ids=[f"{p}-{n}" for p, n in CACHE_KILLS])
def test_cache_fill_killed_at_point_resumes(local_store: Path, tmp_path: Path, point: str,
                                            nth: int) -> None:
    """``node-agent cache`` SIGKILLs itself mid-download or between verify and rename
    (FORMATLAB_KILL_AT): only verified files carry their names, and a re-run completes
    every file, re-using what was cached and leaving no temporary behind."""
    manifest = Manifest.load(Store.open(str(local_store)), DATASET)
    cache = tmp_path / "cache"
    args = ["cache", "--store", str(local_store), "--dataset", DATASET, "--format", "png",
            "--cache", str(cache)]
    state = tmp_path / "kill-state"
    killed = agent(*args, env={**os.environ, "FORMATLAB_KILL_AT": f"{point}:{nth}",
                               "FORMATLAB_KILL_STATE": str(state)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert int((state / f"{point}.count").read_bytes()) == nth
    check_cached_format(cache, manifest, "png", complete=False)
    done = agent(*args)
    assert done.returncode == 0, done.stderr
    valid, temps = check_cached_format(cache, manifest, "png", complete=True)
    assert valid == sum(s.samples + 1 + len(s.files) for s in manifest.format("png").shards)
    assert temps == 0 and not [p for p in cache.rglob("*") if is_temp(p.name)]


# --------------------------------------------------------------------------- 7. fuzzed input

FUZZ_SEED = 20261201


def _mutations(raw: bytes, data: dict[str, Any], rng: Any, count: int) -> list[tuple[str, bytes]]:
    """Seeded damage to a manifest: truncations, byte flips, and fields deleted or given
    a value of the wrong type (at every depth)."""
    out: list[tuple[str, bytes]] = []
    paths: list[tuple] = []

    def walk(node: Any, path: tuple) -> None:
        paths.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for key, child in items:
            walk(child, (*path, key))

    walk(data, ())
    wrong = [None, 7, -1, 3.5, "x", "", [], {}, True, [1, "a"], {"k": 1}]
    for i in range(count):
        kind = ("truncate", "flip", "retype", "delete")[i % 4]
        if kind == "truncate":
            cut = int(rng.integers(0, len(raw)))
            out.append((f"truncate@{cut}", raw[:cut]))
        elif kind == "flip":
            buf = bytearray(raw)
            for pos in rng.integers(0, len(raw), size=int(rng.integers(1, 6))):
                buf[pos] = int(rng.integers(0, 256))
            out.append(("flip", bytes(buf)))
        else:
            path = paths[int(rng.integers(1, len(paths)))]
            copy = json.loads(raw)
            node = copy
            for key in path[:-1]:
                node = node[key]
            if kind == "delete":
                del node[path[-1]]
            else:
                node[path[-1]] = wrong[int(rng.integers(0, len(wrong)))]
            out.append((f"{kind} {'.'.join(map(str, path))}", json.dumps(copy).encode()))
    return out


def test_fuzzed_manifests_are_refused_or_read(local_store: Path) -> None:
    """400 seeded mutations of a real manifest: each is read (a harmless change) or
    refused with ManifestError naming the manifest or the field; nothing else escapes."""
    import numpy as np

    raw = (local_store / DATASET / MANIFEST_FILE).read_bytes()
    refused = 0
    for what, text in _mutations(raw, json.loads(raw), np.random.default_rng(FUZZ_SEED), 400):
        try:
            Manifest.from_json(text)
        except ManifestError as exc:
            refused += 1
            assert "\n" not in str(exc) and ("manifest" in str(exc)), (what, exc)
        except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
            raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from None
    assert refused > 300


def test_fuzzed_manifests_refused_by_the_cli(private_store: Path, tmp_path: Path) -> None:
    """Through ``node-agent cache`` (in-process): every mutation the parser refuses is
    exit 2 with one line naming the manifest, no traceback, nothing cached."""
    import numpy as np

    path = private_store / DATASET / MANIFEST_FILE
    raw = path.read_bytes()
    rng = np.random.default_rng(FUZZ_SEED + 1)
    tried = 0
    for what, text in _mutations(raw, json.loads(raw), rng, 60):
        try:
            Manifest.from_json(text)
            continue  # harmless: covered by the reading tests
        except ManifestError:
            pass
        path.write_bytes(text)
        cache = tmp_path / f"cache-{tried}"
        result = agent_in_process("cache", "--store", str(private_store), "--dataset",
                                  DATASET, "--format", "png", "--cache", str(cache))
        assert result.exit_code == 2, (what, result.output)
        line = one_error_line(result.stderr)
        assert "manifest" in line, (what, line)
        assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*")), what
        tried += 1
    assert tried > 30


def test_fuzzed_indexes_are_rewritten_by_a_rerun(small_archive: Path, tmp_path: Path) -> None:
    """Seeded damage to committed shard indexes (truncated, bytes flipped, wrong-typed
    columns): a re-run of the conversion treats each as uncommitted and rewrites that
    shard; the dataset ends exact."""
    import numpy as np

    store = tmp_path / "store"
    convert_inline(small_archive, str(store), "png,npy", 20)
    rng = np.random.default_rng(FUZZ_SEED + 2)
    indexes = sorted((store / DATASET).rglob(INDEX_FILE))
    (store / DATASET / MANIFEST_FILE).unlink()
    for i, index in enumerate(indexes):
        raw = index.read_bytes()
        kind = i % 3
        if kind == 0:
            index.write_bytes(raw[:int(rng.integers(0, len(raw)))])
        elif kind == 1:
            buf = bytearray(raw)
            for pos in rng.integers(0, len(raw), size=8):
                buf[pos] ^= 0xFF
            index.write_bytes(bytes(buf))
        else:
            table = pq.read_table(index)
            bad = table.set_column(0, "key", pa.array(range(len(table)), pa.int64()))
            pq.write_table(bad, index)
    convert_inline(small_archive, str(store), "png,npy", 20)
    manifest = Manifest.load(Store.open(str(store)), DATASET)
    for entry in manifest.format("png").shards + manifest.format("npy").shards:
        index = store / DATASET / entry.path / INDEX_FILE
        assert checksum_file(index) == entry.index_checksum
        keys = read_index(index).column("key").to_pylist()
        assert len(keys) == entry.samples and all(isinstance(k, str) for k in keys)
    assert sum(s.samples for s in manifest.splits) == 120


# --------------------------------------------------------------------------- 8. full disk


def test_full_store_disk_mid_conversion(small_fs: Callable[[str], Any],
                                        small_archive: Path) -> None:
    """The destination file system fills up during the conversion (a real 1 MiB tmpfs):
    exit 1 with one line saying so, no manifest, no index without its data; once it
    has room, the re-run completes exactly."""
    fs = small_fs("1m")
    store = fs.path / "store"
    argv = [sys.executable, CONVERT, "--source", "cifar10", "--src", str(small_archive),
            "--dst", str(store), "--formats", "bmp,png,npy,tiff", "--shard-samples", "20",
            "--address", "inline"]
    proc = run_process(argv, timeout=240)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and line.startswith("convert: error:"), proc.stderr
    assert "No space left" in line, line
    dataset = store / DATASET
    assert not (dataset / MANIFEST_FILE).exists()
    for index in dataset.rglob(INDEX_FILE):
        if ".staging" not in index.parts:
            table = read_index(index)
            if "file" in table.column_names:
                assert all((index.parent / f).is_file() for f in table.column("file").to_pylist())

    fs.resize("64m")
    done = run_process(argv, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = Manifest.load(Store.open(str(store)), DATASET)
    assert sum(s.samples for s in manifest.splits) == 120
    for f in manifest.formats:
        for entry in f.shards:
            assert checksum_file(dataset / entry.path / INDEX_FILE) == entry.index_checksum
    assert not (dataset / ".staging").exists()


def test_results_store_outage_mid_conversion(start_s3: Callable[[], Any], small_archive: Path,
                                             tmp_path: Path) -> None:
    """The S3 results store stops while the conversion runs: exit 1 with one line naming
    the results store, the dataset itself committed, no partial results file; the re-run
    against the restarted server completes (exit 0) with nothing left to convert, and
    delivers the rows the failed job held: exactly one job's rows, none lost."""
    server = start_s3()
    port = int(server.endpoint.rsplit(":", 1)[1])
    results = server.bucket("res") + "/results"
    store = tmp_path / "store"
    argv = [sys.executable, CONVERT, "--source", "cifar10", "--src", str(small_archive),
            "--dst", str(store), "--formats", "png,npy,bmp,tiff", "--shard-samples", "10",
            "--address", "inline", "--results", results]
    proc = subprocess.Popen(argv, cwd=REPO, env=server.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any((store / DATASET).rglob(INDEX_FILE)) if store.exists() else True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        server.stop()
        out, err = proc.communicate(timeout=240)
    finally:
        kill_group(proc)
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("convert: error:") and "Traceback" not in err, err
    assert "s3://res/results" in line, line
    assert server.secret not in out + err
    assert (store / DATASET / MANIFEST_FILE).exists()
    assert not list((server.root / "res").rglob("*.parquet"))
    restarted = start_s3_server(server.root, port)
    try:
        done = run_process(argv, env=restarted.env(), timeout=240)
    finally:
        restarted.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing converted" in done.stderr
    files = list((server.root / "res").rglob("*.parquet"))
    assert len(files) == 1, files
    rows = pd.read_parquet(files[0])
    assert set(rows["format"]) == {"png", "npy", "bmp", "tiff"} and rows["encode_time_s"].notna().all()
    assert not list((store / DATASET / PENDING_DIR).glob("*"))
