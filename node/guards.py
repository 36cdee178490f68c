"""Checks before training: warn when a run's settings cannot answer the question.

A run whose epoch is one step, whose validation split misses a class, or whose batch
exceeds the training set measures nothing useful about a data path, yet runs without
complaint. These pure functions name each problem in one line; the run prints them and
records them in its ``config`` (``warnings``), so the report can show them too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_STEPS_PER_EPOCH = 10  # fewer steps: start-up and the last batch dominate the figures
MIN_VAL_PER_CLASS = 20  # fewer images: one image moves a class's recall by 5 points or more


def step_warnings(train_samples: int, batch_size: int, max_steps: int | None = None) -> list[str]:
    """Warnings about the training set against the batch size (one rank's view).

    Args:
        train_samples: the samples this rank trains on per epoch.
        batch_size: samples per step.
        max_steps: the per-epoch step cap, if any.
    """
    out: list[str] = []
    if train_samples <= 0:
        return ["the training split is empty: nothing to measure"]
    if batch_size > train_samples:
        out.append(f"batch size {batch_size} exceeds the {train_samples} training images: "
                   "every step is the same partial batch; lower --batch-size")
    steps = -(-train_samples // batch_size)
    if max_steps is not None:
        steps = min(steps, max_steps)
    if steps < MIN_STEPS_PER_EPOCH:
        suggest = max(1, train_samples // MIN_STEPS_PER_EPOCH)
        out.append(f"only {steps} step{'s' if steps != 1 else ''} per epoch "
                   f"({train_samples} images, batch {batch_size}): fewer than "
                   f"{MIN_STEPS_PER_EPOCH}, so start-up dominates every figure; "
                   f"use --batch-size {suggest} or fewer, or more images")
    return out


def val_warnings(labels: Sequence[int] | np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Warnings about the validation split's size and coverage of the classes."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    if counts.sum() == 0:
        return ["the validation split is empty: accuracy is not measured"]
    out: list[str] = []
    missing = [class_names[i] for i, n in enumerate(counts[:len(class_names)]) if n == 0]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        out.append(f"the validation split has no image of class {shown} "
                   f"({len(missing)} of {len(class_names)} classes): their recall is undefined")
    present = counts[counts > 0]
    if present.size and present.min() < MIN_VAL_PER_CLASS:
        spread = (f"{present.min()}" if present.min() == present.max()
                  else f"{present.min()}-{present.max()}")
        out.append(f"the validation split has {spread} images per class (fewer than "
                   f"{MIN_VAL_PER_CLASS}): accuracy differences between runs are mostly noise")
    return out


def run_warnings(fill: Any, batch_size: int, max_steps: int | None,
                 class_names: Sequence[str], *, validate: bool) -> list[str]:
    """Every warning for a run over a cache fill (:class:`node.cache_fill.CacheFill`).

    The validation checks apply only when the run validates and this rank holds the
    validation split (rank 0).
    """
    out = step_warnings(sum(len(s) for s in fill.train), batch_size, max_steps)
    if validate and fill.val_split is not None:
        labels = [s.labels[s.start:s.stop] for s in fill.val]
        out += val_warnings(np.concatenate(labels) if labels else [], class_names)
    return out


def print_warnings(warnings: Sequence[str]) -> None:
    """Each warning as one line on stderr."""
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
