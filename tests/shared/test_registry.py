"""The one registry mechanism: names, families, help and the unknown-name error."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from shared.registry import Registry, UnknownName


@dataclass(frozen=True)
class Thing:
    name: str
    size: int = 0


class UnknownThing(ValueError):
    pass


def test_register_by_own_name_and_families() -> None:
    reg: Registry[Thing] = Registry("thing", error=UnknownThing)
    a = reg.register(Thing("a", 1))
    reg.add("b", Thing("b", 2))
    reg.family(r"big-(?P<n>[1-9][0-9]*)", lambda m: Thing(m[0], int(m["n"])), "big-N")
    assert reg.get("a") is a and reg["b"].size == 2
    assert reg.get("big-12") == Thing("big-12", 12)
    assert reg.names() == ("a", "b") and list(reg) == ["a", "b"] and len(reg) == 2
    assert "big-3" in reg and "big-0" not in reg and "c" not in reg and 3 not in reg
    assert reg.help() == "a, b, big-N"


def test_unknown_name_lists_valid_names() -> None:
    reg: Registry[Thing] = Registry("thing")
    reg.register(Thing("a"))
    with pytest.raises(UnknownName, match=r"^unknown thing 'zz'; valid things: a$"):
        reg.get("zz")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(Thing("a"))
