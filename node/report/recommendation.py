"""The recommendation: the fastest (format, loader) pair per dataset, and within a budget."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from node.report.tables import _first, format_bytes, format_size_table, primary_summary
from node.report.units import _bytes, _fraction, _rate, _seconds


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
