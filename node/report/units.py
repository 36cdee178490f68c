"""Human units for the report's cells: bytes, seconds, percentages, rates, spreads."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from node.report.tables import Figure


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


def level_text(df: pd.DataFrame, levels: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Row-label columns as text: missing values as ``-``, whole floats without ``.0``."""
    def one(v: Any) -> str:
        if _missing(v):
            return "-"
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return df[list(levels)].map(one)
