"""``node-agent report``: the study's tables, charts and a recommendation.

Reads the results store's ``runs``, ``epochs`` and ``conversions`` tables with pandas.
Only successful runs enter the figures (failed ones are listed with their error).
A configuration is (dataset, loader, format, mode, model, world size); when it ran more
than once its cells show the median and, in brackets, the min-max spread. Multi-rank
runs write one row per rank; the report uses rank 0's row (per-rank throughput; rank 0
also carries the validation figures).

The public functions return plain DataFrames of numbers in the columns' own units
(bytes, seconds, fractions), so tests can compare them with the rows they come from;
turning them into human units happens only when tables are rendered.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from node.errors import UsageError
from shared.results import read_table
from shared.storage import BadStorageOptions, Store, StorageError, parse_storage_options

GROUP_KEYS = ["dataset", "loader", "format", "mode", "model", "world_size"]
_OPTIONAL_LEVELS = ("model", "world_size")  # row labels only when they vary


@dataclass(frozen=True)
class Figure:
    """One measured figure: its ``runs`` column, a title, and how to print it.

    ``kind`` is ``seconds``, ``bytes``, ``pct`` (0-100), ``fraction`` (0-1, printed
    as %) or ``rate`` (img/s).
    """

    column: str
    title: str
    kind: str
    short: str = ""

    @property
    def heading(self) -> str:
        unit = {"seconds": "s", "bytes": "MiB/GiB", "pct": "%", "fraction": "%",
                "rate": "img/s"}[self.kind]
        return f"{self.title} ({unit})"


# The study's figures, one comparison table each (DESIGN section 7/8).
FIGURES: tuple[Figure, ...] = (
    Figure("total_time_s", "total training time", "seconds", "total s"),
    Figure("mean_epoch_time_s", "mean epoch time", "seconds", "epoch s"),
    Figure("mean_epoch_data_time_s", "mean data time per epoch", "seconds", "data s/epoch"),
    Figure("peak_ram_bytes", "peak RAM", "bytes", "RAM"),
    Figure("peak_vram_bytes", "peak VRAM", "bytes", "VRAM"),
    Figure("gpu_util_mean_pct", "GPU utilisation", "pct", "GPU %"),
    Figure("cpu_util_mean_pct", "CPU utilisation", "pct", "CPU %"),
    Figure("throughput_img_s", "throughput", "rate", "img/s"),
    Figure("val_accuracy", "validation accuracy", "fraction", "accuracy"),
)
DATA_WAIT = Figure("data_wait_fraction", "data wait", "fraction", "data wait")
ACCEL_UTIL = Figure("accelerator_utilization", "accelerator utilisation", "fraction",
                    "accel util")
_BY_COLUMN = {f.column: f for f in (*FIGURES, DATA_WAIT, ACCEL_UTIL)}
_NUMERIC = [*_BY_COLUMN, "emulated_step_ms"]

# The wide per-dataset table: the columns in reading order.
SUMMARY_FIGURES: tuple[Figure, ...] = (
    _BY_COLUMN["throughput_img_s"], _BY_COLUMN["mean_epoch_time_s"],
    _BY_COLUMN["mean_epoch_data_time_s"], DATA_WAIT, ACCEL_UTIL,
    _BY_COLUMN["total_time_s"], _BY_COLUMN["gpu_util_mean_pct"],
    _BY_COLUMN["cpu_util_mean_pct"], _BY_COLUMN["peak_ram_bytes"],
    _BY_COLUMN["peak_vram_bytes"], _BY_COLUMN["val_accuracy"],
)
BENCH_FIGURES: tuple[Figure, ...] = (
    _BY_COLUMN["throughput_img_s"], DATA_WAIT, ACCEL_UTIL, _BY_COLUMN["mean_epoch_time_s"],
    _BY_COLUMN["mean_epoch_data_time_s"], _BY_COLUMN["peak_ram_bytes"],
)
CHART_NAMES = ("throughput.png", "data_wait.png", "format_size.png", "memory.png")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Results:
    """The three tables of a results store, as read."""

    url: str
    runs: pd.DataFrame
    epochs: pd.DataFrame
    conversions: pd.DataFrame

    @property
    def empty(self) -> bool:
        return self.runs.empty and self.conversions.empty


def load_results(store: Store) -> Results:
    """Read ``runs``, ``epochs`` and ``conversions`` (each may be empty)."""
    return Results(url=store.display_url, runs=read_table(store, "runs"),
                   epochs=read_table(store, "epochs"),
                   conversions=read_table(store, "conversions"))


# --------------------------------------------------------------------------- runs


def _ok_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Successful rank-0 rows with the grouping keys filled in."""
    df = runs[runs["status"] == "ok"].copy()
    df["mode"] = df["mode"].fillna("train")
    df["model"] = df["model"].fillna("-")
    df["world_size"] = pd.to_numeric(df["world_size"]).fillna(1).astype("int64")
    df = df[pd.to_numeric(df["rank"]).fillna(0) == 0]
    for col in _NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def summarise(runs: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """One row per configuration (``GROUP_KEYS``) of successful runs.

    Columns: the keys, ``repeats``, ``io_path`` (the paths seen), and for every figure
    its median (the column's own name) with ``<column>_min`` and ``<column>_max``.
    """
    df = _ok_rows(runs)
    if mode is not None:
        df = df[df["mode"] == mode]
    if df.empty:
        return pd.DataFrame(columns=[*GROUP_KEYS, "repeats", "io_path", *_NUMERIC,
                                     *(f"{c}_min" for c in _NUMERIC),
                                     *(f"{c}_max" for c in _NUMERIC)])
    groups = df.groupby(GROUP_KEYS, dropna=False, sort=True)
    out = groups[_NUMERIC].median()
    out = out.join(groups[_NUMERIC].min().add_suffix("_min"))
    out = out.join(groups[_NUMERIC].max().add_suffix("_max"))
    out["repeats"] = groups.size()
    out["io_path"] = groups["io_path"].agg(
        lambda s: "/".join(sorted({str(v) for v in s.dropna()})) or "-")
    return out.reset_index()


def _row_levels(summary: pd.DataFrame) -> list[str]:
    """Row labels: loader and format, plus model / world size where those vary."""
    return ["loader", "format", *(k for k in _OPTIONAL_LEVELS
                                  if k in summary and summary[k].nunique() > 1)]


def _pivot(summary: pd.DataFrame, values: pd.Series | str) -> pd.DataFrame:
    """Rows = configurations (``_row_levels``), columns = datasets."""
    levels = _row_levels(summary)
    data = summary.assign(_value=summary[values] if isinstance(values, str) else values)
    table = data.set_index([*levels, "dataset"])["_value"].unstack("dataset")
    table.columns.name = None
    return table.sort_index()


def comparison_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The study's comparison of train runs: one table per figure (``FIGURES``).

    Returns:
        ``{figure column: DataFrame}``, rows indexed by (loader, format[, model,
        world_size]), one column per dataset, cells the median over repeats.
    """
    summary = summarise(runs, "train")
    if summary.empty:
        return {}
    return {f.column: _pivot(summary, f.column) for f in FIGURES}


def summary_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One wide table per dataset of train runs, fastest first.

    Rows indexed by (loader, format[, model, world_size]); columns ``repeats``, the
    medians of ``SUMMARY_FIGURES`` and ``io_path``.
    """
    summary = summarise(runs, "train")
    levels = _row_levels(summary)
    cols = ["repeats", *(f.column for f in SUMMARY_FIGURES), "io_path"]
    return {
        str(name): part.set_index(levels)[cols].sort_values("throughput_img_s", ascending=False)
        for name, part in summary.groupby("dataset", sort=True)
    }


def bench_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Bench-mode configurations: loader throughput alone, fastest first per dataset."""
    summary = summarise(runs, "bench")
    cols = ["dataset", "loader", "format", "emulated_step_ms", "world_size", "repeats",
            *(f.column for f in BENCH_FIGURES), "io_path"]
    return (summary[cols].sort_values(["dataset", "throughput_img_s"], ascending=[True, False])
            .reset_index(drop=True))


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs whose status is not ``ok``, with the first line of their error."""
    df = runs[runs["status"] != "ok"].copy()
    df["error"] = df["error"].fillna("").map(lambda e: (str(e).strip().splitlines() or [""])[0])
    cols = ["run_id", "dataset", "loader", "format", "mode", "rank", "host", "status", "error"]
    return df[cols].sort_values(["dataset", "loader", "format", "run_id"]).reset_index(drop=True)


def primary_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Train configurations, plus bench ones for datasets that have no train runs."""
    train = summarise(runs, "train")
    bench = summarise(runs, "bench")
    bench = bench[~bench["dataset"].isin(set(train["dataset"]))]
    parts = [p for p in (train, bench) if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else train


# --------------------------------------------------------------------------- sizes


def format_size_table(conversions: pd.DataFrame) -> pd.DataFrame:
    """Size of every format per dataset, from the latest conversion job of each.

    Splits are summed: ``bytes`` and ``samples`` are totals, ``bytes_per_sample`` is
    bytes / samples and ``ratio_to_raw`` is bytes over the splits' raw (decoded) bytes.
    """
    cols = ["dataset", "format", "bits", "compression", "image_size", "splits", "samples",
            "bytes", "bytes_per_sample", "ratio_to_raw", "job_id"]
    if conversions.empty:
        return pd.DataFrame(columns=cols)
    df = conversions.copy()
    df["_order"] = pd.to_datetime(df["finished_at"], utc=True)
    latest = (df.sort_values(["_order", "job_id"], na_position="first")
              .groupby(["dataset", "format"])["job_id"].last().rename("_latest"))
    df = df.join(latest, on=["dataset", "format"])
    df = df[df["job_id"] == df["_latest"]]
    ratio = pd.to_numeric(df["ratio_to_raw"], errors="coerce")
    df["_raw"] = pd.to_numeric(df["bytes"]) / ratio.where(ratio > 0)
    rows = []
    for (dataset, fmt), part in df.groupby(["dataset", "format"], sort=True):
        nbytes = int(part["bytes"].sum())
        samples = int(part["samples"].sum())
        raw = part["_raw"].sum(min_count=len(part))
        rows.append({
            "dataset": dataset, "format": fmt, "bits": _first(part["bits"]),
            "compression": _first(part["compression"]), "image_size": _first(part["image_size"]),
            "splits": ",".join(sorted(str(s) for s in part["split"])), "samples": samples,
            "bytes": nbytes, "bytes_per_sample": nbytes / samples if samples else math.nan,
            "ratio_to_raw": nbytes / raw if raw and not math.isnan(raw) else math.nan,
            "job_id": part["job_id"].iloc[0]})
    return (pd.DataFrame(rows, columns=cols).sort_values(["dataset", "bytes"])
            .reset_index(drop=True))


def format_bytes(conversions: pd.DataFrame) -> dict[tuple[str, str], int]:
    """``{(dataset, format): total bytes over all splits}`` (latest job of each)."""
    sizes = format_size_table(conversions)
    return {(r.dataset, r.format): int(r.bytes) for r in sizes.itertuples()}


def _first(series: pd.Series) -> Any:
    values = series.dropna()
    return values.iloc[0] if len(values) else None


# --------------------------------------------------------------------------- recommendation

_PICK_FIGURES = ("throughput_img_s", "data_wait_fraction", "accelerator_utilization",
                 "mean_epoch_time_s", "val_accuracy")


def recommend(runs: pd.DataFrame, conversions: pd.DataFrame,
              max_bytes: int | None = None) -> dict[str, dict[str, Any]]:
    """The fastest (format, loader) pair per dataset, by median throughput.

    Train runs decide; a dataset with only bench runs is judged on those. With
    ``max_bytes``, also the fastest pair whose format's total bytes for the dataset (all
    splits, from ``conversions``) are at most ``max_bytes``; a format with no
    conversions row cannot be checked and is not picked.

    Returns:
        ``{dataset: {"dataset", "mode", "best", "max_bytes", "within_budget",
        "unknown_size"}}``; ``best`` / ``within_budget`` are dicts of the pair's figures
        (``loader``, ``format``, ``model``, ``world_size``, ``repeats``, the medians of
        throughput, data wait, accelerator utilisation, epoch time, accuracy, and
        ``bytes`` on disk) or None.
    """
    sizes = format_bytes(conversions)
    primary = primary_summary(runs)
    out: dict[str, dict[str, Any]] = {}
    for dataset, rows in primary.groupby("dataset", sort=True):
        rows = (rows.dropna(subset=["throughput_img_s"])
                .sort_values(["throughput_img_s", "loader", "format"],
                             ascending=[False, True, True]))
        entry: dict[str, Any] = {"dataset": dataset, "mode": _first(rows["mode"]) or "train",
                                 "best": None, "max_bytes": max_bytes, "within_budget": None,
                                 "unknown_size": sorted({f for f in rows["format"]
                                                         if (dataset, f) not in sizes})}
        if not rows.empty:
            entry["best"] = _pick(rows.iloc[0], sizes)
        if max_bytes is not None:
            fits = rows[rows["format"].map(
                lambda f: sizes.get((dataset, f), max_bytes + 1) <= max_bytes).astype(bool)]
            if not fits.empty:
                entry["within_budget"] = _pick(fits.iloc[0], sizes)
        out[str(dataset)] = entry
    return out


def _pick(row: pd.Series, sizes: Mapping[tuple[str, str], int]) -> dict[str, Any]:
    pick = {"loader": row["loader"], "format": row["format"], "model": row["model"],
            "world_size": int(row["world_size"]), "repeats": int(row["repeats"]),
            "io_path": row["io_path"]}
    for col in _PICK_FIGURES:
        pick[col] = _num(row[col])
    pick["bytes"] = sizes.get((row["dataset"], row["format"]))
    return pick


def _num(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def recommendation_text(recs: Mapping[str, Mapping[str, Any]],
                        conversions: pd.DataFrame) -> list[str]:
    """The recommendation as Markdown lines, one section per dataset."""
    sizes = format_size_table(conversions)
    lines = ["# Recommendation", ""]
    if not recs:
        return [*lines, "No successful runs: nothing to recommend."]
    for dataset, rec in recs.items():
        lines += [f"## {dataset}", ""]
        best = rec["best"]
        if best is None:
            lines += ["No successful run recorded a throughput.", ""]
            continue
        what = "train runs" if rec["mode"] == "train" else "bench runs; no train runs"
        lines.append(f"- **Fastest on this hardware** ({what}): {_pair_text(best)}")
        budget = rec["max_bytes"]
        if budget is not None:
            head = f"- **Fastest within {_bytes(budget)}** (`--max-bytes {budget}`): "
            if rec["within_budget"] is not None:
                lines.append(head + _pair_text(rec["within_budget"]))
            else:
                mine = sizes[sizes["dataset"] == dataset]
                if mine.empty:
                    lines.append(head + f"cannot tell: no conversions rows for {dataset}, so "
                                 "no format's size is known (prep/convert.py --results).")
                else:
                    lines.append(head + "none of the measured formats fits; the smallest "
                                 f"on record is {mine.iloc[0]['format']} at "
                                 f"{_bytes(mine.iloc[0]['bytes'])}.")
        if rec["unknown_size"]:
            lines.append(f"- No conversions row (size unknown) for: "
                         f"{', '.join(rec['unknown_size'])}.")
        lines.append("")
    return lines


def _pair_text(p: Mapping[str, Any]) -> str:
    spread = f"median of {p['repeats']} runs" if p["repeats"] > 1 else "1 run"
    model = f", model {p['model']}" if p["model"] not in ("-", None) else ""
    ranks = f", {p['world_size']} ranks (rank 0)" if p["world_size"] > 1 else ""
    disk = _bytes(p["bytes"]) + " on disk" if p["bytes"] is not None else "size unknown"
    accuracy = (f", accuracy {_fraction(p['val_accuracy'])}"
                if p["val_accuracy"] is not None else "")
    return (f"`{p['loader']}` loader on `{p['format']}` — {_rate(p['throughput_img_s'])} img/s "
            f"({spread}{model}{ranks}), data wait {_fraction(p['data_wait_fraction'])}, "
            f"epoch {_seconds(p['mean_epoch_time_s'])}{accuracy}, {disk}, "
            f"io path {p['io_path']}")


# --------------------------------------------------------------------------- units


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x)


def _bytes(x: Any) -> str:
    if _missing(x):
        return "-"
    value = float(x)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _seconds(x: Any) -> str:
    if _missing(x):
        return "-"
    x = float(x)
    return f"{x:.3f} s" if x < 1 else f"{x:.2f} s" if x < 100 else f"{x:,.0f} s"


def _pct(x: Any) -> str:
    return "-" if _missing(x) else f"{float(x):.1f} %"


def _fraction(x: Any) -> str:
    return "-" if _missing(x) else f"{100 * float(x):.1f} %"


def _rate(x: Any) -> str:
    if _missing(x):
        return "-"
    return f"{float(x):,.0f}" if float(x) >= 100 else f"{float(x):.1f}"


_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "seconds": _seconds, "bytes": _bytes, "pct": _pct, "fraction": _fraction, "rate": _rate}


def _cell(row: pd.Series, fig: Figure, spread: bool = True) -> str:
    """``median``, or ``median [min–max]`` when the configuration ran more than once."""
    fmt = _FORMATTERS[fig.kind]
    text = fmt(row[fig.column])
    if spread and row["repeats"] > 1 and not _missing(row[fig.column]):
        lo, hi = fmt(row[f"{fig.column}_min"]), fmt(row[f"{fig.column}_max"])
        if lo != hi:
            lo_num, _, lo_unit = lo.rpartition(" ")
            if lo_num and hi.endswith(" " + lo_unit):
                lo = lo_num
            text += f" [{lo}–{hi}]"
    return text


def _cells(df: pd.DataFrame, fig: Figure, spread: bool = True) -> pd.Series:
    return df.apply(lambda r: _cell(r, fig, spread), axis=1).astype(object)


# --------------------------------------------------------------------------- text tables


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


def _figure_text(summary: pd.DataFrame, fig: Figure) -> pd.DataFrame:
    return _pivot(summary, _cells(summary, fig)).fillna("-").reset_index()


def _wide_text(part: pd.DataFrame, lead: Sequence[str], figures: Sequence[Figure],
               spread: bool) -> pd.DataFrame:
    text = part[list(lead)].astype(str).assign(repeats=part["repeats"].astype(str))
    for fig in figures:
        text[fig.short] = _cells(part, fig, spread)
    text["io path"] = part["io_path"].astype(str)
    return text.reset_index(drop=True)


def _legend(figures: Sequence[Figure]) -> str:
    return "; ".join(f"{f.short} = {f.heading}" for f in figures)


def build_tables(results: Results) -> list[TextTable]:
    """Every table of the report, in reading order."""
    runs, conv = results.runs, results.conversions
    tables: list[TextTable] = []
    train = summarise(runs, "train")
    levels = _row_levels(train)
    numbers = summary_tables(runs)
    legend = _legend(SUMMARY_FIGURES)
    for dataset, part in train.groupby("dataset", sort=True):
        part = part.sort_values("throughput_img_s", ascending=False)
        tables.append(TextTable(
            f"summary_{_slug(dataset)}", f"{dataset}: training runs, fastest first",
            _wide_text(part, levels, SUMMARY_FIGURES, spread=True),
            numbers[str(dataset)].reset_index(), len(levels),
            terminal=_wide_text(part, levels, SUMMARY_FIGURES, spread=False),
            legend=legend))
    for column, pivot in comparison_tables(runs).items():
        fig = _BY_COLUMN[column]
        tables.append(TextTable(f"comparison_{column}", f"{fig.heading} by dataset",
                                _figure_text(train, fig), pivot.reset_index(), len(levels)))
    bench = summarise(runs, "bench")
    if not bench.empty:
        bench = bench.sort_values(["dataset", "throughput_img_s"], ascending=[True, False])
        bench = bench.assign(**{"emulated step": bench["emulated_step_ms"].map(
            lambda v: "-" if _missing(v) else f"{v:g} ms")})
        lead = ["dataset", "loader", "format", "emulated step"]
        tables.append(TextTable(
            "bench", "Bench runs: the loader alone (no model), fastest first",
            _wide_text(bench, lead, BENCH_FIGURES, spread=True), bench_table(runs), 3,
            terminal=_wide_text(bench, lead, BENCH_FIGURES, spread=False),
            legend=_legend(BENCH_FIGURES).replace(
                "accelerator utilisation (%)",
                "accelerator utilisation the loader allows under the emulated step (%)")))
    sizes = format_size_table(conv)
    if not sizes.empty:
        text = pd.DataFrame({
            "dataset": sizes["dataset"], "format": sizes["format"],
            "bits": sizes["bits"].map(lambda v: "-" if _missing(v) else str(int(v))),
            "compression / quality": sizes["compression"].fillna("-").astype(str),
            "samples": sizes["samples"].map(lambda v: f"{int(v):,}"),
            "bytes": sizes["bytes"].map(_bytes),
            "bytes per sample": sizes["bytes_per_sample"].map(
                lambda v: "-" if _missing(v) else f"{v:,.0f} B"),
            "ratio to raw": sizes["ratio_to_raw"].map(
                lambda v: "-" if _missing(v) else f"{v:.3f}"),
        })
        tables.append(TextTable("format_sizes",
                                "Format sizes (latest conversion job, all splits summed)",
                                text, sizes, 2))
    failed = failed_runs(runs)
    if not failed.empty:
        text = failed[["dataset", "loader", "format", "mode", "run_id", "host", "error"]]
        tables.append(TextTable("failed_runs", "Failed runs (left out of the figures)",
                                text.fillna("-").astype(str), failed, 3))
    return tables


def _slug(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "dataset"


_TEXT_COLUMNS = frozenset({"io path", "error", "run_id", "host", "mode", "status",
                           "compression / quality"})


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
    legend = t.legend + (" (medians here; spreads in the Markdown and the per-figure "
                         "tables)" if t.terminal is not None else "")
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


# --------------------------------------------------------------------------- charts


def draw_charts(runs: pd.DataFrame, conversions: pd.DataFrame, out: str | Path) -> list[Path]:
    """Write the PNG charts that the data allows; returns their paths.

    ``throughput.png``, ``data_wait.png`` and ``memory.png`` need successful runs
    (train runs, or bench runs for a dataset without any); ``format_size.png`` needs
    conversions rows.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    summary = primary_summary(runs)
    if not summary.empty:
        written.append(_bar_chart(
            summary, out / "throughput.png", "throughput_img_s", 1.0,
            "throughput (img/s)", "Throughput per loader / format (median, min–max)"))
        written.append(_bar_chart(
            summary, out / "data_wait.png", "data_wait_fraction", 100.0,
            "time waiting for data (% of epoch)", "Data-wait fraction per loader / format",
            ylim=(0, 100)))
        written.append(_memory_chart(summary, out / "memory.png"))
    sizes = format_size_table(conversions)
    if not sizes.empty:
        written.append(_size_chart(sizes, out / "format_size.png"))
    return written


