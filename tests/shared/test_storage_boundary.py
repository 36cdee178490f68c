"""All storage access goes through shared/storage.py: nothing else reaches its filesystem."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The filesystem object of a store, and fsspec's private async reads.
BYPASS = re.compile(r"store\.fs\b|\._(?:cat|get)_file\b")
OWNER = REPO / "shared" / "storage.py"
TREES = ("shared", "node", "prep", "benchmarks", "scripts")


def _sources() -> list[Path]:
    files = [p for tree in TREES for p in (REPO / tree).rglob("*.py")]
    return sorted(p for p in files if p != OWNER and ".venv" not in p.parts)


def test_no_module_bypasses_the_store() -> None:
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
             for p in _sources()
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if BYPASS.search(line)]
    assert not found, "storage access outside shared/storage.py:\n" + "\n".join(found)


def test_the_guard_sees_the_trees() -> None:
    # An empty walk would pass the test above for nothing.
    names = {p.relative_to(REPO).as_posix() for p in _sources()}
    assert {"node/cache.py", "prep/convert.py", "prep/sources/base.py"} <= names
