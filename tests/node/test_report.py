"""``node-agent report``: tables match the rows they come from, charts, recommendation."""

from __future__ import annotations

import contextlib
import io
import statistics
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

from node.cli import cli
from node.errors import UsageError
from node.report import (
    comparison_tables,
    failed_runs,
    format_size_table,
    load_results,
    recommend,
    report,
    summary_tables,
)
from shared.results import write_rows
from shared.storage import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAMPLES = 50_000
RAW_PER_SAMPLE = 32 * 32 * 3

# (dataset, loader, format) -> throughputs of the repeats. file/png on alpha has an
# outlier repeat: the median (900) differs from the mean and the max.
THROUGHPUT = {
    ("alpha", "file", "png"): [900.0, 5_000.0, 850.0],
    ("alpha", "file", "jpeg-q95"): [2_000.0, 2_200.0],
    ("alpha", "numpy_mmap", "npy"): [9_000.0],
    ("alpha", "hdf5", "hdf5"): [3_000.0],
    ("beta", "file", "png"): [400.0],
    ("beta", "numpy_mmap", "npy"): [6_000.0, 6_500.0, 7_000.0],
    ("beta", "hdf5", "hdf5"): [1_500.0],
}
# Bytes per sample of each format (both datasets, train split; the test split is 1/5).
BYTES_PER_SAMPLE = {"png": 2_200, "jpeg-q95": 1_100, "npy": 3_072, "hdf5": 3_100}
COMPRESSION = {"png": "deflate-6", "jpeg-q95": "q95", "npy": "none", "hdf5": "none"}


def _run_row(dataset: str, loader: str, fmt: str, throughput: float, repeat: int, *,
             status: str = "ok", mode: str = "train", error: str | None = None,
             step_ms: float | None = None) -> dict[str, Any]:
    epoch = SAMPLES / throughput
    return {
        "run_id": f"{dataset}-{loader}-{fmt}-{mode}-{status}-{repeat}",
        "started_at": datetime(2025, 1, 1, tzinfo=timezone.utc), "status": status,
        "error": error, "host": "node-1", "rank": 0, "world_size": 1, "dataset": dataset,
        "format": fmt, "loader": loader, "device": "cpu", "io_path": "host",
        "model": "convnet" if mode == "train" else f"emulated-{step_ms:g}ms",
        "epochs": 2, "batch_size": 256, "workers": 2, "image_size": 32,
        "samples_per_epoch": SAMPLES, "total_time_s": 2 * epoch + 1.0,
        "mean_epoch_time_s": epoch, "mean_epoch_data_time_s": epoch * 0.25,
        "data_wait_fraction": 0.25, "accelerator_utilization": 0.7,
        "throughput_img_s": throughput, "peak_ram_bytes": int(throughput * 100_000),
        "peak_vram_bytes": None, "cpu_util_mean_pct": 150.0 + repeat,
        "gpu_util_mean_pct": None, "val_accuracy": 0.30 + repeat / 100,
        "repeat": repeat, "mode": mode, "emulated_step_ms": step_ms,
    }