def _figure(panels: int, bars: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(max(6.0, 0.55 * bars + 2.5), 3.8 * panels), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    return fig


def _labels(part: pd.DataFrame) -> list[str]:
    levels = _row_levels(part)
    return [" / ".join(str(v) for v in row) for row in part[levels].itertuples(index=False)]


def _panel_title(dataset: str, part: pd.DataFrame) -> str:
    mode = part["mode"].iloc[0]
    return f"{dataset}" + (" (bench runs)" if mode == "bench" else "")


def _bar_chart(summary: pd.DataFrame, path: Path, column: str, scale: float, ylabel: str,
               title: str, ylim: tuple[float, float] | None = None) -> Path:
    datasets = sorted(summary["dataset"].unique())
    widest = int(summary.groupby("dataset").size().max())
    fig = _figure(len(datasets), widest)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets, strict=True):
        part = summary[summary["dataset"] == dataset].sort_values(column, ascending=False)
        mid = part[column].fillna(0) * scale
        lo = (mid - part[f"{column}_min"].fillna(0) * scale).clip(lower=0)
        hi = (part[f"{column}_max"].fillna(0) * scale - mid).clip(lower=0)
        x = range(len(part))
        bars = ax.bar(x, mid, yerr=[lo, hi], capsize=3, color="#4878a8")
        ax.bar_label(bars, labels=[_rate(v) if scale == 1 else f"{v:.0f}" for v in mid],
                     fontsize=7, padding=2)
        ax.set_xticks(list(x), _labels(part), rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(_panel_title(dataset, part))
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def _memory_chart(summary: pd.DataFrame, path: Path) -> Path:
    datasets = sorted(summary["dataset"].unique())
    widest = int(summary.groupby("dataset").size().max())
    peak = pd.concat([summary["peak_ram_bytes"], summary["peak_vram_bytes"]]).max()
    unit, div = ("GiB", 2**30) if not _missing(peak) and peak >= 4 * 2**30 else ("MiB", 2**20)
    any_vram = summary["peak_vram_bytes"].notna().any()
    width = 0.4 if any_vram else 0.6
    fig = _figure(len(datasets), widest)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets, strict=True):
        part = summary[summary["dataset"] == dataset].sort_values(["loader", "format"])
        x = list(range(len(part)))
        shift = width / 2 if any_vram else 0.0
        ax.bar([i - shift for i in x], part["peak_ram_bytes"].fillna(0) / div, width=width,
               label="peak RAM (process tree, PSS)", color="#4878a8")
        if any_vram:
            vram = part["peak_vram_bytes"] / div
            ax.bar([i + shift for i in x], vram.fillna(0), width=width,
                   label="peak VRAM (NVML, per process)", color="#e0884a")
            for i, v in zip(x, vram, strict=True):
                if _missing(v):
                    ax.annotate("n/a", (i + shift, 0), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, _labels(part), rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"peak memory ({unit})")
        ax.set_title(_panel_title(dataset, part))
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Peak RAM and VRAM per loader / format" if any_vram
                 else "Peak RAM per loader / format (no run recorded VRAM)")
    fig.savefig(path, dpi=110)
    return path


