"""``node-agent report``: print the tables, write them with charts under ``--out``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console

from node.errors import UsageError
from node.report.charts import CHART_NAMES, draw_charts
from node.report.recommendation import recommend, recommendation_text
from node.report.html import write_html
from node.report.rendering import (
    _rich_table,
    _write_report_md,
    _write_table,
    build_tables,
    report_intro,
)
from node.report.tables import Results, load_results, summarise
from shared.storage import BadStorageOptions, Store, StorageError, parse_storage_options


def report(*, results: str, out: str, max_bytes: int | None,
           storage_options: str | None) -> None:
    """``node-agent report``: print the tables, write them with charts under ``out``.

    Raises:
        UsageError: bad ``--storage-options``, an unreadable store, or no results.
    """
    try:
        store = Store.open(results, parse_storage_options(storage_options))
        data = load_results(store)
    except (BadStorageOptions, StorageError) as exc:
        raise UsageError(str(exc)) from None
    if data.empty:
        raise UsageError(f"no results in {store.display_url}")

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(width=max(Console().width, 160))
    tables = build_tables(data)
    written: list[Path] = []
    for t in tables:
        console.print(_rich_table(t))
        console.print()
        written += _write_table(out_dir, t)
    all_configs = summarise(data.runs)
    if not all_configs.empty:
        all_configs.to_csv(out_dir / "runs_summary.csv", index=False)
        written.append(out_dir / "runs_summary.csv")

    charts = draw_charts(data.runs, data.conversions, out_dir)
    notes = _notes(data, charts)
    recs = recommend(data.runs, data.conversions, max_bytes)
    rec_lines = recommendation_text(recs, data.conversions, data.runs)
    (out_dir / "recommendation.md").write_text("\n".join(rec_lines) + "\n")
    for line in rec_lines:
        console.print(line.replace("**", "").replace("`", ""), markup=False, highlight=False)
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)

    _write_report_md(out_dir / "report.md", data, tables, charts, rec_lines, notes)
    write_html(out_dir / "report.html", intro=report_intro(data), notes=notes,
               rec_lines=rec_lines, charts=charts, tables=tables)
    where = out_dir.resolve()
    console.print(f"\nreport: {where / 'report.md'}", markup=False, highlight=False)
    console.print(f"report to share (one file): {where / 'report.html'}", markup=False,
                  highlight=False)
    console.print(f"recommendation: {where / 'recommendation.md'}", markup=False,
                  highlight=False)
    console.print(f"tables: {len(written)} files (.md, .csv) in {where}", markup=False,
                  highlight=False)
    console.print("charts: " + (", ".join(str(p.resolve()) for p in charts) or "none"),
                  markup=False, highlight=False)


def _notes(data: Results, charts: Sequence[Path]) -> list[str]:
    notes = []
    runs = data.runs
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        notes.append("no successful runs: comparison tables and run charts skipped")
    if data.conversions.empty:
        notes.append("no conversions rows in the store: format size table and "
                     "format_size.png skipped (run prep/convert.py with --results)")
    if len(ok) and (pd.to_numeric(ok["world_size"]).fillna(1) > 1).any():
        notes.append("multi-rank runs: figures are rank 0's row (per-rank throughput)")
    missing = [n for n in CHART_NAMES if n not in {p.name for p in charts}]
    if missing and not ok.empty and not data.conversions.empty:
        notes.append(f"charts not drawn: {', '.join(missing)}")
    return notes
