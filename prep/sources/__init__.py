"""Raw-dataset sources for prep, one module each, registered by name in :data:`SOURCES`."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from prep.sources.base import Payload, Source, SourceError, SourceItem, SourceListing
from prep.sources.cifar10 import Cifar10Source
from prep.sources.image_folder import ImageFolderSource
from prep.sources.tiny_imagenet import TinyImageNetSource

SOURCES: dict[str, type[Source]] = {
    "cifar10": Cifar10Source,
    "tiny-imagenet": TinyImageNetSource,
    "image-folder": ImageFolderSource,
}


def get_source(name: str, url: str, storage_options: Mapping[str, Any] | None = None,
               **options: Any) -> Source:
    """Build the source registered as ``name``.

    Options a source does not take are an error, except those passed as None (meaning
    "not given"), so a CLI can pass every flag through.

    Raises:
        SourceError: Unknown source name, an option it does not take, or a bad value.
    """
    try:
        cls = SOURCES[name]
    except KeyError:
        raise SourceError(
            f"unknown source {name!r}; valid sources: {', '.join(SOURCES)}") from None
    given = {k: v for k, v in options.items() if v is not None}
    accepted = {p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(given.keys() - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise SourceError(f"{name}: does not take option {', '.join(unknown)} (takes: {takes})")
    try:
        return cls(url, storage_options, **given)
    except ValueError as exc:
        raise SourceError(f"{name}: {exc}") from None


__all__ = [
    "SOURCES",
    "Cifar10Source",
    "ImageFolderSource",
    "Payload",
    "Source",
    "SourceError",
    "SourceItem",
    "SourceListing",
    "TinyImageNetSource",
    "get_source",
]
