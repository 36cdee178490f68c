"""Old (schema_version 1) and new (3) result rows read together with pandas and DuckDB.

A version-1 file is written with the version-1 column set (the new columns absent, as
files written before them are), then a current one into the same table folder.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.results import EPOCHS, RUNS, SCHEMA_VERSION, data_access, read_table, write_rows
from shared.storage import Store

# Columns schema version 2 added (measure): absent from version-1 files.
V2_RUNS = ["ram_kind", "vram_kind", "peak_ram_anon_bytes", "peak_ram_file_bytes", "cpu_budget",
           "loader_threads", "loader_processes", "io_path_evidence", "cold_requested",
           "cold_epochs", "hardware_id", "time_to_first_batch_s", "batch_wait_p50_s",
           "batch_wait_p95_s", "batch_wait_p99_s", "batch_wait_max_s"]
V3_RUNS = ["data_access"]  # schema version 3: cached or streamed
V2_EPOCHS = ["time_to_first_batch_s", "batch_wait_p50_s", "batch_wait_p95_s",
             "batch_wait_p99_s", "batch_wait_max_s", "read_time_s", "decode_time_s",
             "h2d_time_s", "peak_ram_anon_bytes", "peak_ram_file_bytes"]
OLD_AND_NEW = {"runs": (RUNS, V2_RUNS + V3_RUNS, {"run_id": "new", "status": "ok",
                                                   "cold_epochs": 3, "ram_kind": "pss",
                                                   "batch_wait_p99_s": 0.25,
                                                   "data_access": "stream"}),
               "epochs": (EPOCHS, V2_EPOCHS, {"run_id": "new", "epoch": 0, "cold": True,
                                              "batch_wait_p99_s": 0.25})}


def write_v1(root: Path, table: str) -> None:
    schema, added, _ = OLD_AND_NEW[table]
    old = pa.schema([f for f in schema if f.name not in added])
    row = {"run_id": "old", "schema_version": 1, "status": "ok", "epoch": 0, "cold": True}
    data = pa.Table.from_pydict({n: [row.get(n)] for n in old.names}, schema=old)
    (root / table).mkdir(parents=True, exist_ok=True)
    pq.write_table(data, root / table / "0-old.parquet")


@pytest.mark.parametrize("table", ["runs", "epochs"])
def test_old_and_new_rows_read_together(table: str, tmp_path: Path) -> None:
    root = tmp_path / "results"
    write_v1(root, table)
    store = Store.open(str(root))
    write_rows(store, table, [OLD_AND_NEW[table][2]], file_id="1-new")

    frame = read_table(store, table).set_index("run_id")
    assert frame.loc["old", "schema_version"] == 1
    assert frame.loc["new", "schema_version"] == SCHEMA_VERSION == 3
    assert pd.isna(frame.loc["old", "batch_wait_p99_s"])
    assert frame.loc["new", "batch_wait_p99_s"] == 0.25
    if table == "runs":
        assert pd.isna(frame.loc["old", "data_access"])
        assert frame.loc["new", "data_access"] == "stream"

    # pandas straight on the folder takes the first file's columns (here the old ones),
    # so it is given the current schema; old files' missing columns come back null.
    schema = OLD_AND_NEW[table][0]
    direct = pd.read_parquet(root / table, schema=schema).set_index("run_id")
    assert set(direct.index) == {"old", "new"} and set(OLD_AND_NEW[table][1]) <= set(direct)
    assert direct.loc["new", "batch_wait_p99_s"] == 0.25
    assert pd.isna(direct.loc["old", "batch_wait_p99_s"])

    # DuckDB: union_by_name, or the first file's columns would be used for all.
    got = duckdb.connect().execute(
        f"select run_id, schema_version, batch_wait_p99_s from read_parquet("
        f"'{root}/{table}/*.parquet', union_by_name = true) order by run_id").fetchall()
    assert got == [("new", SCHEMA_VERSION, 0.25), ("old", 1, None)]


@pytest.mark.parametrize(("config", "expected"), [
    ({"no_cache": True}, "stream"), ('{"no_cache": true, "loader": "packed"}', "stream"),
    ({"no_cache": False}, "cache"), ('{"loader": "file"}', "cache"), (None, "cache"),
    ("not json", "cache")])
def test_data_access_from_config(config: object, expected: str) -> None:
    """Rows from before the column: ``--no-cache`` recorded in the config means stream."""
    assert data_access(config) == expected  # type: ignore[arg-type]


def test_a_run_row_without_data_access_takes_it_from_its_config(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "results"))
    write_rows(store, "runs", [{"run_id": "s", "config": {"no_cache": True}},
                               {"run_id": "c", "config": {"no_cache": False}},
                               {"run_id": "x", "config": {"no_cache": True},
                                "data_access": "cache"}])  # a writer's own value stands
    frame = read_table(store, "runs").set_index("run_id")
    assert frame["data_access"].to_dict() == {"s": "stream", "c": "cache", "x": "cache"}
