"""The report keeps unlike runs apart and names a winner only outside the noise.

Rows are real Parquet files in a real results store: older rows through
``shared.results.write_rows`` (today's schema), newer ones (with ``hardware_id``, the
wait percentiles and the other columns added since) written as Parquet directly, as a
newer node would, so old and new rows are read together.
"""

from __future__ import annotations

import contextlib
import io
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from node.report import load_results, recommend, recommendation_text, report, summarise
from shared.results import to_table, write_rows
from shared.storage import Store

SAMPLES = 10_000


def _row(run_id: str, *, host: str = "node-1", batch: int = 256, loader: str = "file",
         fmt: str = "png", rate: float = 1_000.0, wait: float = 0.05,
         **extra: Any) -> dict[str, Any]:
    epoch = SAMPLES / rate
    return {"run_id": run_id, "started_at": datetime(2025, 1, 1, tzinfo=timezone.utc),
            "status": "ok", "host": host, "rank": 0, "world_size": 1, "dataset": "alpha",
            "format": fmt, "loader": loader, "device": "cpu", "io_path": "host",
            "model": "convnet", "epochs": 2, "batch_size": batch, "workers": 2,
            "image_size": 32, "samples_per_epoch": SAMPLES, "total_time_s": 2 * epoch,
            "mean_epoch_time_s": epoch, "mean_epoch_data_time_s": epoch * wait,
            "data_wait_fraction": wait, "accelerator_utilization": 1 - wait,
            "throughput_img_s": rate, "peak_ram_bytes": 2**28, "cpu_util_mean_pct": 100.0,
            "val_accuracy": 0.8, "repeat": 0, "mode": "train", **extra}


def _write_new(store_root: Path, rows: list[dict[str, Any]]) -> None:
    """Rows with columns today's schema lacks, as one Parquet file each."""
    (store_root / "runs").mkdir(parents=True, exist_ok=True)
    for row in rows:
        pd.DataFrame([row]).to_parquet(store_root / "runs" / f"{row['run_id']}.parquet")


def _report(store: Store, out: Path) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report(results=store.url, out=str(out), max_bytes=None, storage_options=None)
    return buf.getvalue()


def _summary_and_settings(store: Store, out: Path) -> tuple[str, pd.DataFrame]:
    """The report's ``summary_alpha.md`` text and its settings table's numbers."""
    _report(store, out)
    return (out / "summary_alpha.md").read_text(), pd.read_csv(out / "settings.csv")


def test_two_hosts_two_batch_sizes_stay_four_groups(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "res"))
    rates = {("node-1", 64): [400, 420, 410], ("node-1", 256): [900, 950, 925],
             ("node-2", 64): [600, 610, 620], ("node-2", 256): [1_500, 1_520, 1_510]}
    for (host, batch), values in rates.items():
        for i, rate in enumerate(values):
            row = _row(f"{host}-{batch}-{i}", host=host, batch=batch, rate=rate, repeat=i)
            write_rows(store, "runs", [row], file_id=row["run_id"])
    summary = summarise(load_results(store).runs, "train")
    assert len(summary) == 4
    for (host, batch), values in rates.items():
        cell = summary[(summary["hardware"] == f"host {host}")
                       & (summary["batch_size"] == batch)]
        assert len(cell) == 1
        assert cell["repeats"].iloc[0] == 3
        assert cell["throughput_img_s"].iloc[0] == statistics.median(values)
        assert cell["mixes"].iloc[0] == "-"
    md, settings = _summary_and_settings(store, tmp_path / "out")
    # The varying settings are row labels: one line per (hardware, batch size).
    assert "| loader | format | hardware | batch_size | repeats |" in md
    assert "| file | png | host node-2 | 256 | 3 | 1,510 [1,500–1,520] |" in md
    assert sorted(zip(settings["hardware"], settings["batch_size"], strict=True)) == [
        ("host node-1", 64), ("host node-1", 256), ("host node-2", 64), ("host node-2", 256)]
    assert set(settings["steps_per_epoch"]) == {-(-SAMPLES // 64), -(-SAMPLES // 256)}
    recs = recommend(load_results(store).runs, load_results(store).conversions)
    assert len(recs) == 4  # one comparison per cell, never across them
    assert "alpha [hardware host node-2, batch_size 256]" in recs


def test_cells_that_mix_hosts_say_so(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "res"))
    write_rows(store, "runs", [_row("old", host="node-9", fmt="npy", loader="numpy_mmap")],
               file_id="old")  # an older row: no hardware_id, grouped by its host
    new = {"hardware_id": "hw-abc", "ram_kind": "pss", "cold_requested": False,
           "time_to_first_batch_s": 0.25, "batch_wait_p50_s": 0.001,
           "batch_wait_p95_s": 0.004, "batch_wait_p99_s": 0.009, "batch_wait_max_s": 0.02,
           "io_path_evidence": "CPU loader: POSIX reads", "cold_epochs": 0, "cpu_budget": 2,
           "peak_ram_anon_bytes": 100 * 2**20, "peak_ram_file_bytes": 50 * 2**20}
    _write_new(tmp_path / "res", [
        _row("a0", host="node-1", rate=1_000, **new), _row("a1", host="node-2", rate=1_010,
                                                          **new),
        _row("a2", host="node-1", rate=990, epochs=3, **new)])
    (tmp_path / "res" / "epochs").mkdir()
    pd.DataFrame([{"run_id": f"a{i}", "epoch": e, "read_time_s": 0.5 + 0.2 * e,
                   "decode_time_s": 1.0, "h2d_time_s": None}
                  for i in range(3) for e in range(2)]).to_parquet(
        tmp_path / "res" / "epochs" / "new.parquet")  # per-stage times, per epoch
    summary = summarise(load_results(store).runs, "train")
    assert len(summary) == 2
    shared = summary[summary["hardware"] == "hw-abc"].iloc[0]
    assert shared["repeats"] == 3 and shared["hosts"] == 2
    assert shared["mixes"] == "hosts node-1, node-2; epochs 2, 3"
    old = summary[summary["hardware"] == "host node-9"].iloc[0]
    assert old["mixes"] == "-" and old["ram_kind"] == "-"
    out = tmp_path / "out"
    _report(store, out)
    md = (out / "summary_alpha.md").read_text()
    assert "hosts node-1, node-2; epochs 2, 3" in md
    detail = (out / "detail_alpha.md").read_text()
    assert "| 0.250 s |" in detail and "CPU loader: POSIX reads" in detail
    assert "| pss | 100.0 MiB | 50.0 MiB | - | warm | 0 of 2 |" in detail
    assert "| 0.600 s | 1.00 s | - |" in detail  # read, decode (mean per epoch), no h2d


def _options(store: Store, spec: dict[tuple[str, str], tuple[list[float], float]]) -> None:
    for (loader, fmt), (rates, wait) in spec.items():
        for i, rate in enumerate(rates):
            row = _row(f"{loader}-{fmt}-{i}", loader=loader, fmt=fmt, rate=rate, wait=wait,
                       repeat=i)
            write_rows(store, "runs", [row], file_id=row["run_id"])


def test_overlapping_spreads_name_no_winner(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "res"))
    _options(store, {("file", "png"): ([480, 515, 363], 0.07),
                     ("file", "bmp"): ([500, 470, 430], 0.05),
                     ("numpy_mmap", "npy"): ([450, 490, 505], 0.02)})
    runs = load_results(store).runs
    rec = recommend(runs, load_results(store).conversions)["alpha"]
    assert rec["winner"] is None and not rec["decided"]
    assert {(o["loader"], o["format"]) for o in rec["equivalent"]} == {
        ("file", "png"), ("file", "bmp"), ("numpy_mmap", "npy")}
    text = "\n".join(recommendation_text({"alpha": rec}, load_results(store).conversions,
                                         runs))
    assert "**Bottleneck: the model.**" in text
    assert "**No single winner**" in text and "**Winner" not in text
    assert "GPU loaders" in text and "cold epochs (`--cold`): not run" in text


