"""The report's tables as text: Markdown files, the terminal, and report.md."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table
from rich.text import Text

from node.report.tables import (
    _BY_COLUMN,
    BENCH_FIGURES,
    SUMMARY_FIGURES,
    Figure,
    Results,
    _pivot,
    _row_levels,
    bench_table,
    comparison_tables,
    failed_runs,
    format_size_table,
    summarise,
    summary_tables,
)
from node.report.context import (
    ACCESS_LEGEND,
    DETAIL_LEGEND,
    SETTINGS_LEGEND,
    access_text,
    detail_text,
    settings_text,
)
from node.report.units import _bytes, _cells, _missing, level_text


@dataclass(frozen=True)
class TextTable:
    """A rendered table: file stem, title, string cells, and its numbers for the CSV.

    ``terminal`` is a narrower version for the terminal (medians only), when the full
    one would not fit; ``labels`` is the number of leading label columns.
    """

    stem: str
    title: str
    text: pd.DataFrame
    numbers: pd.DataFrame
    labels: int
    terminal: pd.DataFrame | None = None
    legend: str = ""
    terminal_note: str = "medians here; spreads in the Markdown and the per-figure tables"


def _figure_text(summary: pd.DataFrame, fig: Figure) -> pd.DataFrame:
    table = _pivot(summary, _cells(summary, fig)).fillna("-").reset_index()
    levels = list(table.columns[:len(_row_levels(summary))])
    return table.assign(**level_text(table, levels))


def _wide_text(part: pd.DataFrame, lead: Sequence[str], figures: Sequence[Figure],
               spread: bool) -> pd.DataFrame:
    text = level_text(part, lead).assign(repeats=part["repeats"].astype(str))
    for fig in figures:
        text[fig.short] = _cells(part, fig, spread)
    text["io path"] = part["io_path"].astype(str)
    if (part["mixes"] != "-").any():
        text["mixes"] = part["mixes"].astype(str)
    return text.reset_index(drop=True)


def _legend(figures: Sequence[Figure]) -> str:
    return "; ".join(f"{f.short} = {f.heading}" for f in figures)


_MIXES = ("mixes = recorded settings the cell's runs differ in without being split "
          "(hosts of the same hardware, epochs, samples per epoch, CPU budget)")
_CPU_ACCEL = ("on CPU there is no accelerator: accel util is the share of the epoch spent "
              "in forward/backward/optimiser on the CPU, the rest waiting for data")


def build_tables(results: Results) -> list[TextTable]:
    """Every table of the report, in reading order."""
    runs = results.runs
    return [*_settings_tables(runs), *_summary_tables(runs), *_detail_tables(runs),
            *_access_tables(runs), *_comparison_tables(runs), *_bench_tables(runs),
            *_size_tables(results.conversions), *_failed_tables(runs)]


def _settings_tables(runs: pd.DataFrame) -> list[TextTable]:
    text, numbers = settings_text(runs)
    if numbers.empty:
        return []
    return [TextTable("settings", "Settings of each group of comparable runs", text,
                      numbers, len(text.columns) - 2, terminal=_known_columns(text),
                      legend=SETTINGS_LEGEND, terminal_note=_KNOWN_NOTE)]


_KNOWN_NOTE = "columns with no value in any row left out here; all are in the Markdown"


def _known_columns(text: pd.DataFrame) -> pd.DataFrame:
    """For the terminal: without the columns no row has a value in."""
    return text[[c for c in text.columns if (text[c] != "-").any()]]


def _detail_tables(runs: pd.DataFrame) -> list[TextTable]:
    tables = []
    for dataset in sorted(summarise(runs)["dataset"].unique()):
        text, numbers = detail_text(runs, dataset)
        tables.append(TextTable(
            f"detail_{_slug(dataset)}",
            f"{dataset}: beside throughput (first batch, batch wait, stages, memory kind, "
            "cold, I/O path)", text, numbers, list(text.columns).index("repeats"),
            terminal=_known_columns(text), legend=DETAIL_LEGEND, terminal_note=_KNOWN_NOTE))
    return tables


def _access_tables(runs: pd.DataFrame) -> list[TextTable]:
    tables = []
    for dataset in sorted(summarise(runs)["dataset"].unique()):
        text, numbers = access_text(runs, dataset)
        medians = text.map(lambda v: v.split(" [", 1)[0])
        tables.append(TextTable(
            f"access_{_slug(dataset)}",
            f"{dataset}: cache to local disk then train, or stream from the store",
            text, numbers, list(text.columns).index("repeats"),
            terminal=_known_columns(medians), legend=ACCESS_LEGEND,
            terminal_note="medians here; spreads in the Markdown"))
    return tables


def _summary_tables(runs: pd.DataFrame) -> list[TextTable]:
    train = summarise(runs, "train")
    levels = _row_levels(train)
    numbers = summary_tables(runs)
    legend = _legend(SUMMARY_FIGURES)
    if (train["device"].astype(str) == "cpu").any():
        legend += "; " + _CPU_ACCEL
    if (train["mixes"] != "-").any():
        legend += "; " + _MIXES
    tables = []
    for dataset, part in train.groupby("dataset", sort=True):
        part = part.sort_values("throughput_img_s", ascending=False)
        tables.append(TextTable(
            f"summary_{_slug(dataset)}", f"{dataset}: training runs, fastest first",
            _wide_text(part, levels, SUMMARY_FIGURES, spread=True),
            numbers[str(dataset)].reset_index(), len(levels),
            terminal=_wide_text(part, levels, SUMMARY_FIGURES, spread=False),
            legend=legend))
    return tables


def _comparison_tables(runs: pd.DataFrame) -> list[TextTable]:
    train = summarise(runs, "train")
    levels = _row_levels(train)
    return [TextTable(f"comparison_{column}", f"{_BY_COLUMN[column].heading} by dataset",
                      _figure_text(train, _BY_COLUMN[column]), pivot.reset_index(),
                      len(levels))
            for column, pivot in comparison_tables(runs).items()]


def _bench_tables(runs: pd.DataFrame) -> list[TextTable]:
    bench = summarise(runs, "bench")
    if bench.empty:
        return []
    bench = bench.sort_values(["dataset", "throughput_img_s"], ascending=[True, False])
    bench = bench.assign(**{"emulated step": bench["emulated_step_ms"].map(
        lambda v: "-" if _missing(v) else f"{v:g} ms")})
    lead = ["dataset", "loader", "format", "emulated step",
            *(k for k in _row_levels(bench)[2:] if k != "emulated_step_ms")]
    return [TextTable(
        "bench", "Bench runs: the loader alone (no model), fastest first",
        _wide_text(bench, lead, BENCH_FIGURES, spread=True), bench_table(runs), 3,
        terminal=_wide_text(bench, lead, BENCH_FIGURES, spread=False),
        legend=_legend(BENCH_FIGURES).replace(
            "accelerator utilisation (%)",
            "accelerator utilisation the loader allows under the emulated step (%)"))]


def _size_tables(conv: pd.DataFrame) -> list[TextTable]:
    sizes = format_size_table(conv)
    if sizes.empty:
        return []
    text = pd.DataFrame({
        "dataset": sizes["dataset"], "format": sizes["format"],
        "bits": sizes["bits"].map(lambda v: "-" if _missing(v) else str(int(v))),
        "compression / quality": [
            "-" if _missing(c) else str(c) + ("" if _missing(ch) else f", {ch}")
            for c, ch in zip(sizes["compression"], sizes["chroma_subsampling"], strict=True)],
        "samples": sizes["samples"].map(lambda v: f"{int(v):,}"),
        "bytes": sizes["bytes"].map(_bytes),
        "bytes per sample": sizes["bytes_per_sample"].map(
            lambda v: "-" if _missing(v) else f"{v:,.0f} B"),
        "ratio to raw": sizes["ratio_to_raw"].map(
            lambda v: "-" if _missing(v) else f"{v:.3f}"),
    })
    legend = "ratio to raw = stored bytes / decoded pixel bytes (not the source files)"
    if sizes[["psnr_db", "ssim"]].notna().any().any():
        text["PSNR"] = sizes["psnr_db"].map(lambda v: "-" if _missing(v) else f"{v:.1f} dB")
        text["SSIM"] = sizes["ssim"].map(lambda v: "-" if _missing(v) else f"{v:.4f}")
        legend += ("; PSNR / SSIM of the lossy formats against the decoded source "
                   "(- for lossless)")
    return [TextTable("format_sizes", "Format sizes (latest conversion job, all splits summed)",
                      text, sizes, 2, legend=legend)]


def _failed_tables(runs: pd.DataFrame) -> list[TextTable]:
    failed = failed_runs(runs)
    if failed.empty:
        return []
    text = failed[["dataset", "loader", "format", "mode", "run_id", "host", "error"]]
    return [TextTable("failed_runs", "Failed runs (left out of the figures)",
                      text.fillna("-").astype(str), failed, 3)]


def _slug(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "dataset"


_TEXT_COLUMNS = frozenset({"io path", "error", "run_id", "host", "mode", "status",
                           "compression / quality", "mixes", "evidence", "RAM kind",
                           "cold/warm", "data access", "access", "hosts", "hardware", "GPU",
                           "device", "model", "VRAM kind"})


def to_markdown(df: pd.DataFrame, labels: int = 0) -> str:
    """A GitHub Markdown table: labels and text left-aligned, figures right-aligned."""
    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [esc(c) for c in df.columns]
    align = ["---" if i < labels or c in _TEXT_COLUMNS else "---:"
             for i, c in enumerate(df.columns)]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |"
              for row in df.itertuples(index=False, name=None)]
    return "\n".join(lines)


def _rich_table(t: TextTable) -> Table:
    text = t.terminal if t.terminal is not None else t.text
    legend = t.legend + (f" ({t.terminal_note})" if t.terminal is not None else "")
    table = Table(title=t.title, title_justify="left", caption=legend or None,
                  caption_justify="left")
    for i, col in enumerate(text.columns):
        if i < t.labels:
            table.add_column(str(col), no_wrap=True)
        else:
            table.add_column(str(col), justify="left" if col in _TEXT_COLUMNS else "right")
    for row in text.itertuples(index=False, name=None):
        table.add_row(*(Text(str(v)) for v in row))  # Text: errors may hold "[...]"
    return table



def _write_table(out_dir: Path, t: TextTable) -> list[Path]:
    md, csv = out_dir / f"{t.stem}.md", out_dir / f"{t.stem}.csv"
    legend = f"\n{t.legend}\n" if t.legend else ""
    md.write_text(f"## {t.title}\n\n{to_markdown(t.text, t.labels)}\n{legend}")
    t.numbers.to_csv(csv, index=False)
    return [md, csv]


def report_intro(data: Results) -> list[str]:
    """The report's opening paragraphs (Markdown): the store and how to read a cell."""
    runs = data.runs
    n_ok = int((runs["status"] == "ok").sum())
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"Results store `{data.url}`, {n_ok} successful and {len(runs) - n_ok} failed runs, "
        f"{data.conversions['job_id'].nunique()} conversion jobs; generated {now}.", "",
        "Cells are the median over repeated runs of a configuration (dataset, loader, format "
        "and every setting that changes a figure: hardware, GPU, device, model, batch size, "
        "workers, cold/warm, cached or streamed, mode, emulated step, image size; see the "
        "settings table), with "
        "[min–max] where it ran more than once and the run count in `repeats`. Data wait = "
        "time blocked on the next batch / epoch wall time; accelerator utilisation = compute "
        "/ epoch wall time (MLPerf Storage); on CPU it is the CPU's compute share.", "",
    ]


def _write_report_md(path: Path, data: Results, tables: Sequence[TextTable],
                     charts: Sequence[Path], rec_lines: Sequence[str],
                     notes: Sequence[str]) -> None:
    lines = ["# formatlab report", "", *report_intro(data)]
    lines += [f"> note: {n}" for n in notes] + ([""] if notes else [])
    lines += ["#" + line if line.startswith("#") else line for line in rec_lines]
    if charts:
        lines += ["## Charts", ""] + [f"![{p.stem}]({p.name})" for p in charts] + [""]
    for t in tables:
        lines += [f"## {t.title}", "", to_markdown(t.text, t.labels), ""]
        lines += [t.legend, ""] if t.legend else []
        lines += [f"CSV: [{t.stem}.csv]({t.stem}.csv)", ""]
    path.write_text("\n".join(lines) + "\n")
