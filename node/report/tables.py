"""The report's numbers: results loaded, runs grouped into configurations, sizes.

Only successful runs enter the figures (failed ones are listed with their error).
A configuration is (dataset, loader, format, mode, model, world size); when it ran more
than once its cells show the median and the min-max spread. Multi-rank runs write one
row per rank; the report uses rank 0's row (per-rank throughput; rank 0 also carries the
validation figures).

The functions return plain DataFrames of numbers in the columns' own units (bytes,
seconds, fractions), so tests can compare them with the rows they come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from shared.results import read_table
from shared.storage import Store


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
