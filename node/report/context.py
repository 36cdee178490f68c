"""The tables that say what the figures mean: each group's settings, the data path.

``settings`` lists, per dataset, every group of comparable runs with the settings that
make them comparable (batch size, epochs, steps per epoch, image size, validation
samples, cold or warm...). ``detail_<dataset>`` shows beside throughput what the best
loader benchmarks also report: time to first batch, batch-wait percentiles, per-stage
times, the memory figure's kind, verified-cold epochs and the I/O path with its evidence.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from node.report.groups import settings_table
from node.report.tables import (
    _BY_COLUMN,
    ACCESS_FIGURES,
    LATENCY_FIGURES,
    MEMORY_FIGURES,
    _ok_rows,
    _row_levels,
    summarise,
)
from node.report.units import _cells, _missing, level_text

_SETTINGS_TEXT = {
    "dataset": "dataset", "mode": "mode", "hardware": "hardware", "hosts": "hosts",
    "gpu_name": "GPU", "device": "device", "model": "model", "world_size": "ranks",
    "batch_size": "batch", "workers": "workers", "epochs": "epochs",
    "steps_per_epoch": "steps/epoch", "image_size": "image size", "val_samples": "val images",
    "cold": "cold/warm", "data_access": "data access", "emulated_step_ms": "emulated step (ms)",
    "cpu_budget": "CPU budget",
    "options": "options", "runs": "runs",
}
SETTINGS_LEGEND = (
    "one row per group of comparable runs: runs differing in any of these columns are never "
    "medianed together; steps/epoch = ceil(samples per epoch / batch); val images = the "
    "validation split's size (from the confusion matrix); cold = page cache evicted before "
    "each epoch (--cold), warm = data in page cache; data access = cache (read the node's local "
    "copy) or stream (--no-cache: read straight from the store)")
DETAIL_LEGEND = (
    "first batch = time to the first batch of the first epoch; wait pNN = percentile of the "
    "per-step wait for the next batch over all steps; read / decode / h2d = per-stage time "
    "per epoch where the loader tells them apart; RAM kind = pss (shared pages counted once) "
    "or rss; RAM anon / RAM file = anonymous memory / file-backed pages (a mapped dataset) "
    "at the peak; VRAM kind = process (NVML, per process) or device; cold epochs = epochs "
    "whose storage reads verified them cold; io path = how bytes "
    "reached the device (gds only with evidence), evidence = why")


ACCESS_LEGEND = (
    "access = cache (the shards were copied to the node's local cache, then read there) or "
    "stream (--no-cache: read straight from the store); cache s = the cache fill (fetch and "
    "checksum) before training; epoch 1 s = the first epoch, where streaming pays for its "
    "reads; both s = cache s + epoch 1 s, the time from an empty cache to the end of the "
    "first epoch; best s = the shortest epoch")


def access_text(runs: pd.DataFrame, dataset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One dataset's cache-then-train against stream-from-the-store figures (text, numbers).

    Rows: every group (train and bench runs; the mode a column where both ran), by loader
    and format with the data access beside them, cached before streamed.
    """
    summary = summarise(runs)
    summary = summary[summary["dataset"] == dataset].sort_values(
        ["mode", "loader", "format", "data_access"], ascending=[False, True, True, True])
    lead = ["mode"] if summary["mode"].nunique() > 1 else []
    levels = [*lead, "loader", "format", "data_access",
              *(k for k in _row_levels(summary) if k not in ("mode", "loader", "format",
                                                              "data_access"))]
    text = level_text(summary, levels).rename(columns={"data_access": "access"})
    text = text.assign(repeats=summary["repeats"].astype(str))
    for fig in ACCESS_FIGURES:
        text[fig.short] = _cells(summary, fig, spread=True)
    text["img/s"] = _cells(summary, _BY_COLUMN["throughput_img_s"], spread=False)
    cols = [*levels, "repeats", *(f.column for f in ACCESS_FIGURES), "throughput_img_s"]
    return text.reset_index(drop=True), summary[cols].reset_index(drop=True)


def settings_text(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The settings table as text cells, and as numbers for the CSV."""
    numbers = settings_table(_ok_rows(runs))
    text = numbers.rename(columns=_SETTINGS_TEXT).copy()
    text["emulated step (ms)"] = numbers["emulated_step_ms"].map(
        lambda v: "-" if _missing(v) else f"{v:g}")
    return text.map(lambda v: "-" if _missing(v) else str(v)), numbers


def detail_text(runs: pd.DataFrame, dataset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One dataset's data-path detail (train and bench runs) as text and as numbers."""
    summary = summarise(runs)
    summary = summary[summary["dataset"] == dataset].sort_values(
        ["mode", "throughput_img_s"], ascending=[False, False])
    levels = ["mode", *(k for k in _row_levels(summary) if k != "mode")]
    text = level_text(summary, levels).assign(repeats=summary["repeats"].astype(str))
    text["img/s"] = _cells(summary, _BY_COLUMN["throughput_img_s"], spread=False)
    for fig in LATENCY_FIGURES:
        text[fig.short] = _cells(summary, fig, spread=True)
    text["RAM kind"] = summary["ram_kind"].astype(str)
    for fig in MEMORY_FIGURES:
        text[fig.short] = _cells(summary, fig, spread=False)
    text["VRAM kind"] = summary["vram_kind"].astype(str)
    text["cold/warm"] = summary["cold"].astype(str)
    text["cold epochs"] = [_cold_epochs(c, e) for c, e in zip(
        summary["cold_epochs"], summary["epochs"], strict=True)]
    text["io path"] = summary["io_path"].astype(str)
    text["evidence"] = summary["io_evidence"].astype(str)
    cols = [*levels, "repeats", "throughput_img_s", *(f.column for f in LATENCY_FIGURES),
            "ram_kind", *(f.column for f in MEMORY_FIGURES), "vram_kind", "cold",
            "cold_epochs", "io_path", "io_evidence"]
    return text.reset_index(drop=True), summary[cols].reset_index(drop=True)


def _cold_epochs(cold: Any, epochs: Any) -> str:
    if _missing(cold):
        return "-"
    return f"{int(cold)}" + ("" if _missing(epochs) else f" of {int(epochs)}")