def _conversion_rows(job: str, dataset: str, fmt: str, finished: datetime,
                     scale: float = 1.0) -> list[dict[str, Any]]:
    rows = []
    for split, samples in (("train", SAMPLES), ("test", SAMPLES // 5)):
        nbytes = int(BYTES_PER_SAMPLE[fmt] * samples * scale)
        rows.append({"job_id": job, "finished_at": finished, "dataset": dataset,
                     "format": fmt, "split": split, "samples": samples, "rejects": 0,
                     "bytes": nbytes, "bytes_per_sample": nbytes / samples,
                     "ratio_to_raw": nbytes / (samples * RAW_PER_SAMPLE),
                     "encode_time_s": 1.0, "wall_time_s": 2.0, "images_per_s": 1.0,
                     "workers": 2, "bits": 8, "compression": COMPRESSION[fmt],
                     "image_size": 32})
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("results")
    st = Store.open(str(root))
    for (dataset, loader, fmt), values in THROUGHPUT.items():
        for repeat, value in enumerate(values):
            row = _run_row(dataset, loader, fmt, value, repeat)
            write_rows(st, "runs", [row], file_id=row["run_id"])
    failed = _run_row("alpha", "hdf5", "hdf5", 1e9, 7, status="failed",
                      error="OSError: unable to open shard-00001/images.h5\nsecond line")
    write_rows(st, "runs", [failed], file_id=failed["run_id"])
    bench = _run_row("alpha", "numpy_mmap", "npy", 40_000.0, 0, mode="bench", step_ms=5.0)
    write_rows(st, "runs", [bench], file_id=bench["run_id"])
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    for dataset in ("alpha", "beta"):
        rows = []
        for fmt in BYTES_PER_SAMPLE:
            rows += _conversion_rows(f"job-2-{dataset}", dataset, fmt, t0 + timedelta(hours=1))
        write_rows(st, "conversions", rows, file_id=f"job-2-{dataset}")
    # An older conversion of png on alpha, ten times larger: the report must ignore it.
    write_rows(st, "conversions", _conversion_rows("job-1-alpha", "alpha", "png", t0, 10.0),
               file_id="job-1-alpha")
    return st


def _runs(store: Store) -> pd.DataFrame:
    return load_results(store).runs


def test_comparison_numbers_are_medians_of_their_rows(store: Store) -> None:
    runs = _runs(store)
    tables = comparison_tables(runs)
    assert set(tables) >= {"throughput_img_s", "total_time_s", "mean_epoch_time_s",
                           "mean_epoch_data_time_s", "peak_ram_bytes", "peak_vram_bytes",
                           "gpu_util_mean_pct", "cpu_util_mean_pct", "val_accuracy"}
    throughput = tables["throughput_img_s"]
    assert list(throughput.columns) == ["alpha", "beta"]
    for (dataset, loader, fmt), values in THROUGHPUT.items():
        rows = [_run_row(dataset, loader, fmt, v, r) for r, v in enumerate(values)]
        for column in ("throughput_img_s", "mean_epoch_time_s", "peak_ram_bytes",
                       "val_accuracy", "cpu_util_mean_pct", "total_time_s"):
            expected = statistics.median(row[column] for row in rows)
            assert tables[column].loc[(loader, fmt), dataset] == pytest.approx(expected)
    assert throughput.loc[("file", "png"), "alpha"] == 900.0
    assert pd.isna(throughput.loc[("file", "jpeg-q95"), "beta"])  # never ran
    # The failed run's absurd throughput is nowhere in the figures.
    assert throughput.max().max() < 1e9
    wide = summary_tables(runs)["alpha"]
    assert wide.loc[("file", "png"), "repeats"] == 3
    assert wide.index[0] == ("numpy_mmap", "npy")  # fastest first


def test_failed_runs_listed_not_counted(store: Store) -> None:
    failed = failed_runs(_runs(store))
    assert list(failed["run_id"]) == ["alpha-hdf5-hdf5-train-failed-7"]
    assert failed["error"].iloc[0] == "OSError: unable to open shard-00001/images.h5"


def test_format_size_table_matches_latest_conversions(store: Store) -> None:
    conv = load_results(store).conversions
    sizes = format_size_table(conv).set_index(["dataset", "format"])
    assert len(sizes) == 8
    for dataset in ("alpha", "beta"):
        for fmt, per_sample in BYTES_PER_SAMPLE.items():
            latest = conv[(conv["dataset"] == dataset) & (conv["format"] == fmt)
                          & (conv["job_id"] == f"job-2-{dataset}")]
            row = sizes.loc[(dataset, fmt)]
            assert row["bytes"] == latest["bytes"].sum()
            assert row["samples"] == SAMPLES + SAMPLES // 5
            assert row["bytes_per_sample"] == pytest.approx(per_sample, rel=1e-6)
            assert row["ratio_to_raw"] == pytest.approx(per_sample / RAW_PER_SAMPLE, rel=1e-6)
            assert row["compression"] == COMPRESSION[fmt]
            assert row["bits"] == 8


def test_recommendation_picks_highest_median_and_respects_budget(store: Store) -> None:
    runs, conv = _runs(store), load_results(store).conversions
    recs = recommend(runs, conv, None)
    assert (recs["alpha"]["best"]["loader"], recs["alpha"]["best"]["format"]) == \
        ("numpy_mmap", "npy")
    assert recs["alpha"]["mode"] == "train"  # the faster bench run does not count
    assert recs["beta"]["best"]["throughput_img_s"] == 6_500.0
    assert recs["beta"]["best"]["bytes"] == BYTES_PER_SAMPLE["npy"] * (SAMPLES + SAMPLES // 5)
    assert recs["alpha"]["within_budget"] is None

    total = SAMPLES + SAMPLES // 5
    # npy and hdf5 do not fit; png (median 900) and jpeg-q95 (median 2,100) do:
    # jpeg-q95 wins, though one png repeat (5,000) was faster.
    budget = BYTES_PER_SAMPLE["png"] * total
    recs = recommend(runs, conv, budget)
    pick = recs["alpha"]["within_budget"]
    assert (pick["loader"], pick["format"]) == ("file", "jpeg-q95")
    assert pick["throughput_img_s"] == 2_100.0
    assert pick["bytes"] <= budget
    assert (recs["beta"]["within_budget"]["format"]) == "png"
    assert recommend(runs, conv, 1_000)["alpha"]["within_budget"] is None


@pytest.fixture(scope="module")
def reported(store: Store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One ``report`` over the store: its output folder and what it printed."""
    out = tmp_path_factory.mktemp("report")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report(results=store.url, out=str(out), max_bytes=10**12, storage_options=None)
    return out, buf.getvalue()


def test_charts_are_valid_pngs(reported: tuple[Path, str]) -> None:
    out, _ = reported
    for name in ("throughput.png", "data_wait.png", "format_size.png", "memory.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG_MAGIC, name
        assert len(blob) > 10_000, name


def test_report_prints_every_loader_and_writes_files(reported: tuple[Path, str]) -> None:
    out, printed = reported
    for loader in ("file", "numpy_mmap", "hdf5"):
        assert f"│ {loader} " in printed
    assert "unable to open shard-00001/images.h5" in printed
    assert "Fastest within" in printed
    for name in ("report.md", "recommendation.md", "format_sizes.md", "format_sizes.csv",
                 "summary_alpha.md", "summary_beta.csv", "comparison_throughput_img_s.md",
                 "comparison_throughput_img_s.csv", "bench.md", "failed_runs.md",
                 "runs_summary.csv"):
        assert (out / name).is_file(), name
    csv = pd.read_csv(out / "comparison_throughput_img_s.csv").set_index(["loader", "format"])
    assert csv.loc[("file", "png"), "alpha"] == 900.0
    sizes = pd.read_csv(out / "format_sizes.csv").set_index(["dataset", "format"])
    assert sizes.loc[("alpha", "png"), "bytes"] == BYTES_PER_SAMPLE["png"] * (SAMPLES
                                                                               + SAMPLES // 5)
    summary_md = (out / "summary_alpha.md").read_text()
    assert "| file | png | 3 | 900 [850–5,000] |" in summary_md
    assert "40,000" not in summary_md  # the bench run has its own table
    assert "| alpha | numpy_mmap | npy | 5 ms | 1 | 40,000 |" in (out / "bench.md").read_text()
    md = (out / "report.md").read_text()
    for chart in ("throughput.png", "data_wait.png", "format_size.png", "memory.png"):
        assert f"]({chart})" in md
    assert "Fastest measured" in md
    assert "`numpy_mmap` loader on `npy`" in (out / "recommendation.md").read_text()
    assert str(out.resolve() / "report.md") in printed  # where the files are


def test_cli_report(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["report", "--results", store.url, "--out", str(out),
                                      "--max-bytes", "1000"])
    assert result.exit_code == 0, result.output
    assert "none of the measured formats fits" in result.output
    assert (out / "throughput.png").read_bytes()[:8] == PNG_MAGIC


def test_empty_store_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no results in"):
        report(results=str(empty), out=str(tmp_path / "o"), max_bytes=None,
               storage_options=None)
    result = CliRunner().invoke(cli, ["report", "--results", str(empty), "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no results in" in lines[0]


def test_only_conversions_skips_run_charts(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    st = Store.open(str(tmp_path / "res"))
    write_rows(st, "conversions", _conversion_rows("j", "alpha", "png",
                                                   datetime(2025, 1, 1, tzinfo=timezone.utc)))
    report(results=st.url, out=str(tmp_path / "o"), max_bytes=None, storage_options=None)
    printed = capsys.readouterr().out
    assert "no successful runs" in printed
    assert (tmp_path / "o" / "format_size.png").is_file()
    assert not (tmp_path / "o" / "throughput.png").exists()


def test_runs_without_conversions_skip_format_size(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    st = Store.open(str(tmp_path / "res"))
    write_rows(st, "runs", [_run_row("alpha", "file", "png", 500.0, 0)])
    report(results=st.url, out=str(tmp_path / "o"), max_bytes=10**9, storage_options=None)
    printed = capsys.readouterr().out
    assert "format_size.png skipped" in printed
    assert "size unknown" in printed
    assert not (tmp_path / "o" / "format_size.png").exists()
    assert (tmp_path / "o" / "throughput.png").read_bytes()[:8] == PNG_MAGIC
