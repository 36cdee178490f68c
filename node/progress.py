"""Progress lines of node-agent: the cache fill, each epoch, the matrix's pairs.

Lines go to stderr (results tables to stdout), flushed, so they show in logs too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from shared.progress import duration, note, seconds_left


def transfer_bar(enabled: bool, total: int,
                 label: str) -> tuple[Any, Callable[[int], None] | None]:
    """A live bar of ``total`` files and its advance callback; (None, None) unless
    ``enabled`` on a terminal (logs get the one line of :func:`cache_done`)."""
    if not enabled or not os.isatty(2):
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TransferSpeedColumn

    from shared.progress import stderr_console

    bar = Progress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TransferSpeedColumn(), transient=True, console=stderr_console())
    task = bar.add_task(label, total=total)
    bar.start()
    return bar, lambda n: bar.update(task, advance=n)


def cache_done(label: str, fill: Any) -> None:
    """One line when the cache fill is done (:class:`node.cache_fill.CacheFill`)."""
    s = fill.stats
    note(f"{label}: cache ready: {s.files_total} files, {s.bytes_total / 2**20:,.1f} MiB "
         f"({s.files_fetched} fetched) in {s.seconds:.1f} s")


class EpochProgress:
    """One line per finished epoch: time, img/s, loss and accuracy, and time left.

    Called as ``progress(epoch, row)`` with the ``epochs`` row of the epoch just done.
    """

    def __init__(self, label: str, epochs: int) -> None:
        self.label, self.epochs = label, epochs
        self._t0 = time.perf_counter()

    def __call__(self, epoch: int, row: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self._t0
        parts = [f"{row.get('epoch_time_s') or 0:.1f} s",
                 f"{row.get('throughput_img_s') or 0:,.0f} img/s"]
        if row.get("train_loss") is not None:
            parts.append(f"loss {row['train_loss']:.3f}")
        if row.get("val_accuracy") is not None:
            parts.append(f"val acc {row['val_accuracy']:.3f}")
        left = seconds_left(epoch + 1, self.epochs, elapsed)
        tail = f"; about {duration(left)} left" if epoch + 1 < self.epochs else ""
        note(f"{self.label}: epoch {epoch + 1}/{self.epochs}: {', '.join(parts)}{tail}")


class MatrixProgress:
    """The matrix's pairs: a line before and after each, with pairs left and time left."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self._t0 = time.perf_counter()
        self.records: list[dict[str, Any]] = []

    def starting(self, loader: str, format_id: str, repeat: int) -> None:
        left = seconds_left(self.done, self.total, time.perf_counter() - self._t0)
        eta = f", about {duration(left)} left" if left is not None else ""
        note(f"[{self.done + 1}/{self.total}] {loader} x {format_id} (repeat {repeat}): "
             f"{self.done} done, {self.total - self.done} left{eta}")

    def finished(self, loader: str, format_id: str, record: dict[str, Any] | None,
                 skipped: str | None = None) -> None:
        """Count a pair as done; ``record`` is its ``runs`` row, None when skipped."""
        self.done += 1
        head = f"[{self.done}/{self.total}] {loader} x {format_id}"
        if record is None:
            note(f"{head}: skipped: {skipped}")
            return
        self.records.append(record)
        status = record.get("status")
        note(f"{head}: {status}, {record.get('throughput_img_s') or 0:,.0f} img/s, "
             f"data wait {100 * (record.get('data_wait_fraction') or 0):.0f}%"
             + (f", error: {record.get('error')}" if status != "ok" else ""))

    def summary(self) -> None:
        """The table of every pair run, fastest first, on stdout."""
        from rich.table import Table

        from shared.progress import stdout_console

        table = Table(title=f"matrix: {len(self.records)} runs in "
                            f"{duration(time.perf_counter() - self._t0)}")
        for col in ("loader", "format", "repeat", "status", "img/s", "data wait %",
                    "val acc", "time s"):
            table.add_column(col, justify="left" if col in ("loader", "format") else "right")
        rows = sorted(self.records, key=lambda r: -(r.get("throughput_img_s") or 0))
        for r in rows:
            acc = r.get("val_accuracy")
            table.add_row(r["loader"], r["format"], str(r.get("repeat", 0)), r["status"],
                          f"{r.get('throughput_img_s') or 0:,.0f}",
                          f"{100 * (r.get('data_wait_fraction') or 0):.0f}",
                          "-" if acc is None else f"{acc:.3f}",
                          f"{r.get('total_time_s') or 0:.1f}")
        stdout_console().print(table)
