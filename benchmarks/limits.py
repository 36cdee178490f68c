"""Ratios against their limits: one line format, one table, one exit code.

Every benchmark builds a :class:`Check` per measured ratio and ends with
``sys.exit(finish(checks))``: each check prints one line

    check: <name> | ratio 0.93 | limit >= 0.8 | ok | <what was measured>

and the exit status is 1 when any ratio misses its limit. ``run_all.py`` reads those
lines back from each benchmark's output with :func:`parse` and prints them as one table.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_OPS = {">=": operator.ge, "<=": operator.le}
_LINE = re.compile(r"^check: (?P<name>.+?) \| ratio (?P<ratio>\S+) \| limit (?P<op>>=|<=) "
                   r"(?P<limit>\S+) \| (?P<verdict>ok|MISSED) \| (?P<detail>.*)$")


@dataclass(frozen=True)
class Check:
    """One measured ratio and the limit it must meet (``op`` is ``>=`` or ``<=``)."""

    name: str
    ratio: float
    limit: float
    op: str = ">="
    detail: str = ""

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"op must be one of {sorted(_OPS)}, not {self.op!r}")

    @property
    def ok(self) -> bool:
        """Whether the ratio meets its limit (a NaN ratio never does)."""
        return bool(_OPS[self.op](self.ratio, self.limit))

    def line(self) -> str:
        """The line :func:`parse` reads back."""
        verdict = "ok" if self.ok else "MISSED"
        return (f"check: {self.name} | ratio {self.ratio:.2f} | limit {self.op} "
                f"{self.limit:g} | {verdict} | {self.detail}")


def parse(output: str) -> list[Check]:
    """The checks printed in a benchmark's output, in order."""
    checks = []
    for text in output.splitlines():
        m = _LINE.match(text.strip())
        if m:
            checks.append(Check(m["name"], float(m["ratio"]), float(m["limit"]), m["op"],
                                m["detail"]))
    return checks


def finish(checks: Iterable[Check]) -> int:
    """Print every check's line; 1 if any missed its limit (or none was measured), else 0."""
    checks = list(checks)
    for check in checks:
        print(check.line(), flush=True)
    return 0 if checks and all(c.ok for c in checks) else 1


def table(rows: Sequence[tuple[str, Check | None, str]]) -> str:
    """One table of ``(benchmark, check or None, note)`` rows: ratio vs limit, verdict."""
    head = ("benchmark", "check", "ratio", "limit", "verdict")
    cells = [head]
    for bench, check, note in rows:
        if check is None:
            cells.append((bench, note, "-", "-", "FAILED"))
        else:
            cells.append((bench, check.name, f"{check.ratio:.2f}",
                          f"{check.op} {check.limit:g}", "ok" if check.ok else "MISSED"))
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) if i < 4 else c
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# benchmarks/bench_scale.py (issue 17): all-formats conversion per image over one decode
# plus each format's encode alone, and the larger over the smaller of the Ray workers'
# peak memory at two input counts.
SCALE_DECODE_ONCE_MAX = 1.15
SCALE_WORKER_MEMORY_GROWTH_MAX = 1.20
