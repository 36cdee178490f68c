"""Steps of the epoch loop: what a step does (:class:`Step`, the strategy the trainer
takes) and the per-step figures of an epoch: batch waits and their percentiles, stage
times, and whether the epoch really read from storage (DESIGN section 8)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from node.loaders.base import Batch

if TYPE_CHECKING:
    import torch

    from node.evaluation import EvalResult


class Step(abc.ABC):
    """What :class:`node.train.Trainer` does with each batch once it is on the device.

    The trainer times the call as the step's ``compute``; a step that ``trains``
    returns a loss and a count of correct predictions, the others ``(None, 0)``.
    """

    trains: ClassVar[bool] = False

    def start_epoch(self) -> None:
        """Called before an epoch's first batch (a model goes to training mode)."""

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | int]:
        """Do the step on one batch; returns the loss and the correct predictions."""

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        """Validate over ``batches``: only a step with a model can."""
        raise ValueError(f"{type(self).__name__} has no model to validate")


def epoch_is_cold(disk_read: int | None, consumed: int,
                  data_bytes: int | None = None) -> bool | None:
    """Whether an epoch read its data from storage: at least half the bytes it consumed.

    A loader may consume the same stored bytes more than once in an epoch (a Zarr chunk
    of 64 samples serves several batches; the page cache serves the repeats), so the
    bytes it needed are capped by ``data_bytes``, the size of the files it reads from.

    Returns:
        None where storage reads cannot be measured; never true by default.
    """
    if disk_read is None:
        return None
    needed = consumed if data_bytes is None else min(consumed, data_bytes)
    return needed > 0 and disk_read >= needed / 2


_PERCENTILES = (50, 95, 99)


def wait_percentiles(waits: np.ndarray | Sequence[float]) -> dict[str, float | None]:
    """``batch_wait_p50_s``, ``_p95_s``, ``_p99_s`` and ``_max_s`` of per-step waits
    (NumPy's linear interpolation); None without steps."""
    waits = np.asarray(waits, dtype=np.float64)
    keys = [f"batch_wait_p{p}_s" for p in _PERCENTILES] + ["batch_wait_max_s"]
    if not waits.size:
        return dict.fromkeys(keys)
    values = [*np.percentile(waits, _PERCENTILES).tolist(), float(waits.max())]
    return dict(zip(keys, values, strict=True))


class EpochClock:
    """One epoch's per-step figures: batch waits, samples, bytes and stage times.

    A stage time is the sum over the epoch's batches, None as soon as one batch does
    not report it (the loader cannot tell that stage apart). Read and decode add up the
    time of every worker or thread, so with parallel workers they can exceed the wall.
    """

    _STAGES = (("read_s", "read_time_s"), ("decode_s", "decode_time_s"),
               ("h2d_s", "h2d_time_s"))

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.samples = self.bytes_read = 0
        self.stages: dict[str, float | None] = {attr: 0.0 for attr, _ in self._STAGES}

    @property
    def steps(self) -> int:
        return len(self.waits)

    def add(self, batch: Batch, wait_s: float) -> None:
        """Count one step: ``batch`` arrived after waiting ``wait_s``."""
        self.waits.append(wait_s)
        self.samples += int(batch.labels.shape[0])
        self.bytes_read += int(batch.bytes_read)
        for attr, total in self.stages.items():
            value = getattr(batch, attr, None)
            self.stages[attr] = None if value is None or total is None else total + value

    def columns(self) -> dict[str, Any]:
        """The clock's figures under their ``epochs`` column names."""
        return {"data_time_s": float(sum(self.waits)), "samples": self.samples,
                "steps": self.steps, "bytes_read": self.bytes_read,
                "time_to_first_batch_s": self.waits[0] if self.waits else None,
                **wait_percentiles(self.waits),
                **{col: self.stages[attr] for attr, col in self._STAGES}}
