"""Loader throughput alone: the trainer's epoch loop with a step that has no model
(DLIO-style).

Every step is timed the same way as in training: ``data`` is the time blocked waiting
for the next batch on the device. :class:`ConsumeStep` only takes the batch;
:class:`EmulatedStep` holds each step for a set time instead of computing, standing in
for an accelerator's step time on a machine without one; ``accelerator_utilization``
(compute / epoch wall time) is then the share of time that accelerator would have been
busy with this loader feeding it.
"""

from __future__ import annotations

import time

import torch

from node.steps import Step


class ConsumeStep(Step):
    """Takes each batch and does nothing with it: the loader's throughput alone."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[None, int]:
        return None, 0


class EmulatedStep(Step):
    """Holds each step for ``step_ms`` milliseconds, standing in for the accelerator."""

    def __init__(self, step_ms: float) -> None:
        if step_ms < 0:
            raise ValueError(f"emulate_step_ms must be >= 0, got {step_ms}")
        self.step_s = step_ms / 1000.0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[None, int]:
        deadline = time.perf_counter() + self.step_s
        # sleep most of it, then spin: time.sleep alone overshoots by up to ~0.1 ms
        if self.step_s > 0.002:
            time.sleep(self.step_s - 0.001)
        while time.perf_counter() < deadline:
            pass
        return None, 0


def bench_step(emulate_step_ms: float | None = None) -> Step:
    """The step of a bench run: emulated when ``emulate_step_ms`` is set (and > 0)."""
    return EmulatedStep(emulate_step_ms) if emulate_step_ms else ConsumeStep()
