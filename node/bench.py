"""Loader throughput alone: the trainer's measured loop with no model (DLIO-style).

Every step is timed the same way as in training: ``data`` is the time blocked waiting
for the next batch on the device. With ``emulate_step_ms`` each step sleeps that long
instead of computing, standing in for an accelerator's step time on a machine without
one; ``accelerator_utilization`` (compute / epoch wall time) is then the share of time
that accelerator would have been busy with this loader feeding it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from node.telemetry import Sampler
from node.train import Trainer


class Bencher(Trainer):
    """Drives a loader through epochs, timing each step, without a model."""

    trains = False

    def __init__(self, *, device: torch.device | str, sampler: Sampler | None = None,
                 max_steps: int | None = None, cold: bool = False,
                 emulate_step_ms: float | None = None) -> None:
        if emulate_step_ms is not None and emulate_step_ms < 0:
            raise ValueError(f"emulate_step_ms must be >= 0, got {emulate_step_ms}")
        super().__init__(nn.Identity(), None, None, device=device,  # type: ignore[arg-type]
                         num_classes=0, sampler=sampler, max_steps=max_steps, cold=cold)
        self.step_s = (emulate_step_ms or 0.0) / 1000.0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[None, int]:
        """Stand in for the accelerator: hold the step for the emulated time."""
        if self.step_s:
            deadline = time.perf_counter() + self.step_s
            # sleep most of it, then spin: time.sleep alone overshoots by up to ~0.1 ms
            if self.step_s > 0.002:
                time.sleep(self.step_s - 0.001)
            while time.perf_counter() < deadline:
                pass
        return None, 0
