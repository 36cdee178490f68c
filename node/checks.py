"""The usage checks that need no torch, answered before anything heavy is imported:
the store and the dataset in it, the format in the dataset, the loader's name and its
quick availability check. :mod:`node.plan` repeats them in full."""

from __future__ import annotations

from typing import Any

from node.cache import format_entry
from node.config import DataOptions
from node.errors import UsageError


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


def dataset_not_found(store: Any, dataset: str) -> str:
    """The one-line error for a missing dataset: the store itself, or what it holds."""
    url = store.display_url
    if not store.exists(""):
        return (f"store {url} does not exist; --store takes the --dst folder that "
                "prep/convert.py wrote")
    held = [d for d in store.list("") if store.exists(f"{d}/manifest.json")]
    holds = f"it holds: {', '.join(held)}" if held else "it holds no converted dataset"
    return f"dataset {dataset!r} not found in {url} (no manifest.json); {holds}"


def loader_spec(name: str) -> Any:
    """The loader's registry entry; an unknown name is a usage error listing the valid ones."""
    from node.loaders import UnknownLoader, get_spec

    try:
        return get_spec(name)
    except UnknownLoader as exc:
        raise UsageError(str(exc)) from None


def preflight(data: DataOptions, loader: str) -> None:
    """The usage checks that need no torch: the dataset, the format, the loader's name
    and its quick availability check; :func:`node.plan.resolve` repeats them in full."""
    _, manifest = open_dataset(data.store, data.dataset, data.storage_options)
    format_entry(manifest, data.format_id)
    reason = loader_spec(loader).quick_reason()
    if reason:
        raise UsageError(f"loader {loader!r} cannot run here: {reason}")
