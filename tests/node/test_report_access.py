"""Cache then train against stream from the store, packed formats and peers in the report.

Rows are real Parquet files written through ``shared.results.write_rows`` into a real
results store: runs and their epochs, as a node writes them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from test_report_groups import _report, _row

from node.report import draw_charts, load_results, recommend, recommendation_text
from node.report.charts import POINT_STYLES
from shared.results import write_rows
from shared.storage import Store


def _run(store: Store, run_id: str, epochs: list[float], **row: Any) -> None:
    """One run row and one epochs row per entry of ``epochs`` (seconds)."""
    samples = 10_000
    write_rows(store, "runs", [_row(run_id, epochs=len(epochs),
                                    rate=samples / min(epochs), **row)], file_id=run_id)
    write_rows(store, "epochs", [{"run_id": run_id, "epoch": i, "epoch_time_s": t,
                                  "samples": samples, "throughput_img_s": samples / t}
                                 for i, t in enumerate(epochs)], file_id=run_id)


def test_cache_time_beside_first_and_best_epoch(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "res"))
    packed = {"loader": "packed", "fmt": "wds-jpeg-q95"}
    _run(store, "c0", [2.0, 1.5, 1.25], cache_time_s=3.0, data_access="cache", **packed)
    _run(store, "c1", [2.5, 1.0, 1.75], cache_time_s=4.0, data_access="cache", **packed)
    _run(store, "s0", [4.0, 3.0, 3.5], cache_time_s=0.25, data_access="stream", **packed)
    out = tmp_path / "out"
    printed = _report(store, out)

    numbers = pd.read_csv(out / "access_alpha.csv").set_index("data_access")
    assert numbers.loc["cache", "repeats"] == 2 and numbers.loc["stream", "repeats"] == 1
    assert numbers.loc["cache", "cache_time_s"] == 3.5  # median of 3.0 and 4.0
    assert numbers.loc["cache", "first_epoch_time_s"] == 2.25  # epoch 0: 2.0, 2.5
    assert numbers.loc["cache", "best_epoch_time_s"] == 1.125  # shortest: 1.25, 1.0
    assert numbers.loc["cache", "cache_then_first_s"] == 5.75  # 3 + 2, 4 + 2.5
    assert numbers.loc["stream", "first_epoch_time_s"] == 4.0
    assert numbers.loc["stream", "best_epoch_time_s"] == 3.0
    assert numbers.loc["stream", "cache_then_first_s"] == 4.25
    md = (out / "access_alpha.md").read_text()
    assert ("| loader | format | access | repeats | cache s | epoch 1 s | both s | best s "
            "| img/s |") in md
    assert ("| packed | wds-jpeg-q95 | cache | 2 | 3.50 s [3.00–4.00 s] "
            "| 2.25 s [2.00–2.50 s] | 5.75 s [5.00–6.50 s] | 1.12 s [1.00–1.25 s] |") in md
    assert "| packed | wds-jpeg-q95 | stream | 1 | 0.250 s | 4.00 s | 4.25 s | 3.00 s |" in md
    # The terminal's table is medians only, so it stays readable at 100 columns.
    terminal = printed[printed.index("cache to local disk then train"):]
    assert all(len(line.rstrip()) <= 100 for line in terminal.splitlines()[:8]), terminal[:900]


def test_recommendation_weighs_streamed_packed_and_peers(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "res"))
    packed = {"loader": "packed", "fmt": "wds-jpeg-q95"}
    for i in range(3):
        _run(store, f"c{i}", [2.0 + i / 10, 1.0, 1.1], cache_time_s=3.0, **packed)
        _run(store, f"s{i}", [2.5 + i / 10, 2.0, 2.1], cache_time_s=0.1,
             config={"no_cache": True}, **packed)  # streamed, told by the config alone
        _run(store, f"f{i}", [0.5, 0.4 + i / 100, 0.45], loader="ffcv", fmt="ffcv-jpeg")
    data = load_results(store)
    recs = recommend(data.runs, data.conversions)
    assert list(recs) == ["alpha"]  # cached and streamed runs are options of one cell
    options = {(o["loader"], o["format"], o["data_access"]) for o in recs["alpha"]["options"]}
    assert options == {("packed", "wds-jpeg-q95", "cache"), ("packed", "wds-jpeg-q95", "stream"),
                       ("ffcv", "ffcv-jpeg", "cache")}
    text = "\n".join(recommendation_text(recs, data.conversions, data.runs))
    assert "**Winner: `ffcv` on `ffcv-jpeg` (peer)**" in text
    assert ("- **Cache or stream** (`packed` on `wds-jpeg-q95`): cache then train 3.00 s fill "
            "+ 2.10 s first epoch = 5.10 s, best epoch 1.00 s; stream 2.60 s first epoch, best "
            "epoch 2.00 s: streaming ends the first epoch sooner.") in text
    assert ("- **Packed, streaming, peers**: measured packed formats (wds-jpeg-q95); streaming "
            "runs (packed on wds-jpeg-q95); peer loaders (ffcv).") in text


def test_recommendation_says_which_kinds_have_no_runs(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "res"))
    for i in range(2):
        _run(store, f"p{i}", [2.0, 1.0], loader="file", fmt="png")
    data = load_results(store)
    text = "\n".join(recommendation_text(recommend(data.runs, data.conversions),
                                         data.conversions, data.runs))
    assert ("- **Packed, streaming, peers**: no packed-format runs measured (wds-*: convert "
            "with --formats packed); no streaming runs measured (`--no-cache`); no peer-loader "
            "runs measured (benchmarks/peers.py --results).") in text
    assert "Cache or stream" not in text


def test_size_chart_marks_streamed_runs_and_peers(tmp_path: Path) -> None:
    import matplotlib.axes

    store = Store.open(str(tmp_path / "res"))
    _run(store, "c0", [2.0, 1.0], loader="packed", fmt="wds-png")
    _run(store, "s0", [3.0, 2.0], loader="packed", fmt="wds-png", data_access="stream")
    _run(store, "f0", [0.5, 0.4], loader="ffcv", fmt="ffcv-jpeg")
    write_rows(store, "conversions", [
        {"job_id": "j1", "finished_at": datetime(2025, 1, 1, tzinfo=timezone.utc),
         "dataset": "alpha", "format": fmt, "split": "train", "samples": 10_000,
         "bytes": nbytes, "ratio_to_raw": nbytes / 30_720_000}
        for fmt, nbytes in (("wds-png", 20_000_000), ("ffcv-jpeg", 9_000_000))])
    data = load_results(store)
    drawn: list[tuple[str, int]] = []
    original = matplotlib.axes.Axes.scatter

    def spy(self: Any, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.append((kwargs.get("label"), len(x)))
        return original(self, x, y, *args, **kwargs)

    matplotlib.axes.Axes.scatter = spy  # type: ignore[method-assign]
    try:
        written = draw_charts(data.runs, data.conversions, tmp_path / "charts")
    finally:
        matplotlib.axes.Axes.scatter = original  # type: ignore[method-assign]
    assert "size_vs_throughput.png" in {p.name for p in written}
    assert sorted(drawn) == sorted((POINT_STYLES[k]["label"], 1)
                                   for k in ("cached", "streamed", "peer"))
