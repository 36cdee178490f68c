"""shared.results: schemas, one new file per write, concurrent writers (local and S3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from shared.results import CONVERSIONS, EPOCHS, RUNS, SCHEMA_VERSION, TABLES, read_table, write_rows
from shared.storage import Store, register_secret

REPO = Path(__file__).resolve().parents[2]

SAMPLE_ROWS = {
    "runs": [{"run_id": "r1", "started_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
              "finished_at": datetime(2026, 1, 1, 0, 5, tzinfo=timezone.utc),
              "status": "ok", "host": "gpu01", "rank": 0, "world_size": 2,
              "dataset": "cifar10", "format": "npy", "loader": "numpy_mmap", "epochs": 2,
              "throughput_img_s": 1234.5, "fits_in_ram": True,
              "config": {"batch_size": 64}, "versions": {"torch": "2.14.1"}}],
    "epochs": [{"run_id": "r1", "epoch": e, "cold": e == 0, "epoch_time_s": 1.5 + e,
                "samples": 1000} for e in range(3)],
    "conversions": [{"job_id": "j1", "dataset": "cifar10", "format": f, "split": "train",
                     "samples": 10, "bytes": 1000, "finished_at": datetime.now(timezone.utc)}
                    for f in ("png", "npy")],
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_write_and_read_each_table(table: str, tmp_path: Path) -> None:
    url = str(tmp_path / "results")
    store = Store.open(url)
    rel = write_rows(store, table, SAMPLE_ROWS[table])
    assert rel.startswith(f"{table}/") and rel.endswith(".parquet")
    assert store.walk_files() == [rel]

    frame = pd.read_parquet(url + "/" + table)
    assert list(frame.columns) == TABLES[table].names
    assert len(frame) == len(SAMPLE_ROWS[table])
    assert (frame["schema_version"] == SCHEMA_VERSION).all()
    assert pq.read_schema(tmp_path / "results" / rel).remove_metadata().equals(
        TABLES[table].remove_metadata())

    con = duckdb.connect()
    count = con.execute(
        f"select count(*) from read_parquet('{url}/{table}/*.parquet')").fetchone()[0]
    assert count == len(SAMPLE_ROWS[table])
    assert read_table(store, table).shape == frame.shape


def test_values_and_json_columns(tmp_path: Path) -> None:
    url = str(tmp_path / "results")
    store = Store.open(url)
    write_rows(store, "runs", SAMPLE_ROWS["runs"])
    row = pd.read_parquet(url + "/runs").iloc[0]
    assert row["host"] == "gpu01" and row["throughput_img_s"] == 1234.5
    assert json.loads(row["config"]) == {"batch_size": 64}
    assert row["started_at"] == pd.Timestamp("2026-01-01", tz="UTC")
    assert pd.isna(row["val_f1"])
    con = duckdb.connect()
    assert con.execute(f"select loader, epochs from read_parquet('{url}/runs/*.parquet')"
                       ).fetchall() == [("numpy_mmap", 2)]


def test_appends_new_files_only(tmp_path: Path) -> None:
    url = str(tmp_path / "results")
    store = Store.open(url)
    first = write_rows(store, "runs", [{"run_id": "a"}], file_id="same")
    before = (tmp_path / "results" / first).read_bytes()
    second = write_rows(store, "runs", [{"run_id": "b"}], file_id="same")
    third = write_rows(store, "runs", [{"run_id": "c"}])
    assert len({first, second, third}) == 3
    assert (tmp_path / "results" / first).read_bytes() == before
    assert sorted(pd.read_parquet(url + "/runs")["run_id"]) == ["a", "b", "c"]
    assert not [p for p in (tmp_path / "results" / "runs").iterdir() if p.name.startswith(".")]


def test_unknown_column_is_an_error(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "results"))
    with pytest.raises(ValueError, match="throughput"):
        write_rows(store, "runs", [{"run_id": "x", "throughput": 1.0}])
    with pytest.raises(ValueError, match="bogus"):
        write_rows(store, "epochs", [{"run_id": "x", "epoch": 0}, {"bogus": 1}])
    assert store.walk_files() == []


def test_empty_table_reads_with_columns(tmp_path: Path) -> None:
    frame = read_table(Store.open(str(tmp_path / "none")), "epochs")
    assert list(frame.columns) == EPOCHS.names and len(frame) == 0


def test_error_column_is_redacted(tmp_path: Path) -> None:
    unregistered = "u-" + uuid.uuid4().hex
    registered = "r-" + uuid.uuid4().hex
    register_secret(registered)
    url = str(tmp_path / "results")
    store = Store.open(url)
    error = (f"StorageError: cannot read s3://AKIAEXAMPLE:{unregistered}@bucket/x "
             f"(key {registered}) https://h/o?X-Amz-Signature={unregistered}")
    write_rows(store, "runs", [{"run_id": "e", "status": "failed", "error": error}])
    stored = pd.read_parquet(url + "/runs")["error"].iloc[0]
    assert unregistered not in stored and registered not in stored
    assert "cannot read s3://***@bucket/x" in stored


def test_schemas_carry_design_columns() -> None:
    for name in ("run_id", "status", "error", "io_path", "data_wait_fraction",
                 "accelerator_utilization", "throughput_img_s", "bytes_read",
                 "disk_read_bytes", "peak_vram_bytes", "val_f1", "fits_in_ram", "hardware",
                 "repeat"):
        assert name in RUNS.names
    for name in ("epoch", "cold", "data_time_s", "compute_time_s", "train_loss"):
        assert name in EPOCHS.names
    for name in ("job_id", "bytes_per_sample", "ratio_to_raw", "encode_time_s",
                 "images_per_s", "workers"):
        assert name in CONVERSIONS.names
    for schema in TABLES.values():
        assert schema.field("schema_version").type == "int32"


# --------------------------------------------------------------------------- concurrency

WRITER = """
import pathlib, sys, time
from shared.results import write_rows
from shared.storage import Store, parse_storage_options
url, options, writer, nfiles, sync = sys.argv[1:6]
store = Store.open(url, parse_storage_options(options))
sync = pathlib.Path(sync)
(sync / f"ready-{writer}").touch()
deadline = time.monotonic() + 60
while not (sync / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.002)
for i in range(int(nfiles)):
    run_id = f"{writer}-{i}"
    write_rows(store, "runs", [{"run_id": run_id, "host": writer, "rank": i}])
    write_rows(store, "epochs", [{"run_id": run_id, "epoch": e} for e in range(3)])
