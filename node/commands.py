"""The bodies of ``node-agent loaders``, ``cache`` and ``matrix``."""

from __future__ import annotations

import sys
from typing import Any

from rich.table import Table

from node.errors import UsageError
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


def cache(*, store: str, dataset: str, format_id: str, cache: str, rank: int | None,
          world_size: int | None, storage_options: str | None) -> None:
    """Fill the cache for this rank and print what was fetched."""
    from node.runner import fill_cache, resolve_rank

    rank, world_size = resolve_rank(rank, world_size)
    st, manifest = open_dataset(store, dataset, storage_options)
    if format_id not in manifest.format_ids:
        raise UsageError(format_not_in_dataset(format_id, manifest))
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
    from node.progress import MatrixProgress
    from node.runner import RunConfig, open_results, run

    store, manifest = open_dataset(kwargs["store"], kwargs["dataset"], kwargs["storage_options"])
    open_results(kwargs["results"], store.storage_options)  # every pair's, not one pair's
    pairs = matrix_pairs(loader_list, format_list, manifest)
    progress = MatrixProgress(len(pairs) * repeat)
    for rep in range(repeat):
        for name, fid in pairs:
            progress.starting(name, fid, rep)
            config = RunConfig.from_cli(mode="bench" if bench_mode else "train",
                                        loader=name, format_id=fid, repeat=rep,
                                        emulate_step_ms=emulate_step_ms, **kwargs)
            try:
                progress.finished(name, fid, run(config, quiet=True))
            except UsageError as exc:
                progress.finished(name, fid, None, skipped=str(exc))
    progress.summary()
    failures = sum(r.get("status") != "ok" for r in progress.records)
    if failures:
        from node.errors import RunFailed

        raise RunFailed(f"{failures} of {progress.total} runs failed (rows with status "
                        "'failed' are in the results store)")


def matrix_pairs(loader_list: str, format_list: str, manifest: Any) -> list[tuple[str, str]]:
    """The (loader, format) pairs to run; prints the loaders left out and why.

    Raises:
        UsageError: an unknown name, or nothing to run (naming why).
    """
    from node.loaders import LOADERS
    from shared.formats import get_format

    loaders = list(LOADERS) if loader_list == "all" else _split(loader_list)
    formats = list(manifest.format_ids) if format_list == "all" else _split(format_list)
    for name in loaders:
        _spec(name)
    for fid in formats:
        if fid not in manifest.format_ids:
            raise UsageError(format_not_in_dataset(fid, manifest))
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
    if not pairs:
        raise UsageError(f"matrix: nothing to run here; {'; '.join(skipped)}")
    for line in skipped:
        print(f"skip {line}", file=sys.stderr)
    return pairs


def open_dataset(store_url: str, dataset: str,
                 storage_options: str | None) -> tuple[Any, Any]:
    """Open the store and load the dataset's manifest, as usage errors when missing."""
    from shared.manifest import Manifest, ManifestError
    from shared.storage import BadStorageOptions, Store, parse_storage_options

    store = None
    try:
        store = Store.open(store_url, parse_storage_options(storage_options))
        return store, Manifest.load(store, dataset)
    except BadStorageOptions as exc:
        raise UsageError(str(exc)) from None
    except FileNotFoundError as exc:
        raise UsageError(dataset_not_found(store, dataset) if store else str(exc)) from None
    except ManifestError as exc:
        raise UsageError(f"dataset {dataset!r}: {exc}") from None


def preflight(*, store: str, dataset: str, storage_options: str | None, format_id: str,
              loader: str | None = None, **_: Any) -> None:
    """The usage checks that need no torch: the dataset, the format, the loader's name
    and its quick availability check; ``run`` repeats them all in full."""
    _, manifest = open_dataset(store, dataset, storage_options)
    if format_id not in manifest.format_ids:
        raise UsageError(format_not_in_dataset(format_id, manifest))
    if loader is None:
        return
    reason = _spec(loader).quick_reason()
    if reason:
        raise UsageError(f"loader {loader!r} cannot run here: {reason}")


def dataset_not_found(store: Any, dataset: str) -> str:
    """The one-line error for a missing dataset: the store itself, or what it holds."""
    url = store.display_url
    if not store.exists(""):
        return (f"store {url} does not exist; --store takes the --dst folder that "
                "prep/convert.py wrote")
    held = [d for d in store.list("") if store.exists(f"{d}/manifest.json")]
    holds = f"it holds: {', '.join(held)}" if held else "it holds no converted dataset"
    return f"dataset {dataset!r} not found in {url} (no manifest.json); {holds}"


def format_not_in_dataset(format_id: str, manifest: Any) -> str:
    """The one-line error for a format the dataset lacks, listing the ones it has."""
    has = f"dataset {manifest.name!r} has: {', '.join(manifest.format_ids)}"
    if format_id == "all":
        return (f"--format takes one format id, not 'all' (`node-agent matrix --formats all` "
                f"runs every one); {has}")
    return f"format {format_id!r} is not in dataset {manifest.name!r}; it has: " \
        f"{', '.join(manifest.format_ids)}"


def _spec(name: str) -> Any:
    """The loader's registry entry; an unknown name is a usage error listing the valid ones."""
    from node.loaders import UnknownLoader, get_spec

    try:
        return get_spec(name)
    except UnknownLoader as exc:
        raise UsageError(str(exc)) from None


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
