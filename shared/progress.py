"""Progress for long work (conversion, cache fill, epochs, matrix): consoles and estimates.

Tables go to stdout, messages and progress to stderr. When a stream is not a terminal
the console is wide enough that rich never truncates a name (``webp-lossle…``).
"""

from __future__ import annotations

import sys
from typing import IO, Any

WIDE = 1000  # columns for a redirected stream: tables keep their natural width


def console_for(stream: IO[str]) -> Any:
    """A rich Console on ``stream``: the terminal's width, or :data:`WIDE` when redirected."""
    from rich.console import Console

    if stream.isatty():
        return Console(file=stream)
    return Console(file=stream, width=WIDE, soft_wrap=True)


def stdout_console() -> Any:
    """The console for results tables."""
    return console_for(sys.stdout)


def stderr_console() -> Any:
    """The console for messages and progress."""
    return console_for(sys.stderr)


def seconds_left(done: float, total: float, elapsed_s: float) -> float | None:
    """Time left at the rate so far, or None before any work is done."""
    if done <= 0 or total <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, elapsed_s * (total - done) / done)


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 5 s``, ``1 h 2 min``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def note(message: str) -> None:
    """One progress line on stderr, flushed (so it shows at once in logs too)."""
    print(message, file=sys.stderr, flush=True)

