"""Cache then train against stream from the store, packed formats and peers in the report.

Rows are real Parquet files written through ``shared.results.write_rows`` into a real
results store: runs and their epochs, as a node writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from test_report_groups import _report, _row

from node.report import load_results
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
