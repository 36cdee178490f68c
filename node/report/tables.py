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

from node.report.groups import GROUP_KEYS, column, mixes, varying, with_settings
from shared.results import read_table
from shared.storage import Store




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
# What the best loader benchmarks report beside throughput (absent in older rows).
LATENCY_FIGURES: tuple[Figure, ...] = (
    Figure("time_to_first_batch_s", "time to first batch", "seconds", "first batch"),
    Figure("batch_wait_p50_s", "batch wait p50", "seconds", "wait p50"),
    Figure("batch_wait_p95_s", "batch wait p95", "seconds", "wait p95"),
    Figure("batch_wait_p99_s", "batch wait p99", "seconds", "wait p99"),
    Figure("batch_wait_max_s", "batch wait max", "seconds", "wait max"),
    Figure("read_time_s", "read time per epoch", "seconds", "read s"),
    Figure("decode_time_s", "decode time per epoch", "seconds", "decode s"),
    Figure("h2d_time_s", "host-to-device time per epoch", "seconds", "h2d s"),
)
# Peak RAM split into anonymous memory and file-backed (mapped dataset) pages.
MEMORY_FIGURES: tuple[Figure, ...] = (
    Figure("peak_ram_anon_bytes", "peak RAM, anonymous", "bytes", "RAM anon"),
    Figure("peak_ram_file_bytes", "peak RAM, file-backed pages", "bytes", "RAM file"),
)
STAGE_COLUMNS = ("read_time_s", "decode_time_s", "h2d_time_s")
# Cache to local disk, then train, against streaming from the store: the fill's time beside
# the first epoch's (where streaming pays for the reads) and the best epoch's.
ACCESS_FIGURES: tuple[Figure, ...] = (
    Figure("cache_time_s", "cache fill time", "seconds", "cache s"),
    Figure("first_epoch_time_s", "first epoch time", "seconds", "epoch 1 s"),
    Figure("cache_then_first_s", "cache fill + first epoch", "seconds", "both s"),
    Figure("best_epoch_time_s", "best epoch time", "seconds", "best s"),
)
_BY_COLUMN = {f.column: f for f in (*FIGURES, DATA_WAIT, ACCEL_UTIL, *LATENCY_FIGURES,
                                    *MEMORY_FIGURES, *ACCESS_FIGURES)}
_NUMERIC = [*_BY_COLUMN, "cold_epochs", "val_samples", "samples_per_epoch", "epochs"]

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
    """Read ``runs``, ``epochs`` and ``conversions`` (each may be empty).

    ``runs`` gains the per-stage times (read, decode, host-to-device) as each run's
    mean per epoch, from ``epochs`` where it has them.
    """
    runs, epochs = read_table(store, "runs"), read_table(store, "epochs")
    # A run's row is written last and commits it: epochs whose run row never got written
    # (the store failed in between) belong to no run.
    epochs = epochs[epochs["run_id"].isin(runs["run_id"])]
    runs = with_epoch_times(with_stage_times(runs, epochs), epochs)
    return Results(url=store.display_url, runs=runs, epochs=epochs,
                   conversions=read_table(store, "conversions"))