def test_clearly_faster_data_bound_loader_is_named_with_margin(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "res"))
    _options(store, {("numpy_mmap", "npy"): ([9_000, 9_100, 9_200], 0.04),
                     ("file", "png"): ([3_000, 3_100, 3_050], 0.60)})
    rec = recommend(load_results(store).runs, load_results(store).conversions)["alpha"]
    assert (rec["winner"]["loader"], rec["winner"]["format"]) == ("numpy_mmap", "npy")
    assert rec["margin"] == pytest.approx(9_100 / 3_050 - 1)
    text = "\n".join(recommendation_text({"alpha": rec}, load_results(store).conversions))
    assert "**Winner: `numpy_mmap` on `npy`**, +198% throughput over the next" in text
    assert "**Bottleneck: data loading**" in text and "`file` on `png` (60.0 %)" in text


def test_too_few_repeats_decide_nothing(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "res"))
    _options(store, {("numpy_mmap", "npy"): ([9_000, 9_100], 0.3),
                     ("file", "png"): ([3_000, 3_100], 0.6)})
    rec = recommend(load_results(store).runs, load_results(store).conversions)["alpha"]
    assert rec["winner"] is None
    text = "\n".join(recommendation_text({"alpha": rec}, load_results(store).conversions))
    assert "**No decided winner**" in text and "fewer than 3 runs each (2 and 2)" in text


def test_cached_and_streamed_runs_stay_two_groups(tmp_path: Path) -> None:
    """``data_access`` splits groups; rows without it say ``--no-cache`` in their config."""
    store = Store.open(str(tmp_path / "res"))
    for row in (_row("c0", fmt="wds-png", loader="packed", rate=2_000, data_access="cache"),
                _row("s0", fmt="wds-png", loader="packed", rate=700, data_access="stream")):
        write_rows(store, "runs", [row], file_id=row["run_id"])
    # Files written before the column: the flag is in the config JSON, or absent (cache).
    for row in (_row("c1", fmt="wds-png", loader="packed", rate=2_100,
                     config={"loader": "packed"}),
                _row("s1", fmt="wds-png", loader="packed", rate=800,
                     config={"no_cache": True, "loader": "packed"})):
        pq.write_table(to_table("runs", [row]).drop_columns(["data_access"]),
                       tmp_path / "res" / "runs" / f"{row['run_id']}.parquet")
    summary = summarise(load_results(store).runs, "train").set_index("data_access")
    assert sorted(summary.index) == ["cache", "stream"]
    assert summary.loc["cache", "repeats"] == summary.loc["stream", "repeats"] == 2
    assert summary.loc["cache", "throughput_img_s"] == statistics.median([2_000, 2_100])
    assert summary.loc["stream", "throughput_img_s"] == statistics.median([700, 800])
    md, settings = _summary_and_settings(store, tmp_path / "out")
    assert "| loader | format | data_access | repeats |" in md
    assert "| packed | wds-png | stream | 2 | 750 [700–800] |" in md
    assert sorted(settings["data_access"]) == ["cache", "stream"]
