"""The bodies of ``node-agent loaders``, ``cache`` and ``matrix``."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from node.errors import UsageError


def loader_rows() -> list[dict[str, Any]]:
    """One row per registered loader: name, formats, device, available, reason."""
    from node.loaders import LOADERS

    rows = []
    for name, cls in LOADERS.items():
        reason = cls.unavailable_reason()
        rows.append({"loader": name, "formats": cls.formats_help, "device": cls.device_kind,
                     "available": reason is None, "reason": reason or ""})
    return rows


def print_loaders() -> None:
    table = Table(title="formatlab loaders")
    for col in ("loader", "formats", "device", "available", "reason"):
        table.add_column(col)
    for row in loader_rows():
        table.add_row(row["loader"], row["formats"], row["device"],
                      "yes" if row["available"] else "no", row["reason"])
    Console(width=max(Console().width, 120)).print(table)


def cache(*, store: str, dataset: str, format_id: str, cache: str, rank: int | None,
          world_size: int | None, storage_options: str | None) -> None:
    """Fill the cache for this rank and print what was fetched."""
    from node.runner import fill_cache, open_dataset, resolve_rank

    rank, world_size = resolve_rank(rank, world_size)
    st, manifest = open_dataset(store, dataset, storage_options)
    if format_id not in manifest.format_ids:
        raise UsageError(f"format {format_id!r} is not in dataset {dataset!r}; "
                         f"it has: {', '.join(manifest.format_ids)}")
    filled = fill_cache(st, manifest, format_id, cache, rank, world_size, progress=True)
    s = filled.stats
    print(f"cached {dataset}/{format_id} rank {rank}/{world_size}: "
          f"{sum(len(x) for x in filled.train)} train samples"
          f"{f', {sum(len(x) for x in filled.val)} {filled.val_split} samples' if filled.val else ''}; "
          f"{s.files_total} files, {s.bytes_total:,} bytes, fetched {s.files_fetched} files "
          f"({s.bytes_fetched:,} bytes, {s.files_refetched} re-fetched after a bad checksum) "
          f"in {s.seconds:.2f} s")


def matrix(*, loader_list: str, format_list: str, repeat: int, bench_mode: bool,
           emulate_step_ms: float | None, **kwargs: Any) -> None:
    """Run every loader x format pair that fits and can run here, one after another."""
    from node.loaders import LOADERS
    from node.runner import RunConfig, open_dataset, run
    from shared.formats import get_format

    _, manifest = open_dataset(kwargs["store"], kwargs["dataset"], kwargs["storage_options"])
    loaders = list(LOADERS) if loader_list == "all" else _split(loader_list)
    formats = list(manifest.format_ids) if format_list == "all" else _split(format_list)
    for name in loaders:
        if name not in LOADERS:
            raise UsageError(f"unknown loader {name!r}; valid loaders: {', '.join(LOADERS)}")
    for fid in formats:
        if fid not in manifest.format_ids:
            raise UsageError(f"format {fid!r} is not in dataset {kwargs['dataset']!r}; "
                             f"it has: {', '.join(manifest.format_ids)}")
    pairs, skipped = [], []
    for name in loaders:
        cls = LOADERS[name]
        reason = cls.unavailable_reason()
        fitting = [f for f in formats if cls.supports(get_format(f))]
        if reason:
            skipped.append(f"{name}: {reason}")
        elif not fitting:
            skipped.append(f"{name}: none of the formats {', '.join(formats)} fits it")
        else:
            pairs += [(name, f) for f in fitting]
    for line in skipped:
        print(f"skip {line}", file=sys.stderr)
    total = len(pairs) * repeat
    failures = 0
    step = 0
    for rep in range(repeat):
        for name, fid in pairs:
            step += 1
            print(f"[{step}/{total}] {name} x {fid} (repeat {rep})", file=sys.stderr, flush=True)
            config = RunConfig.from_cli(mode="bench" if bench_mode else "train",
                                        loader=name, format_id=fid, repeat=rep,
                                        emulate_step_ms=emulate_step_ms, **kwargs)
            try:
                record = run(config, quiet=True)
            except UsageError as exc:
                print(f"[{step}/{total}] skip {name} x {fid}: {exc}", file=sys.stderr)
                continue
            status = record.get("status")
            if status != "ok":
                failures += 1
            print(f"[{step}/{total}] {name} x {fid}: {status}, "
                  f"{record.get('throughput_img_s') or 0:,.0f} img/s, "
                  f"data wait {100 * (record.get('data_wait_fraction') or 0):.0f}%"
                  + (f", error: {record.get('error')}" if status != "ok" else ""),
                  file=sys.stderr, flush=True)
    if failures:
        from node.errors import RunFailed

        raise RunFailed(f"{failures} of {total} runs failed (rows with status 'failed' "
                        "are in the results store)")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