def with_epoch_times(runs: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus ``first_epoch_time_s`` (its lowest-numbered epoch), ``best_epoch_time_s``
    (its shortest) and ``cache_then_first_s`` (``cache_time_s`` + the first epoch); NaN
    where the store has no epochs for a run."""
    runs = runs.copy()
    first = best = pd.Series(dtype="float64")
    if not epochs.empty and "epoch_time_s" in epochs:
        timed = epochs.assign(epoch_time_s=pd.to_numeric(epochs["epoch_time_s"],
                                                         errors="coerce"))
        timed = timed.dropna(subset=["epoch_time_s"]).sort_values(["run_id", "epoch"])
        first = timed.groupby("run_id")["epoch_time_s"].first()
        best = timed.groupby("run_id")["epoch_time_s"].min()
    runs["first_epoch_time_s"] = runs["run_id"].map(first).astype("float64")
    runs["best_epoch_time_s"] = runs["run_id"].map(best).astype("float64")
    cache = pd.to_numeric(column(runs, "cache_time_s"), errors="coerce").astype("float64")
    runs["cache_then_first_s"] = cache + runs["first_epoch_time_s"]
    return runs


def with_stage_times(runs: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus each run's mean per-epoch ``STAGE_COLUMNS`` (missing: NaN)."""
    present = [c for c in STAGE_COLUMNS if c in epochs and c not in runs]
    if not present or epochs.empty:
        return runs
    means = epochs.groupby("run_id")[present].mean(numeric_only=False)
    return runs.join(means.apply(pd.to_numeric, errors="coerce"), on="run_id")


# --------------------------------------------------------------------------- runs


def _ok_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Successful rank-0 rows with the grouping keys filled in."""
    df = runs[runs["status"] == "ok"]
    df = with_settings(df[pd.to_numeric(df["rank"]).fillna(0) == 0])
    for col in _NUMERIC:
        df[col] = pd.to_numeric(column(df, col), errors="coerce").astype("float64")
    return df


def summarise(runs: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """One row per configuration (``GROUP_KEYS``) of successful runs.

    Columns: the keys, ``repeats``, ``hosts`` (how many), ``mixes`` (recorded settings
    the group's runs differ in, ``groups.MIX_KEYS``; ``-`` for none), ``io_path`` and
    ``io_evidence`` and ``ram_kind`` (the values seen), ``cold_epochs`` (median epochs
    verified cold), and for every figure its median (the column's own name) with
    ``<column>_min`` and ``<column>_max``.
    """
    df = _ok_rows(runs)
    if mode is not None:
        df = df[df["mode"] == mode]
    if df.empty:
        return pd.DataFrame(columns=[*GROUP_KEYS, "repeats", "hosts", "mixes", *_LABELS,
                                     *_NUMERIC, *(f"{c}_min" for c in _NUMERIC),
                                     *(f"{c}_max" for c in _NUMERIC)])
    for name in _LABELS:
        df[_LABELS[name]] = column(df, _LABELS[name])
    groups = df.groupby(GROUP_KEYS, dropna=False, sort=True)
    out = groups[_NUMERIC].median()
    out = out.join(groups[_NUMERIC].min().add_suffix("_min"))
    out = out.join(groups[_NUMERIC].max().add_suffix("_max"))
    out["repeats"] = groups.size()
    out["hosts"] = groups["host"].nunique()
    out["mixes"] = groups.apply(mixes, include_groups=False)
    for name, source in _LABELS.items():
        out[name] = groups[source].agg(_seen)
    return out.reset_index()


# Text columns of a group: the values its runs recorded, joined.
_LABELS = {"io_path": "io_path", "io_evidence": "io_path_evidence", "ram_kind": "ram_kind",
           "vram_kind": "vram_kind"}


def _seen(values: pd.Series) -> str:
    return "/".join(sorted({str(v) for v in values.dropna() if str(v)})) or "-"


def _row_levels(summary: pd.DataFrame) -> list[str]:
    """Row labels: loader and format, plus every setting that varies within a dataset."""
    return ["loader", "format", *varying(summary)]


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

    Rows indexed by (loader, format, and every setting that varies in the dataset);
    columns ``repeats``, the medians of ``SUMMARY_FIGURES``, ``io_path``, ``hosts`` and
    ``mixes``.
    """
    summary = summarise(runs, "train")
    levels = _row_levels(summary)
    cols = ["repeats", *(f.column for f in SUMMARY_FIGURES), "io_path", "hosts", "mixes"]
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
    ``psnr_db`` and ``ssim`` (lossy formats, where recorded) are the splits' means
    weighted by samples; ``chroma_subsampling`` is the codec's, where recorded.
    """
    cols = ["dataset", "format", "bits", "compression", "image_size", "splits", "samples",
            "bytes", "bytes_per_sample", "ratio_to_raw", "psnr_db", "ssim",
            "chroma_subsampling", "job_id"]
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
    for name in ("psnr_db", "ssim"):
        df[name] = pd.to_numeric(column(df, name), errors="coerce")
    df["chroma_subsampling"] = column(df, "chroma_subsampling")
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
            "psnr_db": _weighted(part, "psnr_db"), "ssim": _weighted(part, "ssim"),
            "chroma_subsampling": _first(part["chroma_subsampling"]),
            "job_id": part["job_id"].iloc[0]})
    return (pd.DataFrame(rows, columns=cols).sort_values(["dataset", "bytes"])
            .reset_index(drop=True))


def _weighted(part: pd.DataFrame, name: str) -> float:
    """The sample-weighted mean of ``name`` over the rows that have it (NaN: none)."""
    known = part[part[name].notna()]
    weights = pd.to_numeric(known["samples"]).astype(float)
    return float((known[name] * weights).sum() / weights.sum()) if weights.sum() else math.nan


def format_bytes(conversions: pd.DataFrame) -> dict[tuple[str, str], int]:
    """``{(dataset, format): total bytes over all splits}`` (latest job of each)."""
    sizes = format_size_table(conversions)
    return {(r.dataset, r.format): int(r.bytes) for r in sizes.itertuples()}


def _first(series: pd.Series) -> Any:
    values = series.dropna()
    return values.iloc[0] if len(values) else None