def _size_chart(sizes: pd.DataFrame, path: Path) -> Path:
    datasets = sorted(sizes["dataset"].unique())
    widest = int(sizes.groupby("dataset").size().max())
    fig = _figure(len(datasets), widest)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets, strict=True):
        part = sizes[sizes["dataset"] == dataset].sort_values("bytes_per_sample")
        values = part["bytes_per_sample"].astype(float)
        x = list(range(len(part)))
        bars = ax.bar(x, values, color="#6a9f58")
        ax.bar_label(bars, labels=[f"×{r:.2f}" if not _missing(r) else ""
                                   for r in part["ratio_to_raw"]], fontsize=7, padding=2)
        positive = values[values > 0]
        if len(positive) and positive.max() / positive.min() > 20:
            ax.set_yscale("log")
        ax.set_xticks(x, list(part["format"]), rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("bytes per sample (B)")
        ax.set_title(f"{dataset} (labels: ratio to raw pixels)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Stored size per format")
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- the command


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
    rec_lines = recommendation_text(recs, data.conversions)
    (out_dir / "recommendation.md").write_text("\n".join(rec_lines) + "\n")
    for line in rec_lines:
        console.print(line.replace("**", "").replace("`", ""), markup=False, highlight=False)
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)

    _write_report_md(out_dir / "report.md", data, tables, charts, rec_lines, notes)
    where = out_dir.resolve()
    console.print(f"\nreport: {where / 'report.md'}", markup=False, highlight=False)
    console.print(f"recommendation: {where / 'recommendation.md'}", markup=False,
                  highlight=False)
    console.print(f"tables: {len(written)} files (.md, .csv) in {where}", markup=False,
                  highlight=False)
    console.print("charts: " + (", ".join(str(p.resolve()) for p in charts) or "none"),
                  markup=False, highlight=False)


