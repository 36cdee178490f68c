"""``report.html`` in a real browser: every table and chart is there and every chart loads.

Renders the file in headless Chromium (Debian's ``chromium`` package) and reads the DOM
back after the page's load event; skipped only where no Chromium is installed.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from node.report import report
from node.report.charts import CHART_NAMES, draw_charts, pareto_front
from shared.results import TABLES, write_rows
from shared.storage import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Stamps each image's decoded width on it once the page has loaded, for --dump-dom.
PROBE = ("<script>window.addEventListener('load', () => { for (const img of document.images)"
         " img.setAttribute('data-width', img.naturalWidth); });</script>")


def _store(root: Path) -> Store:
    store = Store.open(str(root))
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    sizes = {"png": 2_000, "jpeg-q95": 900, "npy": 3_072}
    for fmt, loader, rate, acc in (("png", "file", 800.0, 0.81), ("jpeg-q95", "file", 900.0,
                                                                  0.80),
                                   ("npy", "numpy_mmap", 700.0, 0.81)):
        for i in range(3):
            row = {"run_id": f"{fmt}-{i}", "started_at": t0, "status": "ok", "host": "n1",
                   "rank": 0, "world_size": 1, "dataset": "alpha", "format": fmt,
                   "loader": loader, "device": "cpu", "io_path": "host", "model": "convnet",
                   "epochs": 2, "batch_size": 64, "workers": 2, "image_size": 32,
                   "samples_per_epoch": 1_000, "mean_epoch_time_s": 1_000 / rate,
                   "data_wait_fraction": 0.05, "accelerator_utilization": 0.9,
                   "throughput_img_s": rate + 10 * i, "peak_ram_bytes": 2**28 + i,
                   "cpu_util_mean_pct": 100.0, "val_accuracy": acc, "mode": "train",
                   "repeat": i}
            write_rows(store, "runs", [row], file_id=row["run_id"])
    rows = [{"job_id": "j", "finished_at": t0, "dataset": "alpha", "format": fmt,
             "split": "train", "samples": 1_000, "rejects": 0, "bytes": per * 1_000,
             "bytes_per_sample": float(per), "ratio_to_raw": per / 3_072, "bits": 8,
             "compression": fmt, "image_size": 32,
             "psnr_db": 41.5 if fmt == "jpeg-q95" else None,
             "ssim": 0.987 if fmt == "jpeg-q95" else None} for fmt, per in sizes.items()]
    (root / "conversions").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / "conversions" / "j.parquet")  # with the new columns
    return store


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", *args],
            text=True, capture_output=True, timeout=120)


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(10.0, 100.0), (5.0, 50.0), (20.0, 90.0), (30.0, 300.0), (5.0, 40.0)]
    assert pareto_front(points) == [1, 0, 3]


def test_format_size_panels_share_one_scale_type(tmp_path: Path) -> None:
    """One dataset spans decades (npy vs jpeg-q10), the other not: both panels are log."""
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    rows = [{"job_id": "j", "finished_at": t0, "dataset": ds, "format": fmt, "split": "train",
             "samples": 10, "bytes": per * 10, "bytes_per_sample": float(per),
             "ratio_to_raw": per / 3_072, "bits": 8, "compression": fmt, "image_size": 32}
            for ds, fmt, per in (("a", "npy", 3_072), ("a", "jpeg-q10", 60),
                                 ("b", "npy", 3_072), ("b", "png", 2_500))]
    import matplotlib.axes

    scales = []
    original = matplotlib.axes.Axes.set_yscale

    def record(self: matplotlib.axes.Axes, value: str, **kw: object) -> None:
        scales.append(value)
        original(self, value, **kw)

    matplotlib.axes.Axes.set_yscale = record  # type: ignore[method-assign]
    try:
        no_runs = TABLES["runs"].empty_table().to_pandas()
        written = draw_charts(no_runs, pd.DataFrame(rows), tmp_path)
    finally:
        matplotlib.axes.Axes.set_yscale = original  # type: ignore[method-assign]
    assert [p.name for p in written] == ["format_size.png"]
    assert scales == ["log", "log"]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium cannot be installed here: no chromium "
                    "on PATH (Debian: apt-get install chromium)")
def test_report_html_shows_every_table_and_chart(tmp_path: Path) -> None:
    store = _store(tmp_path / "res")
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        report(results=store.url, out=str(out), max_bytes=None, storage_options=None)
    html_path = out / "report.html"
    assert f"report to share (one file): {html_path.resolve()}" in printed.getvalue()
    page = html_path.read_text()
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    proc = _chromium("--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    stems = {p.stem for p in out.glob("*.csv")} - {"runs_summary"}
    assert {"settings", "summary_alpha", "detail_alpha", "format_sizes"} <= stems
    assert set(re.findall(r'data-table="([^"]+)"', dom)) == stems
    charts = dict(re.findall(r'data-chart="([^"]+)"[^>]*data-width="(\d+)"', dom))
    assert set(charts) == set(CHART_NAMES)
    assert all(int(width) > 100 for width in charts.values()), charts  # decoded images
    assert "Winner: <code>file</code> on <code>jpeg-q95</code>" in dom
    assert "What was and was not measured" in dom and "no streaming runs measured" in dom
    assert "41.5 dB" in dom and "0.9870" in dom  # PSNR / SSIM in the size table
    shot = tmp_path / "report.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1400,2400", html_path.as_uri())
    assert proc.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG"
