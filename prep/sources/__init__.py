"""Raw-dataset sources for prep, one module each, registered under their own name.

A new source is one module (a :class:`Source` subclass with its ``name``) plus one
``SOURCES.register`` line here; ``prep/convert.py`` takes its choices from
:data:`SOURCES` and tests/prep/test_source_contract.py checks every registered source.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prep.sources.base import Payload, Source, SourceError, SourceItem, SourceListing
from prep.sources.cifar10 import Cifar10Source
from prep.sources.image_folder import ImageFolderSource
from prep.sources.tiny_imagenet import TinyImageNetSource
from shared.registry import Registry

# SourceError is not a ValueError (a bad source is not a bad value); the registry only
# raises it.
SOURCES: Registry[type[Source]] = Registry("source", error=SourceError)  # type: ignore[arg-type]
SOURCES.register(Cifar10Source)
SOURCES.register(TinyImageNetSource)
SOURCES.register(ImageFolderSource)


def get_source(name: str, url: str, storage_options: Mapping[str, Any] | None = None,
               **options: Any) -> Source:
    """Build the source registered as ``name``.

    Options a source does not take are an error, except those passed as None (meaning
    "not given"), so a CLI can pass every flag through.

    Raises:
        SourceError: Unknown source name, an option it does not take, or a bad value.
    """
    cls = SOURCES.get(name)
    given = {k: v for k, v in options.items() if v is not None}
    accepted = set(cls.option_names())
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
