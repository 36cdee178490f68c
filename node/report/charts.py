"""The report's PNG charts (matplotlib's Agg canvas, no pyplot global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from node.report.kinds import is_peer, is_streamed
from node.report.tables import _row_levels, format_size_table, primary_summary
from node.report.units import _missing, _rate

CHART_NAMES = ("throughput.png", "data_wait.png", "memory.png", "accuracy.png",
               "format_size.png", "size_vs_throughput.png")


def draw_charts(runs: pd.DataFrame, conversions: pd.DataFrame, out: str | Path) -> list[Path]:
    """Write the PNG charts that the data allows; returns their paths.

    ``throughput.png``, ``data_wait.png`` and ``memory.png`` need successful runs
    (train runs, or bench runs for a dataset without any); ``accuracy.png`` train runs
    with a validation accuracy; ``format_size.png`` conversions rows;
    ``size_vs_throughput.png`` both, for the same formats.
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
        train = summary[summary["mode"] == "train"]
        if train["val_accuracy"].notna().any():
            written.append(_bar_chart(
                train, out / "accuracy.png", "val_accuracy", 100.0,
                "validation accuracy (%)", "Validation accuracy per loader / format "
                "(median, min–max)", ylim=(0, 105)))
    sizes = format_size_table(conversions)
    if not sizes.empty:
        written.append(_size_chart(sizes, out / "format_size.png"))
    if not summary.empty and not sizes.empty:
        path = _pareto_chart(summary, sizes, out / "size_vs_throughput.png")
        written += [path] if path else []
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
    kinds = sorted({k for k in summary["ram_kind"] if k != "-"})
    kind = "/".join(k.upper() for k in kinds) if kinds else "PSS or RSS, kind not recorded"
    width = 0.4 if any_vram else 0.6
    fig = _figure(len(datasets), widest)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets, strict=True):
        part = summary[summary["dataset"] == dataset].sort_values(
            ["peak_ram_bytes", "loader", "format"], ascending=[False, True, True])
        x = list(range(len(part)))
        shift = width / 2 if any_vram else 0.0
        ax.bar([i - shift for i in x], part["peak_ram_bytes"].fillna(0) / div, width=width,
               label=f"peak RAM (process tree, {kind})", color="#4878a8")
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
    log = spans_decades(sizes["bytes_per_sample"])  # one scale type for every panel
    fig = _figure(len(datasets), widest)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets, strict=True):
        part = sizes[sizes["dataset"] == dataset].sort_values("bytes_per_sample")
        values = part["bytes_per_sample"].astype(float)
        x = list(range(len(part)))
        bars = ax.bar(x, values, color="#6a9f58")
        ax.bar_label(bars, labels=[f"×{r:.2f}" if not _missing(r) else ""
                                   for r in part["ratio_to_raw"]], fontsize=7, padding=2)
        if log:
            ax.set_yscale("log")
        ax.set_xticks(x, list(part["format"]), rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("bytes per sample (B" + (", log scale)" if log else ")"))
        ax.set_title(f"{dataset} (labels: ratio to raw pixels)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Stored size per format")
    fig.savefig(path, dpi=110)
    return path


def spans_decades(values: pd.Series) -> bool:
    """Whether positive ``values`` span more than 20x: then a log axis, else linear."""
    positive = pd.to_numeric(values, errors="coerce").astype(float)
    positive = positive[positive > 0]
    return bool(len(positive)) and positive.max() / positive.min() > 20


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (size, throughput) points no other beats on both, smallest first.

    A point is on the front when every smaller (or equal) point is slower.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, fastest = [], float("-inf")
    for i in order:
        if points[i][1] > fastest:
            front.append(i)
            fastest = points[i][1]
    return front


# How a point of size_vs_throughput.png is drawn: formatlab cached, streamed, peer.
POINT_STYLES = {
    "cached": {"marker": "o", "color": "#9aa5b1", "label": "measured, cached (median)"},
    "streamed": {"marker": "s", "facecolors": "none", "edgecolors": "#2e86c1",
                 "label": "streamed from the store (--no-cache)"},
    "peer": {"marker": "^", "color": "#8e44ad", "label": "peer loader (benchmarks/peers.py)"},
}


def point_kind(loader: Any, access: Any) -> str:
    """``peer``, ``streamed`` or ``cached``: how a chart point is drawn."""
    return "peer" if is_peer(loader) else "streamed" if is_streamed(access) else "cached"


def _scatter_kinds(ax: Any, part: pd.DataFrame, points: list[tuple[float, float]]) -> None:
    kinds = [point_kind(lo, ac) for lo, ac in zip(part["loader"], part["data_access"],
                                                  strict=True)]
    for kind, style in POINT_STYLES.items():
        mine = [p for p, k in zip(points, kinds, strict=True) if k == kind]
        if mine:
            ax.scatter([p[0] for p in mine], [p[1] for p in mine], zorder=2, **style)


def _pareto_chart(summary: pd.DataFrame, sizes: pd.DataFrame, path: Path) -> Path | None:
    """Throughput against total bytes on disk, per dataset, with the Pareto front."""
    data = summary.merge(sizes[["dataset", "format", "bytes"]], on=["dataset", "format"])
    data = data.dropna(subset=["throughput_img_s", "bytes"])
    if data.empty:
        return None
    datasets = sorted(data["dataset"].unique())
    fig = _figure(len(datasets), 10)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets, strict=True):
        part = data[data["dataset"] == dataset].reset_index(drop=True)
        points = list(zip(part["bytes"].astype(float) / 2**20,
                          part["throughput_img_s"].astype(float), strict=True))
        front = pareto_front(points)
        _scatter_kinds(ax, part, points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-",
                color="#c0392b", mfc="none", ms=10,  # hollow: the point's kind shows inside
                label="Pareto front (no option smaller and faster)", zorder=3)
        for (x, y), label in zip(points, _labels(part), strict=True):
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        log = spans_decades(pd.Series([p[0] for p in points]))
        if log:  # the same rule as format_size.png
            ax.set_xscale("log")
        ax.set_xlabel("size on disk, all splits (MiB" + (", log scale)" if log else ")"))
        ax.set_ylabel("throughput (img/s)")
        ax.set_title(_panel_title(dataset, part))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Size on disk against throughput")
    fig.savefig(path, dpi=110)
    return path
