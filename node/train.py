"""The one epoch loop: every loader, every step strategy, timed the same way.

:class:`Trainer` drives a loader through epochs and times each step as ``data``
(blocked on the loader, host-to-device copy included) and ``compute`` (the step),
synchronising CUDA so asynchronous work lands on the right side (DESIGN section 8),
and produces one ``epochs`` row per epoch. What a step does is its strategy
(:class:`node.steps.Step`): :class:`TrainStep` here (preprocess, forward, backward,
optimiser step), or the loader-only steps of :mod:`node.bench`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.evaluation import EvalResult, evaluate
from node.loaders.base import Batch
from node.models import Preprocess, build_model, build_optimizer, seed_everything
from node.probes import disk_read_bytes
from node.steps import EpochClock, Step, epoch_is_cold, wait_percentiles
from node.telemetry import Sampler, WindowStats


class BatchSource(Protocol):
    """What the trainer needs of a loader (see :class:`node.loaders.base.Loader`)."""

    def epoch(self, epoch: int) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` measured.

    Attributes:
        epochs: one dict per epoch with ``epochs`` column names (no ``run_id`` /
            ``schema_version``).
        val: the last validation result, None without a validation loader.
        total_time_s: wall time of the whole fit (hooks and validation included).
        telemetry: the sampler's figures over the whole fit, None without a sampler.
        waits: every step's batch wait (seconds), all epochs in order.
    """

    epochs: list[dict[str, Any]]
    val: EvalResult | None
    total_time_s: float
    telemetry: WindowStats | None = None
    waits: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def run_columns(self) -> dict[str, Any]:
        """The run-level figures under their ``runs`` column names.

        Every figure covers the training epochs only, like the ``epochs`` rows
        (validation excluded; :attr:`telemetry` has the sampler's whole-fit figures).
        Ratios are over all epochs, the cold first one included (DESIGN section 8):
        ``data_wait_fraction`` = data / epoch wall, ``accelerator_utilization`` =
        compute / epoch wall, ``throughput_img_s`` = samples / epoch wall.
        """
        wall = sum(e["epoch_time_s"] for e in self.epochs)
        data = sum(e["data_time_s"] for e in self.epochs)
        compute = sum(e["compute_time_s"] for e in self.epochs)
        samples = sum(e["samples"] for e in self.epochs)
        n = len(self.epochs)
        disks = [e["disk_read_bytes"] for e in self.epochs]
        out: dict[str, Any] = {
            "epochs": n,
            "samples_per_epoch": self.epochs[0]["samples"] if n else 0,
            "total_time_s": self.total_time_s,
            "mean_epoch_time_s": wall / n if n else None,
            "mean_epoch_data_time_s": data / n if n else None,
            "data_wait_fraction": data / wall if wall else None,
            "accelerator_utilization": compute / wall if wall else None,
            "throughput_img_s": samples / wall if wall else None,
            "bytes_read": sum(e["bytes_read"] for e in self.epochs),
            "disk_read_bytes": None if any(d is None for d in disks) else sum(disks),
            "cpu_util_mean_pct": _weighted(self.epochs, "cpu_util_mean_pct"),
            "gpu_util_mean_pct": _weighted(self.epochs, "gpu_util_mean_pct"),
            "cold_epochs": sum(1 for e in self.epochs if e["cold"]),
            "time_to_first_batch_s": self.epochs[0]["time_to_first_batch_s"] if n else None,
            **wait_percentiles(self.waits),
        }
        for key in ("peak_ram_bytes", "peak_ram_anon_bytes", "peak_ram_file_bytes",
                    "peak_vram_bytes"):
            out[key] = _peak(e.get(key) for e in self.epochs)
        if self.val is not None:
            out.update(self.val.columns())
        return out


