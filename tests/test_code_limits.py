"""The size limits of issue 14, kept by a test over the product packages (prep/, node/,
shared/; not tests, benchmarks or testdata): no module over 400 lines, no function over
60 lines, no record (dataclass, NamedTuple, TypedDict) over 10 fields and no function or
constructor over 10 parameters (``self`` and ``cls`` not counted).

A justified exception is named in ``ALLOWED`` with its figure and the reason; it fails
again when it grows past that figure, and the entry must go once the code is back under
the limit, so the list cannot go stale.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("prep", "node", "shared")

MODULE_LINES = 400
FUNCTION_LINES = 60
RECORD_FIELDS = 10
PARAMETERS = 10

# (kind, "path:qualified name") -> the figure allowed, and why.
ALLOWED: dict[tuple[str, str], int] = {
    # Manifest mirrors manifest.json field for field; that layout is fixed by DESIGN
    # section 3 (schema_version 1), so grouping its fields would change the file format.
    ("fields", "shared/manifest.py:Manifest"): 18,
}


@dataclass(frozen=True)
class Figure:
    kind: str  # "lines" (module), "function lines", "fields" or "parameters"
    where: str  # path:qualified name, the key of ALLOWED
    line: int
    value: int
    limit: int

    @property
    def allowed(self) -> int:
        return ALLOWED.get((self.kind, self.where), self.limit)

    def describe(self) -> str:
        path, _, name = self.where.partition(":")
        extra = "" if self.allowed == self.limit else f", allowed {self.allowed}"
        return (f"{path}:{self.line}: {name or 'module'} has {self.value} {self.kind}"
                f" (limit {self.limit}{extra})")


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _is_record(node: ast.ClassDef) -> bool:
    decorators = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
    bases = {ast.unparse(b) for b in node.bases}
    return bool(decorators & {"dataclass", "dataclasses.dataclass"}
                or bases & {"NamedTuple", "typing.NamedTuple", "TypedDict", "typing.TypedDict"})


def _fields(node: ast.ClassDef) -> int:
    return sum(1 for s in node.body
               if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
               and "ClassVar" not in ast.unparse(s.annotation))


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return sum(1 for n in names if n not in ("self", "cls"))


def _walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
    """Every class and function below ``node`` with its qualified name."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            yield name, child
            yield from _walk(child, name + ".")
        else:
            yield from _walk(child, prefix)


def figures(rel: str, text: str) -> Iterator[Figure]:
    """The module's line count and each of its functions' and records' figures."""
    yield Figure("lines", rel, 1, len(text.splitlines()), MODULE_LINES)
    for name, node in _walk(ast.parse(text, filename=rel), ""):
        where = f"{rel}:{name}"
        if isinstance(node, ast.ClassDef):
            if _is_record(node):
                yield Figure("fields", where, node.lineno, _fields(node), RECORD_FIELDS)
            continue
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        length = node.end_lineno - node.lineno + 1
        yield Figure("function lines", where, node.lineno, length, FUNCTION_LINES)
        yield Figure("parameters", where, node.lineno, _parameters(node), PARAMETERS)


def _all_figures() -> list[Figure]:
    return [f for p in _modules()
            for f in figures(p.relative_to(REPO).as_posix(), p.read_text(encoding="utf-8"))]


def test_product_code_keeps_the_size_limits() -> None:
    over = [f for f in _all_figures() if f.value > f.allowed]
    assert not over, "over the issue-14 limits:\n" + "\n".join(f.describe() for f in over)


def test_every_allowed_exception_is_still_needed() -> None:
    found = {(f.kind, f.where): f for f in _all_figures()}
    stale = [f"{kind} {where}: "
             + (found[kind, where].describe() if (kind, where) in found else "gone")
             for kind, where in ALLOWED
             if (kind, where) not in found or found[kind, where].value <= found[kind, where].limit]
    assert not stale, "allow-list entries no longer needed (remove them):\n" + "\n".join(stale)


def test_the_measures_see_the_code() -> None:
    # An empty walk, or a measure that reads nothing, would pass the tests above for nothing.
    names = {p.relative_to(REPO).as_posix() for p in _modules()}
    assert {"prep/convert.py", "node/cli.py", "shared/manifest.py"} <= names
    sample = """from dataclasses import dataclass
from typing import ClassVar, NamedTuple

@dataclass(frozen=True)
class Row:
    a: int
    b: str = ""
    KIND: ClassVar[str] = "row"

    def f(self, x, /, y, *rest, z, **more):
        return x

class Pair(NamedTuple):
    left: int
    right: int
"""
    got = {(f.kind, f.where): f.value for f in figures("m.py", sample)}
    assert got == {("lines", "m.py"): 15, ("fields", "m.py:Row"): 2,
                   ("function lines", "m.py:Row.f"): 2, ("parameters", "m.py:Row.f"): 5,
                   ("fields", "m.py:Pair"): 2}