"""


def run_writers(url: str, writers: int, files_each: int, sync: Path,
                env: dict[str, str] | None = None, options: str = "",
                per_writer: Callable[[int], tuple[dict[str, str] | None, str]] | None = None,
                ) -> None:
    """Start ``writers`` processes, release them at once, and wait for all.

    ``per_writer(n)`` gives writer ``n`` its own environment and storage options.
    """
    sync.mkdir(parents=True, exist_ok=True)
    setups = [per_writer(n) if per_writer else (env, options) for n in range(writers)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, opts, f"w{n}",
                               str(files_each), str(sync)], cwd=REPO, env=penv,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for n, (penv, opts) in enumerate(setups)]
    try:
        deadline = time.monotonic() + 60
        while len(list(sync.glob("ready-*"))) < writers:
            assert time.monotonic() < deadline, "writers did not start"
            for proc in procs:
                if proc.poll() not in (None, 0):
                    pytest.fail(proc.stdout.read().decode())
            time.sleep(0.01)
        (sync / "go").touch()
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def expected_ids(writers: int, files_each: int) -> list[str]:
    return sorted(f"w{n}-{i}" for n in range(writers) for i in range(files_each))


def test_two_processes_local(tmp_path: Path) -> None:
    url = str(tmp_path / "results")
    run_writers(url, 2, 3, tmp_path / "sync")
    runs = pd.read_parquet(url + "/runs")
    assert sorted(runs["run_id"]) == expected_ids(2, 3)
    epochs = pd.read_parquet(url + "/epochs")
    assert len(epochs) == 2 * 3 * 3
    files = sorted((tmp_path / "results" / "runs").iterdir())
    assert len(files) == 6 and all(not f.name.startswith(".") for f in files)
    for f in files:
        assert pq.read_table(f).num_rows == 1
    assert duckdb.connect().execute(
        f"select count(*) from read_parquet('{url}/epochs/*.parquet')").fetchone()[0] == 18


def test_eight_processes_local(tmp_path: Path) -> None:
    url = str(tmp_path / "results")
    run_writers(url, 8, 5, tmp_path / "sync")
    runs = pd.read_parquet(url + "/runs")
    assert sorted(runs["run_id"]) == expected_ids(8, 5)
    assert len(list((tmp_path / "results" / "runs").iterdir())) == 40
    assert len(pd.read_parquet(url + "/epochs")) == 8 * 5 * 3


def test_two_processes_s3(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    url = s3_bucket + "/results"
    env = s3_server.env()  # credentials from the AWS environment only
    run_writers(url, 2, 3, tmp_path / "sync", env=env)
    options = s3_server.storage_options
    runs = pd.read_parquet(url + "/runs", storage_options=options)
    assert sorted(runs["run_id"]) == expected_ids(2, 3)
    assert len(pd.read_parquet(url + "/epochs", storage_options=options)) == 2 * 3 * 3
    store = Store.open(url, options)
    files = store.walk_files("runs")
    assert len(files) == 6
    for rel in files:
        assert pq.read_table(store.open_file(rel, "rb")).num_rows == 1
    assert sorted(read_table(store, "runs")["run_id"]) == expected_ids(2, 3)


def test_eight_processes_s3(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    """Eight writers released at once into one S3 results store; half take their
    credentials from the AWS environment, half from --storage-options."""
    url = s3_bucket + "/results"
    options = json.dumps(s3_server.storage_options)
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare.update(AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
                AWS_REQUEST_CHECKSUM_CALCULATION="when_required")
    run_writers(url, 8, 3, tmp_path / "sync",
                per_writer=lambda n: (s3_server.env(), "") if n % 2 else (bare, options))
    so = s3_server.storage_options
    assert sorted(pd.read_parquet(url + "/runs", storage_options=so)["run_id"]) == \
        expected_ids(8, 3)
    assert len(pd.read_parquet(url + "/epochs", storage_options=so)) == 8 * 3 * 3
    store = Store.open(url, so)
    for table, rows in (("runs", 1), ("epochs", 3)):
        files = store.walk_files(table)
        assert len(files) == 8 * 3, files
        for rel in files:  # every file whole and readable on its own
            assert rel.endswith(".parquet") and not rel.rsplit("/", 1)[1].startswith(".")
            assert pq.read_table(store.open_file(rel, "rb")).num_rows == rows
