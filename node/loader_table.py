"""The body of ``node-agent loaders``: one row per registered loader, printed as a table."""

from __future__ import annotations

import sys
from typing import Any

from rich.table import Table

from shared.progress import stdout_console


def loader_rows(check: bool = False) -> list[dict[str, Any]]:
    """One row per registered loader: name, formats, device, available, reason.

    Args:
        check: import each loader and run its full check (CUDA through torch, packages
            that import, matching CUDA builds); by default a quick check that imports
            neither torch nor any loader's library.
    """
    from node.loaders import LOADER_SPECS

    rows = []
    for name, spec in LOADER_SPECS.items():
        reason = spec.load().unavailable_reason() if check else spec.quick_reason()
        rows.append({"loader": name, "formats": spec.formats_help, "device": spec.device_kind,
                     "available": reason is None, "reason": reason or ""})
    return rows


def print_loaders(check: bool = False) -> None:
    """Print the loader table to stdout (full width, so nothing is cut when redirected)."""
    table = Table(title="formatlab loaders")
    for col in ("loader", "formats", "device", "available", "reason"):
        table.add_column(col, overflow="fold")
    for row in loader_rows(check):
        table.add_row(row["loader"], row["formats"], row["device"],
                      "yes" if row["available"] else "no", row["reason"])
    stdout_console().print(table)
    if not check:
        print("(quick check: driver and packages present; `node-agent loaders --check` "
              "imports each loader to confirm)", file=sys.stderr)
