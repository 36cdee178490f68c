"""Like for like: which runs may be medianed together, and what each group mixes.

Runs are grouped by every setting that changes a figure (``GROUP_KEYS``): the hardware
(``hardware_id``, or the host where an older row has none), GPU, device, model, batch
size, workers, cold or warm, data access (read the local cache or streamed from the
store), mode, emulated step and image size. A group may still mix
settings that are recorded but not grouped by (``MIX_KEYS``: hosts of the same hardware,
epochs, samples per epoch, CPU budget); its ``mixes`` cell says which.

Columns added after the first schema (``hardware_id``, ``cold_requested``, the wait
percentiles...) may be absent from older rows or whole stores: they read as missing.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from shared.results import data_access

# The settings a figure depends on, beyond (dataset, loader, format).
SETTING_KEYS = ("mode", "model", "world_size", "hardware", "gpu_name", "device",
                "batch_size", "workers", "cold", "data_access", "emulated_step_ms",
                "image_size")
GROUP_KEYS = ["dataset", "loader", "format", *SETTING_KEYS]
# Recorded settings a group may mix without being split; its ``mixes`` cell names them.
MIX_KEYS = ("host", "epochs", "samples_per_epoch", "cpu_budget")
_MISSING = "-"


def column(df: pd.DataFrame, name: str) -> pd.Series:
    """``df[name]``, or an all-missing column where the store has none."""
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index,
                                                 dtype=object)


def _config(row_config: Any) -> dict[str, Any]:
    try:
        value = json.loads(row_config) if isinstance(row_config, str) else None
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _cold_label(requested: Any, config: Any) -> str:
    """``cold`` / ``warm`` from ``cold_requested``, else the run's recorded config."""
    if requested is None or pd.isna(requested):
        requested = _config(config).get("cold")
    if requested is None or pd.isna(requested):
        return _MISSING
    return "cold" if bool(requested) else "warm"


def _text(series: pd.Series) -> pd.Series:
    return series.map(lambda v: _MISSING if v is None or pd.isna(v) else str(v))


def _int(series: pd.Series, default: int | None = None) -> pd.Series:
    values = pd.to_numeric(series, errors="coerce")
    if default is not None:
        values = values.fillna(default)
    return values.astype("Int64")


def with_settings(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every key of ``GROUP_KEYS`` present and filled for grouping."""
    df = df.copy()
    df["mode"] = column(df, "mode").fillna("train")
    df["host"] = column(df, "host")
    df["model"] = _text(column(df, "model"))
    df["world_size"] = _int(column(df, "world_size"), 1)
    hardware = column(df, "hardware_id")
    df["hardware"] = [h if isinstance(h, str) and h else f"host {host}"
                      for h, host in zip(hardware, _text(column(df, "host")), strict=True)]
    for name in ("gpu_name", "device"):
        df[name] = _text(column(df, name))
    for name in ("batch_size", "workers", "image_size"):
        df[name] = _int(column(df, name))
    df["cold"] = [_cold_label(r, c) for r, c in zip(column(df, "cold_requested"),
                                                    column(df, "config"), strict=True)]
    df["data_access"] = [a if isinstance(a, str) and a else data_access(c) for a, c in zip(
        column(df, "data_access"), column(df, "config"), strict=True)]
    df["emulated_step_ms"] = pd.to_numeric(column(df, "emulated_step_ms"),
                                           errors="coerce").astype("float64")
    df["val_samples"] = column(df, "confusion_matrix").map(_matrix_total)
    return df


def _matrix_total(matrix: Any) -> float:
    """Validation samples: the sum of the confusion matrix (NaN where none)."""
    try:
        rows = json.loads(matrix) if isinstance(matrix, str) else None
        return float(sum(sum(r) for r in rows)) if rows else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _distinct(values: pd.Series) -> list[str]:
    return sorted({str(v) for v in values if v is not None and not pd.isna(v)})


def mixes(part: pd.DataFrame) -> str:
    """What one group's runs differ in, e.g. ``hosts a, b; epochs 2, 3`` (``-``: nothing)."""
    said = []
    for key in MIX_KEYS:
        seen = _distinct(column(part, key).map(_whole))
        if len(seen) > 1:
            said.append(f"{'hosts' if key == 'host' else key} {', '.join(seen)}")
    return "; ".join(said) or _MISSING


def varying(summary: pd.DataFrame, keys: tuple[str, ...] = SETTING_KEYS) -> list[str]:
    """The keys whose value differs between configurations of one dataset."""
    if summary.empty:
        return []
    counts = summary.groupby("dataset")[list(keys)].nunique(dropna=False).max()
    return [k for k in keys if counts[k] > 1]


def steps_per_epoch(samples: Any, batch: Any) -> float:
    """Optimiser steps per epoch (``ceil(samples / batch)``; NaN where unknown)."""
    try:
        s, b = float(samples), float(batch)
    except (TypeError, ValueError):
        return float("nan")
    return float(-(-s // b)) if b > 0 and s == s else float("nan")


def settings_table(ok: pd.DataFrame) -> pd.DataFrame:
    """The settings of each group of comparable runs (rows from :func:`with_settings`).

    One row per (dataset, ``SETTING_KEYS``): the hosts, epochs, steps per epoch,
    validation samples and CPU budgets its runs recorded, how many (loader, format)
    options and runs it holds.
    """
    cols = ["dataset", *SETTING_KEYS, "hosts", "epochs", "steps_per_epoch", "val_samples",
            "cpu_budget", "options", "runs"]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    ok = ok.assign(steps_per_epoch=[steps_per_epoch(s, b) for s, b in zip(
        column(ok, "samples_per_epoch"), ok["batch_size"], strict=True)],
        cpu_budget=column(ok, "cpu_budget"), epochs=column(ok, "epochs"))
    rows = []
    keys = ["dataset", *SETTING_KEYS]
    for values, part in ok.groupby(keys, dropna=False, sort=True):
        row = dict(zip(keys, values, strict=True))
        for name in ("host", "epochs", "steps_per_epoch", "val_samples", "cpu_budget"):
            seen = _distinct(part[name].map(_whole))
            row["hosts" if name == "host" else name] = ", ".join(seen) or _MISSING
        row["options"] = part.groupby(["loader", "format"]).ngroups
        row["runs"] = len(part)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _whole(value: Any) -> Any:
    """Whole numbers without a trailing ``.0`` (2.0 -> 2), anything else as it is."""
    if isinstance(value, float) and value == value and value.is_integer():
        return int(value)
    return value
