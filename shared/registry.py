"""One registry mechanism for formats, loaders and sources.

Each registry maps a name to an entry. Entries are registered under their own name
(``entry.name`` by default), so a name is never spelled twice; parameterised families
(``jpeg-q<N>``) are registered as patterns with a builder. The CLIs take their choices
and help from :meth:`Registry.names` and :meth:`Registry.help`, and an unknown name
raises the registry's error with the valid names in one line.

    FORMATS: Registry[Callable[[], Format]] = Registry("format", error=UnknownFormat)
    FORMATS.add("png", PngFormat)
    FORMATS.family(r"jpeg-q(?P<n>[1-9][0-9]?|100)", lambda m: ..., help="jpeg-qN (N = 1..100)")
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that a registry does not know."""


@dataclass(frozen=True)
class Family(Generic[T]):
    """A parameterised family of names: a full-match pattern and a builder of its entry."""

    pattern: re.Pattern[str]
    build: Callable[[re.Match[str]], T]
    help: str


class Registry(Generic[T]):
    """Names to entries, in registration order, plus pattern families.

    Args:
        kind: what the entries are (``format``, ``loader``, ``source``), for messages.
        error: the exception raised for unknown names (a :class:`ValueError` subclass).
        plural: the plural used in messages (default ``kind + "s"``).
    """

    def __init__(self, kind: str, *, error: type[ValueError] = UnknownName,
                 plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.error = error
        self._entries: dict[str, T] = {}
        self._families: list[Family[T]] = []

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; returns it (usable as a decorator's body).

        Raises:
            ValueError: ``name`` is already registered (a programming error).
        """
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, entry: T, *, attr: str = "name") -> T:
        """Register ``entry`` under its own name (``entry.<attr>``)."""
        return self.add(str(getattr(entry, attr)), entry)

    def family(self, pattern: str, build: Callable[[re.Match[str]], T], help: str) -> None:
        """Register every name that fully matches ``pattern``; ``build`` makes its entry."""
        self._families.append(Family(re.compile(pattern), build, help))

    def get(self, name: str) -> T:
        """The entry of ``name``: a fixed name first, then the first family that matches.

        Raises:
            self.error: unknown name; the message lists the valid ones.
        """
        if name in self._entries:
            return self._entries[name]
        for fam in self._families:
            match = fam.pattern.fullmatch(name)
            if match:
                return fam.build(match)
        raise self.error(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        return f"unknown {self.kind} {name!r}; valid {self.plural}: {self.help()}"

    def names(self) -> tuple[str, ...]:
        """The fixed names, in registration order (a CLI's ``choices``)."""
        return tuple(self._entries)

    def help(self) -> str:
        """One line naming every valid name, families included."""
        return ", ".join([*self._entries, *(f.help for f in self._families)])

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self._entries or any(f.pattern.fullmatch(name)
                                            for f in self._families)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries, {len(self._families)} families)"


def describe(entry: Any) -> str:
    """The first line of an entry's docstring (for ``--help`` tables)."""
    doc = getattr(entry, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
