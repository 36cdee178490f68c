"""Kinds of option beyond formatlab's cached per-file loaders: packed, streamed, peers.

A *packed* format stores a shard as one archive of per-sample members (format kind
``packed``, ids ``wds-<codec>``); a *streamed* run read straight from the store
(``data_access`` ``stream``, ``--no-cache``) instead of the node's local cache; a *peer*
is another project's loader measured in the same harness (``shared.results.PEER_LOADERS``,
written by ``benchmarks/peers.py``). The recommendation weighs them with the rest and says
in one line which of them the store holds runs for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from shared.formats import get_format
from shared.formats.base import UnknownFormat
from shared.results import PEER_LOADERS, STREAM

PACKED_KIND = "packed"
_PACKED_PREFIX = "wds-"  # the packed formats' ids, for formats this build does not register


def is_packed(format_id: Any) -> bool:
    """Whether ``format_id`` names a packed format (its kind, else its ``wds-`` id)."""
    if not isinstance(format_id, str):
        return False
    try:
        return str(getattr(get_format(format_id).kind, "value", "")) == PACKED_KIND
    except (UnknownFormat, ValueError):
        return format_id.startswith(_PACKED_PREFIX)


def is_peer(loader: Any) -> bool:
    return isinstance(loader, str) and loader in PEER_LOADERS


def is_streamed(access: Any) -> bool:
    return access == STREAM


def option_label(option: Mapping[str, Any]) -> str:
    """`` (streamed)``, `` (peer)``, both or nothing: what an option's name leaves unsaid."""
    said = [k for k, yes in (("streamed", is_streamed(option.get("data_access"))),
                             ("peer", is_peer(option.get("loader")))) if yes]
    return f" ({', '.join(said)})" if said else ""


def _listed(values: Iterable[Any]) -> str:
    return ", ".join(sorted({str(v) for v in values}))


def kinds_line(ok: pd.DataFrame) -> str:
    """One line: which of packed formats, streamed runs and peer loaders ``ok`` (successful
    runs, with ``data_access`` filled) holds, and which it has no runs for."""
    formats = ok["format"].dropna() if "format" in ok else pd.Series(dtype=object)
    loaders = ok["loader"].dropna() if "loader" in ok else pd.Series(dtype=object)
    access = ok["data_access"] if "data_access" in ok else pd.Series(dtype=object)
    packed = [f for f in formats if is_packed(f)]
    peers = [name for name in loaders if is_peer(name)]
    streamed = ok[access.map(is_streamed).astype(bool)] if len(ok) else ok
    kinds = [  # (what was measured, or "" / [] / 0; what to say when nothing was)
        (packed and f"packed formats ({_listed(packed)})",
         "no packed-format runs measured (wds-*: convert with --formats packed)"),
        (len(streamed) and "streaming runs (" + _listed(
            f"{r.loader} on {r.format}" for r in streamed.itertuples()) + ")",
         "no streaming runs measured (`--no-cache`)"),
        (peers and f"peer loaders ({_listed(peers)})",
         "no peer-loader runs measured (benchmarks/peers.py --results)"),
    ]
    measured = [yes for yes, _ in kinds if yes]
    missing = [no for yes, no in kinds if not yes]
    head = f"measured {'; '.join(measured)}" if measured else ""
    tail = "; ".join(missing)
    return "**Packed, streaming, peers**: " + ". ".join(p for p in (head, tail) if p) + "."