def _write_table(out_dir: Path, t: TextTable) -> list[Path]:
    md, csv = out_dir / f"{t.stem}.md", out_dir / f"{t.stem}.csv"
    legend = f"\n{t.legend}\n" if t.legend else ""
    md.write_text(f"## {t.title}\n\n{to_markdown(t.text, t.labels)}\n{legend}")
    t.numbers.to_csv(csv, index=False)
    return [md, csv]


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


def _write_report_md(path: Path, data: Results, tables: Sequence[TextTable],
                     charts: Sequence[Path], rec_lines: Sequence[str],
                     notes: Sequence[str]) -> None:
    runs = data.runs
    n_ok = int((runs["status"] == "ok").sum())
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# formatlab report", "",
        f"Results store `{data.url}`, {n_ok} successful and {len(runs) - n_ok} failed runs, "
        f"{data.conversions['job_id'].nunique()} conversion jobs; generated {now}.", "",
        "Cells are the median over repeated runs of a configuration (dataset, loader, format, "
        "mode, model, world size), with [min–max] where it ran more than once. Data wait = "
        "time blocked on the next batch / epoch wall time; accelerator utilisation = compute "
        "/ epoch wall time (MLPerf Storage).", "",
    ]
    lines += [f"> note: {n}" for n in notes] + ([""] if notes else [])
    lines += ["#" + line if line.startswith("#") else line for line in rec_lines]
    if charts:
        lines += ["## Charts", ""] + [f"![{p.stem}]({p.name})" for p in charts] + [""]
    for t in tables:
        lines += [f"## {t.title}", "", to_markdown(t.text, t.labels), ""]
        lines += [t.legend, ""] if t.legend else []
        lines += [f"CSV: [{t.stem}.csv]({t.stem}.csv)", ""]
    path.write_text("\n".join(lines) + "\n")


__all__ = ["FIGURES", "Figure", "Results", "bench_table", "build_tables", "comparison_tables",
           "draw_charts", "failed_runs", "format_bytes", "format_size_table", "load_results",
           "primary_summary", "recommend", "recommendation_text", "report", "summarise",
           "summary_tables", "to_markdown"]
