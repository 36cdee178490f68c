"""The recommendation: what limits the step, which options differ beyond the noise.

A winner is named only where its throughput's spread lies clear of the next option's
and both ran at least ``MIN_REPEATS`` times; otherwise the options whose spreads overlap
are listed as equivalent, with what then decides between them: size on disk, CPU cost
and accuracy. An option is a loader on a format, cached or streamed; peers' loaders are
options like formatlab's. Where a pair ran both cached and streamed it puts the cache
fill plus first epoch beside the streamed first epoch. It also says which of packed
formats, streaming and peers it measured, and what the store holds no measurement of.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from node.loaders.registry import LOADER_SPECS
from node.report.groups import varying, with_settings
from node.report.kinds import is_streamed, kinds_line, option_label
from node.report.tables import _first, format_bytes, format_size_table, primary_summary
from node.report.units import _bytes, _fraction, _pct, _rate, _seconds

DATA_BOUND = 0.10  # a loader waited for data longer than this share of the epoch
MIN_REPEATS = 3    # runs of each side before a difference in speed is called a win
# formatlab's GPU loaders, as the loader registry declares them.
GPU_LOADERS = tuple(name for name, spec in LOADER_SPECS.items() if spec.device_kind == "cuda")


_PICK_FIGURES = ("throughput_img_s", "throughput_img_s_min", "throughput_img_s_max",
                 "data_wait_fraction", "accelerator_utilization", "mean_epoch_time_s",
                 "val_accuracy", "cpu_util_mean_pct", "cache_time_s", "first_epoch_time_s",
                 "cache_then_first_s", "best_epoch_time_s")


def recommend(runs: pd.DataFrame, conversions: pd.DataFrame,
              max_bytes: int | None = None) -> dict[str, dict[str, Any]]:
    """Per comparison cell: the bottleneck, a winner or the equivalent options, a budget pick.

    A cell is one dataset under one set of settings (``groups.SETTING_KEYS``); it is
    keyed by the dataset's name, with the settings that differ in brackets where a
    dataset has several cells; cached and streamed runs (``data_access``) are options
    within a cell, not cells apart. Train runs decide; a dataset with only bench runs is
    judged on those. ``best`` is the highest median throughput, named the ``winner``
    only when its min exceeds the next option's max and both ran ``MIN_REPEATS`` times
    (``margin``: its median over the next one's, minus 1); ``equivalent`` lists the
    options whose spreads overlap the best's. With
    ``max_bytes``, also the fastest pair whose format's total bytes for the dataset (all
    splits, from ``conversions``) are at most ``max_bytes``; a format with no
    conversions row cannot be checked and is not picked.

    Returns:
        ``{cell: {"dataset", "settings", "mode", "best", "winner", "margin", "runner_up",
        "equivalent", "decided", "data_bound", "options", "max_bytes", "within_budget",
        "unknown_size"}}``; ``best`` / ``winner`` / ``runner_up`` / ``within_budget``
        are dicts of an option's figures (``loader``, ``format``, ``data_access``,
        ``model``, ``repeats``, medians of throughput, data wait, CPU, accuracy, cache
        and first / best epoch times, ``bytes`` on disk) or None;
        ``equivalent``, ``data_bound`` and ``options`` are lists of them.
    """
    sizes = format_bytes(conversions)
    primary = primary_summary(runs)
    out: dict[str, dict[str, Any]] = {}
    for (dataset, settings), rows in _cells(primary):
        rows = (rows.dropna(subset=["throughput_img_s"])
                .sort_values(["throughput_img_s", "loader", "format"],
                             ascending=[False, True, True]))
        entry: dict[str, Any] = {"dataset": dataset, "settings": settings,
                                 "mode": _first(rows["mode"]) or "train",
                                 "best": None, "max_bytes": max_bytes, "within_budget": None,
                                 "unknown_size": sorted({f for f in rows["format"]
                                                         if (dataset, f) not in sizes})}
        if not rows.empty:
            entry["best"] = _pick(rows.iloc[0], sizes)
            entry |= _verdict([_pick(r, sizes) for _, r in rows.iterrows()])
        if max_bytes is not None:
            fits = rows[rows["format"].map(
                lambda f: sizes.get((dataset, f), max_bytes + 1) <= max_bytes).astype(bool)]
            if not fits.empty:
                entry["within_budget"] = _pick(fits.iloc[0], sizes)
        out[f"{dataset} [{settings}]" if settings else str(dataset)] = entry
    return out


def _pick(row: pd.Series, sizes: Mapping[tuple[str, str], int]) -> dict[str, Any]:
    pick = {"loader": row["loader"], "format": row["format"], "model": row["model"],
            "world_size": int(row["world_size"]), "repeats": int(row["repeats"]),
            "io_path": row["io_path"], "dataset": row["dataset"],
            "data_access": row["data_access"]}
    for col in _PICK_FIGURES:
        pick[col] = _num(row[col])
    pick["bytes"] = sizes.get((row["dataset"], row["format"]))
    return pick


def _num(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _cells(primary: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """``((dataset, settings label), rows)`` per comparison cell, in dataset order.

    Cached and streamed runs share a cell: they are options to compare, not settings.
    """
    keys = [k for k in varying(primary) if k != "data_access"]
    cells = []
    for dataset, part in primary.groupby("dataset", sort=True):
        if not keys:
            cells.append(((str(dataset), ""), part))
            continue
        for values, cell in part.groupby(keys, dropna=False, sort=True):
            values = values if isinstance(values, tuple) else (values,)
            label = ", ".join(f"{k} {v}" for k, v in zip(keys, values, strict=True))
            cells.append(((str(dataset), label), cell))
    return cells


def _verdict(options: list[dict[str, Any]]) -> dict[str, Any]:
    """Winner or equivalents among ``options`` (fastest median first), and the bottleneck."""
    top = options[0]
    nxt = options[1] if len(options) > 1 else None
    apart = nxt is not None and _lo(top) > _hi(nxt)
    enough = nxt is not None and min(top["repeats"], nxt["repeats"]) >= MIN_REPEATS
    equivalent = [o for o in options if _hi(o) >= _lo(top)]
    margin = (top["throughput_img_s"] / nxt["throughput_img_s"] - 1
              if nxt is not None and nxt["throughput_img_s"] else None)
    bound = [o for o in options if (o["data_wait_fraction"] or 0.0) > DATA_BOUND]
    return {"winner": top if apart and enough else None, "runner_up": nxt,
            "margin": margin, "decided": apart and enough, "equivalent": equivalent,
            "data_bound": bound, "options": options}


def _lo(pick: Mapping[str, Any]) -> float:
    return pick["throughput_img_s_min"] if pick["throughput_img_s_min"] is not None else \
        pick["throughput_img_s"]


def _hi(pick: Mapping[str, Any]) -> float:
    return pick["throughput_img_s_max"] if pick["throughput_img_s_max"] is not None else \
        pick["throughput_img_s"]


def recommendation_text(recs: Mapping[str, Mapping[str, Any]], conversions: pd.DataFrame,
                        runs: pd.DataFrame | None = None) -> list[str]:
    """The recommendation as Markdown lines: one section per cell, then what was not run."""
    sizes = format_size_table(conversions)
    lines = ["# Recommendation", ""]
    if not recs:
        return [*lines, "No successful runs: nothing to recommend."]
    for cell, rec in recs.items():
        lines += [f"## {cell}", ""]
        if rec["best"] is None:
            lines += ["No successful run recorded a throughput.", ""]
            continue
        lines += (_bottleneck_lines(rec) + _choice_lines(rec) + _access_lines(rec)
                  + _budget_lines(rec, sizes))
        if rec["unknown_size"]:
            lines.append(f"- No conversions row (size unknown) for: "
                         f"{', '.join(rec['unknown_size'])}.")
        lines.append("")
    if runs is not None:
        lines += ["## What was and was not measured", ""]
        lines += [f"- {n}" for n in not_measured(runs)]
        lines.append("")
    return lines


def _name(p: Mapping[str, Any]) -> str:
    return f"`{p['loader']}` on `{p['format']}`{option_label(p)}"


def _bottleneck_lines(rec: Mapping[str, Any]) -> list[str]:
    step = "the model" if rec["mode"] == "train" else "the emulated step"
    bound = rec["data_bound"]
    if not bound:
        worst = max((o["data_wait_fraction"] or 0.0) for o in rec["options"])
        return [f"- **Bottleneck: {step}.** Every option waited for data under "
                f"{_fraction(DATA_BOUND)} of the epoch (at most {_fraction(worst)}), so the loaders "
                "keep it busy; speed barely separates them and the choice falls to size on "
                "disk, CPU cost and accuracy."]
    names = ", ".join(f"{_name(o)} ({_fraction(o['data_wait_fraction'])})" for o in bound)
    busy = [_name(o) for o in rec["options"] if o not in bound]
    rest = (f"; {', '.join(busy)} keep {step} busy" if busy
            else f"; no option keeps {step} busy, so the loader decides the speed")
    return [f"- **Bottleneck: data loading** (data wait above {_fraction(DATA_BOUND)} of the "
            f"epoch) for {names}{rest}."]


def _choice_lines(rec: Mapping[str, Any]) -> list[str]:
    what = "train runs" if rec["mode"] == "train" else "bench runs; no train runs"
    best, nxt, margin = rec["best"], rec["runner_up"], rec["margin"]
    lines = [f"- **Fastest measured** ({what}): {_pair_text(best)}"]
    if rec["winner"] is not None:
        lines.append(f"- **Winner: {_name(best)}**, {margin:+.0%} throughput over the next, "
                     f"{_name(nxt)} ({_rate(nxt['throughput_img_s'])} img/s): outside the "
                     f"measured spread, {best['repeats']} and {nxt['repeats']} runs.")
    elif nxt is None:
        lines.append("- **No comparison**: only one option was measured.")
    elif len(rec["equivalent"]) > 1:
        names = ", ".join(_name(o) for o in rec["equivalent"])
        lines.append(f"- **No single winner**: {names} are equivalent within the measured "
                     "spread (min–max of their runs overlap).")
    else:
        lines.append(f"- **No decided winner**: {_name(best)} leads {_name(nxt)} by "
                     f"{margin:+.0%}, but from fewer than {MIN_REPEATS} runs each "
                     f"({best['repeats']} and {nxt['repeats']}); repeat them "
                     f"(`node-agent matrix --repeat {MIN_REPEATS}`) to decide.")
    if rec["winner"] is None or not rec["data_bound"]:
        lines += _tradeoff_lines(rec["equivalent"] if len(rec["equivalent"]) > 1
                                 else rec["options"])
    return lines


def _tradeoff_lines(options: list[Mapping[str, Any]]) -> list[str]:
    """Among options speed does not separate: smallest on disk, lowest CPU, best accuracy."""
    def best_by(key: str, text: Any, highest: bool) -> str | None:
        known = [o for o in options if o.get(key) is not None]
        if len(known) < 2 or len({o[key] for o in known}) == 1:
            return None  # nothing to choose between
        pick = (max if highest else min)(known, key=lambda o: o[key])
        return f"{_name(pick)} ({text(pick[key])})"

    said = [(label, best_by(key, text, high)) for label, key, text, high in (
        ("smallest on disk", "bytes", _bytes, False),
        ("lowest CPU", "cpu_util_mean_pct", _pct, False),
        ("highest accuracy", "val_accuracy", _fraction, True))]
    said = [f"{label} {value}" for label, value in said if value]
    return [f"- **Then decide on**: {'; '.join(said)}."] if said else []


def _access_lines(rec: Mapping[str, Any]) -> list[str]:
    """Per (loader, format) measured both cached and streamed: the time to the end of the
    first epoch each way (cache fill included) and the best epoch each way."""
    by_pair: dict[tuple[str, str], dict[bool, Mapping[str, Any]]] = {}
    for o in rec["options"]:
        by_pair.setdefault((o["loader"], o["format"]), {})[is_streamed(o["data_access"])] = o
    lines = []
    for (loader, fmt), ways in sorted(by_pair.items()):
        if len(ways) < 2:
            continue
        cached, streamed = ways[False], ways[True]
        to_first = (cached["cache_then_first_s"], streamed["first_epoch_time_s"])
        sooner = ("" if None in to_first else
                  f": {'streaming' if to_first[1] < to_first[0] else 'caching'} ends the "
                  "first epoch sooner")
        lines.append(
            f"- **Cache or stream** (`{loader}` on `{fmt}`): cache then train "
            f"{_seconds(cached['cache_time_s'])} fill + "
            f"{_seconds(cached['first_epoch_time_s'])} first epoch = "
            f"{_seconds(to_first[0])}, best epoch {_seconds(cached['best_epoch_time_s'])}; "
            f"stream {_seconds(to_first[1])} first epoch, best epoch "
            f"{_seconds(streamed['best_epoch_time_s'])}{sooner}.")
    return lines


def _budget_lines(rec: Mapping[str, Any], sizes: pd.DataFrame) -> list[str]:
    budget = rec["max_bytes"]
    if budget is None:
        return []
    head = f"- **Fastest within {_bytes(budget)}** (`--max-bytes {budget}`): "
    if rec["within_budget"] is not None:
        return [head + _pair_text(rec["within_budget"])]
    mine = sizes[sizes["dataset"] == rec["dataset"]]
    if mine.empty:
        return [head + f"cannot tell: no conversions rows for {rec['dataset']}, so no "
                "format's size is known (prep/convert.py --results)."]
    return [head + "none of the measured formats fits; the smallest on record is "
            f"{mine.iloc[0]['format']} at {_bytes(mine.iloc[0]['bytes'])}."]


def not_measured(runs: pd.DataFrame) -> list[str]:
    """What the store's successful runs did not cover, one line each: first which of
    packed formats, streaming and peer loaders were measured and which were not
    (:func:`kinds.kinds_line`), then GPU loaders and cold epochs where not run."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    loaders = set(ok.get("loader", pd.Series(dtype=object)).dropna())
    devices = {str(d) for d in ok.get("device", pd.Series(dtype=object)).dropna()}
    out = []
    if not loaders & set(GPU_LOADERS):
        out.append(f"GPU loaders ({', '.join(GPU_LOADERS)}): not run"
                   + ("" if any(d.startswith("cuda") for d in devices)
                      else "; no run used a GPU, so accelerator utilisation is the CPU's "
                           "compute share, not a GPU's"))
    settled = with_settings(ok)
    if not (settled["cold"] == "cold").any():
        out.append("cold epochs (`--cold`): not run; every figure read warm data "
                   "(page cache)")
    return [kinds_line(settled), *out]


def _pair_text(p: Mapping[str, Any]) -> str:
    spread = f"median of {p['repeats']} runs" if p["repeats"] > 1 else "1 run"
    model = f", model {p['model']}" if p["model"] not in ("-", None) else ""
    ranks = f", {p['world_size']} ranks (rank 0)" if p["world_size"] > 1 else ""
    disk = _bytes(p["bytes"]) + " on disk" if p["bytes"] is not None else "size unknown"
    accuracy = (f", accuracy {_fraction(p['val_accuracy'])}"
                if p["val_accuracy"] is not None else "")
    return (f"`{p['loader']}` loader on `{p['format']}`{option_label(p)} — "
            f"{_rate(p['throughput_img_s'])} img/s "
            f"({spread}{model}{ranks}), data wait {_fraction(p['data_wait_fraction'])}, "
            f"epoch {_seconds(p['mean_epoch_time_s'])}{accuracy}, {disk}, "
            f"io path {p['io_path']}")