def _peak(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _weighted(epochs: Sequence[dict[str, Any]], key: str) -> float | None:
    pairs = [(e[key], e["epoch_time_s"]) for e in epochs if e[key] is not None]
    wall = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / wall if wall else None


class TrainStep(Step):
    """One optimisation step of a model on a batch; validates with :meth:`evaluate`.

    Build with :meth:`build` (seeds, model, optimiser, preprocess from names) or pass
    ready objects. A model already wrapped in DistributedDataParallel is used as is.

    Args:
        model: the network, on the training device (or DDP-wrapped).
        optimizer: its optimiser.
        preprocess: the shared :class:`~node.models.Preprocess`.
        num_classes: for evaluation.
    """

    trains = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 preprocess: Preprocess, *, num_classes: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.preprocess = preprocess
        self.num_classes = num_classes

    @classmethod
    def build(cls, *, model: str, num_classes: int, image_size: int,
              device: torch.device | str, seed: int, optimizer: str = "sgd",
              lr: float | None = None, ddp: bool = False, rank: int = 0) -> TrainStep:
        """Seed everything and build the model, optimiser and preprocess by name.

        The model is initialised on the CPU from ``seed`` and then moved, so the same
        seed gives the same initial weights on every device and for every loader.

        Args:
            ddp: wrap the model in DistributedDataParallel (the process group must be
                initialised); the caller evaluates on rank 0 only.
            rank: this process's rank; varies the augmentation seed per rank.
        """
        seed_everything(seed)
        device = torch.device(device)
        net = build_model(model, num_classes, image_size)
        net = net.to(device=device, memory_format=torch.channels_last)
        if ddp:
            index = device.index if device.index is not None else (
                torch.cuda.current_device() if device.type == "cuda" else None)
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[index] if device.type == "cuda" else None)
        if device.type == "cuda":
            # Fixed shapes each step: let cuDNN pick the fastest kernels (epoch 0 pays).
            torch.backends.cudnn.benchmark = True
        opt = build_optimizer(optimizer, net.parameters(), lr)
        aug_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
        preprocess = Preprocess(image_size, seed=aug_seed).to(device)
        return cls(net, opt, preprocess, num_classes=num_classes)

    def start_epoch(self) -> None:
        self.model.train()

    def __call__(self, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns the loss and the number of correct predictions."""
        logits = self.model(self.preprocess(images, augment=True))
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, (logits.detach().argmax(1) == labels).sum()

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        return evaluate(self.model, batches, self.num_classes, self.preprocess)


class Trainer:
    """Drives a loader through epochs with one step strategy and measures each epoch.

    Args:
        step: what each step does with its batch (:class:`TrainStep`, or a loader-only
            step of :mod:`node.bench`).
        device: the device batches are moved to.
        sampler: a started :class:`~node.telemetry.Sampler` for per-epoch CPU, memory,
            GPU and disk figures; without one, disk reads come from ``/proc`` directly
            and the other figures are None.
        max_steps: stop each epoch after this many steps (None: the whole epoch).
        cold: ``--cold`` was asked for (the caller evicts before each epoch); an epoch
            is flagged cold only when :func:`epoch_is_cold` confirms it from measured
            reads, else warm with a line on stderr.
    """

    def __init__(self, step: Step, *, device: torch.device | str,
                 sampler: Sampler | None = None, max_steps: int | None = None,
                 cold: bool = False) -> None:
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.step = step
        self.device = torch.device(device)
        self.sampler = sampler
        self.max_steps = max_steps
        self.cold = cold
        self.waits: list[np.ndarray] = []  # each epoch's per-step batch waits
        # Size of the files the loader reads from (set by the caller; see epoch_is_cold).
        self.data_bytes: int | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, loader: BatchSource, epoch: int) -> dict[str, Any]:
        """Run one epoch; the row's figures except validation (set to None).

        Timing: ``data`` is the time blocked in the loader (creating the epoch's
        iterator, so worker start-up counts, each ``next()``, and the host-to-device
        copy, synchronised on CUDA); ``compute`` is the step, synchronised on CUDA.
        ``epoch_time_s`` runs from the creation of the iterator to the end of the last
        step. Each step's wait is kept (:attr:`EpochClock.waits`) for the wait
        percentiles.
        """
        dev = self.device
        self.step.start_epoch()
        disk0 = None if self.sampler is not None else disk_read_bytes()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        if self.sampler is not None:
            self.sampler.mark()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        clock = EpochClock()
        compute_s = 0.0
        start = t0 = time.perf_counter()
        it = iter(loader.epoch(epoch))
        for batch in it:
            images = batch.images.to(dev, non_blocking=True)
            labels = batch.labels.to(dev, non_blocking=True)
            self._sync()
            t1 = time.perf_counter()
            clock.add(batch, t1 - t0)
            loss, hits = self.step(images, labels)
            if loss is not None:
                loss_sum += loss.detach().double() * labels.shape[0]
                correct += hits
            self._sync()
            t0 = time.perf_counter()
            compute_s += t0 - t1
            if self.max_steps is not None and clock.steps >= self.max_steps:
                break
        epoch_s = time.perf_counter() - start
        close = getattr(it, "close", None)
        if close is not None:  # stop workers early when max_steps cut the epoch
            close()
        self.waits.append(np.asarray(clock.waits))
        return self._epoch_row(epoch, clock, epoch_s, compute_s,
                               (float(loss_sum), int(correct)), disk0)

    def _epoch_row(self, epoch: int, clock: EpochClock, epoch_s: float, compute_s: float,
                   sums: tuple[float, int], disk0: int | None) -> dict[str, Any]:
        """The epoch's ``epochs`` row from its clock, sums and resource figures."""
        dev, samples = self.device, clock.samples
        trained = bool(samples) and self.step.trains
        row: dict[str, Any] = {
            "epoch": epoch,
            "epoch_time_s": epoch_s,
            "compute_time_s": compute_s,
            "throughput_img_s": samples / epoch_s if epoch_s > 0 else None,
            "train_loss": sums[0] / samples if trained else None,
            "train_accuracy": sums[1] / samples if trained else None,
            "val_accuracy": None,
            "val_f1": None,
            "peak_ram_bytes": None,
            "peak_vram_bytes": None,
            "torch_peak_vram_bytes": (int(torch.cuda.max_memory_allocated(dev))
                                      if dev.type == "cuda" else None),
            "cpu_util_mean_pct": None,
            "gpu_util_mean_pct": None,
            "disk_read_bytes": None,
            **clock.columns(),
        }
        if self.sampler is not None:
            row.update(self.sampler.window().columns())
        else:
            disk1 = disk_read_bytes()
            row["disk_read_bytes"] = (disk1 - disk0) if disk0 is not None and disk1 is not None \
                else None
        row["cold"] = self._cold(epoch, row["disk_read_bytes"], row["bytes_read"])
        return row

    def _cold(self, epoch: int, disk_read: int | None, consumed: int) -> bool | None:
        """The epoch's ``cold`` flag: None where reads cannot be measured, False without
        ``--cold``, else whether its measured reads show it (said on stderr if not).

        Epochs without ``--cold`` are never flagged cold from their reads: the process
        also reads from storage for other things (library pages faulted in on first
        use, imports), which on a small dataset can pass for the data.
        """
        if disk_read is None:
            return None
        if not self.cold:
            return False
        cold = epoch_is_cold(disk_read, consumed, self.data_bytes)
        if not cold:
            needed = consumed if self.data_bytes is None else min(consumed, self.data_bytes)
            print(f"epoch {epoch}: --cold, but only {disk_read:,} of the {needed:,} bytes "
                  "it needed were read from storage (eviction not verified); recorded warm",
                  file=sys.stderr)
        return cold

    def fit(self, loader: BatchSource, epochs: int, *, val_loader: BatchSource | None = None,
            before_epoch: Callable[[int], None] | None = None,
            after_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
        """Train ``epochs`` epochs, validating after each when ``val_loader`` is given.

        Args:
            before_epoch: called with the epoch number before each epoch, outside the
                timed region (e.g. page-cache eviction for ``--cold``).
            after_epoch: called with the epoch number and its row (progress lines).
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        start = time.perf_counter()
        rows: list[dict[str, Any]] = []
        val: EvalResult | None = None
        self.waits = []
        for epoch in range(epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            row = self.train_epoch(loader, epoch)
            if val_loader is not None:
                val = self.step.evaluate(val_loader.epoch(0))
                row["val_accuracy"], row["val_f1"] = val.accuracy, val.f1
            rows.append(row)
            if after_epoch is not None:
                after_epoch(epoch, row)
        total = time.perf_counter() - start
        telemetry = self.sampler.totals() if self.sampler is not None else None
        waits = np.concatenate(self.waits) if self.waits else np.zeros(0)
        return TrainResult(rows, val, total, telemetry, waits)
