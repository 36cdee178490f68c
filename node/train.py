"""Training and evaluation, the same for every loader so that only the data path differs.

A loader hands over uint8 NHWC batches on the training device; :class:`Preprocess`
turns them into normalised float NCHW (channels-last memory) with the same batched,
seeded augmentation for every loader. :class:`Trainer` times each step as ``data``
(blocked on the loader, host-to-device copy included) and ``compute`` (preprocess,
forward, backward, optimiser step), synchronising CUDA so asynchronous work lands on
the right side (DESIGN section 8), and produces one ``epochs`` row per epoch.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.choices import MODELS  # defined torch-free, for --help
from node.loaders.base import Batch
from node.steps import EpochClock, epoch_is_cold, wait_percentiles  # noqa: F401 - re-exported
from node.telemetry import Sampler, WindowStats, disk_read_bytes

OPTIMIZERS = ("sgd", "rmsprop")
DEFAULT_LR = {"sgd": 0.05, "rmsprop": 1e-3}

# Dataset-agnostic normalisation: every dataset and loader gets the same constants, so
# no per-dataset statistics are needed; maps [0, 1] to [-2, 2] per channel.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

SMALL_IMAGE = 64  # at or below this size the networks' stems keep full resolution


# --------------------------------------------------------------------------- models


class ConvNet(nn.Module):
    """A small, fast ConvNet: conv-BN-ReLU-maxpool blocks, global average pool, linear.

    Args:
        num_classes: output logits.
        widths: channels of each block.
        stem_stride: stride of the first convolution (2 for large images).
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (32, 64, 128),
                 stem_stride: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, stride=stem_stride if i == 0 else 1,
                                 padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _resnet18(num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE:
        # The ImageNet stem divides the size by 4 at once: 32x32 would reach the
        # residual stages at 8x8. The usual CIFAR adaptation keeps full resolution.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def _googlenet(num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import googlenet
    from torchvision.models.googlenet import BasicConv2d

    model = googlenet(weights=None, num_classes=num_classes, aux_logits=False,
                      init_weights=True, transform_input=False)
    if image_size <= SMALL_IMAGE:
        # Stride-1 3x3 first convolution and no first max pool: the inception stages
        # then see 16x16 / 8x8 / 4x4 on 32x32 input instead of 2x2 / 1x1.
        model.conv1 = BasicConv2d(3, 64, kernel_size=3, stride=1, padding=1)
        nn.init.trunc_normal_(model.conv1.conv.weight, mean=0.0, std=0.01, a=-2, b=2)
        model.maxpool1 = nn.Identity()
    return model


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised classifier (no pretrained weights).

    Seed the global RNG first (:func:`seed_everything`) for a reproducible init.

    Args:
        name: one of :data:`MODELS`.
        num_classes: output logits.
        image_size: side of the (square) input images; small ones get adapted stems.

    Raises:
        ValueError: unknown name (lists the valid ones) or bad sizes.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if name == "convnet":
        return ConvNet(num_classes, stem_stride=1 if image_size <= SMALL_IMAGE else 2)
    if name == "resnet18":
        return _resnet18(num_classes, image_size)
    if name == "googlenet":
        return _googlenet(num_classes, image_size)
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")


def build_optimizer(name: str, params: Iterable[nn.Parameter],
                    lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum 0.9, weight decay 5e-4) or RMSprop.

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: the model's parameters.
        lr: learning rate; :data:`DEFAULT_LR` of the optimiser when None.

    Raises:
        ValueError: unknown name (lists the valid ones) or lr <= 0.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[name] if lr is None else lr
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-6, weight_decay=5e-4)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper."""
    return model.module if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


# --------------------------------------------------------------------------- preprocess


class Preprocess(nn.Module):
    """uint8 NHWC batch -> normalised float NCHW, with optional augmentation.

    Runs on the batch's device. Augmentation (training only) is a random crop with
    ``pad`` reflected pixels on each side and a random horizontal flip, both done as
    one batched gather, with a private generator seeded from the run seed: the same
    seed and batch sizes give the same crops and flips.

    Args:
        image_size: side of the images; sets the default ``pad`` (``image_size // 8``).
        seed: seed of the augmentation generator.
        mean, std: per-channel normalisation of the [0, 1] values.
        pad: crop padding; 0 disables the crop (the flip stays).
    """

    def __init__(self, image_size: int, *, seed: int = 0, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD, pad: int | None = None) -> None:
        super().__init__()
        self.image_size = image_size
        self.seed = seed
        self.pad = image_size // 8 if pad is None else pad
        if self.pad < 0 or self.pad >= image_size:
            raise ValueError(f"pad must be in [0, image_size), got {self.pad}")
        # mean/std folded into one multiply-add of the raw 0..255 values.
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)
        self._generator: torch.Generator | None = None

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def forward(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """Normalise (and with ``augment``, crop and flip) a uint8 NHWC batch.

        Returns:
            float32 (N, C, H, W) in channels-last memory format.
        """
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 NHWC, got {images.dtype} {tuple(images.shape)}")
        c = images.shape[-1]
        x = images.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory
        if self.scale.device != x.device:
            self.to(x.device)
        x = x * self.scale[:, :c] + self.shift[:, :c]
        if augment and images.shape[0]:
            x = self._augment(x)
        return x.contiguous(memory_format=torch.channels_last)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = min(self.pad, h - 1, w - 1)
        gen, dev = self._gen(x.device), x.device
        if p:
            x = F.pad(x, (p, p, p, p), mode="reflect")
        oy = torch.randint(0, 2 * p + 1, (n, 1), generator=gen, device=dev)
        ox = torch.randint(0, 2 * p + 1, (n, 1), generator=gen, device=dev)
        flip = torch.rand((n, 1), generator=gen, device=dev) < 0.5
        rows = oy + torch.arange(h, device=dev)
        ar = torch.arange(w, device=dev)
        cols = ox + torch.where(flip, w - 1 - ar, ar)
        # Indices (N,1,1), (N,H,1), (N,1,W) around a slice: result is (N, H, W, C).
        out = x[torch.arange(n, device=dev).view(n, 1, 1), :, rows.view(n, h, 1),
                cols.view(n, 1, w)]
        return out.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalResult:
    """Classification quality over a set of batches.

    Precision, recall and F1 are macro averages (F1 the mean of per-class F1s, as
    scikit-learn computes it) over the classes present in the targets *or* the
    predictions (scikit-learn's default label set); 0/0 counts as 0.

    Attributes:
        confusion: (num_classes, num_classes) int64, rows true class, columns predicted.
    """

    accuracy: float
    precision: float
    recall: float
    f1: float
    loss: float
    samples: int
    confusion: np.ndarray = field(repr=False)

    def columns(self) -> dict[str, Any]:
        """The figures under their ``runs`` column names."""
        return {"val_accuracy": self.accuracy, "val_precision": self.precision,
                "val_recall": self.recall, "val_f1": self.f1,
                "confusion_matrix": self.confusion.tolist()}


def metrics_from_confusion(confusion: torch.Tensor | np.ndarray,
                           loss_sum: float = 0.0) -> EvalResult:
    """Accuracy, macro precision/recall/F1 from a confusion matrix (rows true class)."""
    cm = torch.as_tensor(confusion, dtype=torch.float64, device="cpu")
    total = float(cm.sum())
    tp = cm.diagonal()
    predicted, support = cm.sum(0), cm.sum(1)
    zero = torch.zeros_like(tp)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), zero)
    recall = torch.where(support > 0, tp / support.clamp(min=1), zero)
    pr = precision + recall
    f1 = torch.where(pr > 0, 2 * precision * recall / pr.clamp(min=1e-300), zero)
    present = (predicted > 0) | (support > 0)
    k = int(present.sum())

    def macro(v: torch.Tensor) -> float:
        return float(v[present].sum() / k) if k else 0.0

    return EvalResult(
        accuracy=float(tp.sum() / total) if total else 0.0,
        precision=macro(precision), recall=macro(recall), f1=macro(f1),
        loss=loss_sum / total if total else 0.0, samples=int(total),
        confusion=np.asarray(torch.as_tensor(confusion).cpu().numpy(), dtype=np.int64))


def evaluate(model: nn.Module, batches: Iterable[Batch], num_classes: int,
             preprocess: Preprocess) -> EvalResult:
    """Cross-entropy loss and classification quality of ``model`` on ``batches``.

    No augmentation; the model is put in eval mode and restored afterwards. A DDP
    model is unwrapped (its forward would wait for the other ranks), so any rank can
    evaluate alone.

    Raises:
        ValueError: ``batches`` yielded no samples.
    """
    net = unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch.images.to(device, non_blocking=True)
                labels = batch.labels.to(device, non_blocking=True)
                logits = net(preprocess(images, augment=False))
                loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
                pred = logits.argmax(1)
                confusion += torch.bincount(labels * num_classes + pred,
                                            minlength=num_classes * num_classes)
    finally:
        net.train(was_training)
    cm = confusion.view(num_classes, num_classes).cpu()
    if int(cm.sum()) == 0:
        raise ValueError("evaluate: no samples in the batches")
    return metrics_from_confusion(cm, float(loss_sum))


# --------------------------------------------------------------------------- training


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


class Trainer:
    """Trains one model over any loader and measures each epoch.

    Build with :meth:`build` (seeds, model, optimiser, preprocess from names) or pass
    ready objects. A model already wrapped in DistributedDataParallel is used as is.

    Args:
        model: the network, on ``device`` (or DDP-wrapped).
        optimizer: its optimiser.
        preprocess: the shared :class:`Preprocess`.
        device: the training device.
        num_classes: for evaluation.
        sampler: a started :class:`~node.telemetry.Sampler` for per-epoch CPU, memory,
            GPU and disk figures; without one, disk reads come from ``/proc`` directly
            and the other figures are None.
        max_steps: stop each epoch after this many steps (None: the whole epoch).
        cold: ``--cold`` was asked for (the caller evicts before each epoch); an epoch
            is flagged cold only when :func:`epoch_is_cold` confirms it from measured
            reads, else warm with a line on stderr.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 preprocess: Preprocess, *, device: torch.device | str, num_classes: int,
                 sampler: Sampler | None = None, max_steps: int | None = None,
                 cold: bool = False) -> None:
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.model = model
        self.optimizer = optimizer
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.sampler = sampler
        self.max_steps = max_steps
        self.cold = cold
        self.waits: list[np.ndarray] = []  # each epoch's per-step batch waits
        # Size of the files the loader reads from (set by the caller; see epoch_is_cold).
        self.data_bytes: int | None = None

    @classmethod
    def build(cls, *, model: str, num_classes: int, image_size: int,
              device: torch.device | str, seed: int, optimizer: str = "sgd",
              lr: float | None = None, ddp: bool = False, rank: int = 0,
              sampler: Sampler | None = None, max_steps: int | None = None,
              cold: bool = False) -> Trainer:
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
        return cls(net, opt, preprocess, device=device, num_classes=num_classes,
                   sampler=sampler, max_steps=max_steps, cold=cold)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    trains = True  # whether steps produce a loss (False for loader-only benchmarks)

    def step(self, images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | int]:
        """One optimisation step; returns the loss and the number of correct predictions."""
        logits = self.model(self.preprocess(images, augment=True))
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, (logits.detach().argmax(1) == labels).sum()

    def train_epoch(self, loader: BatchSource, epoch: int) -> dict[str, Any]:
        """Train one epoch; the row's figures except validation (set to None).

        Timing: ``data`` is the time blocked in the loader (creating the epoch's
        iterator, so worker start-up counts, each ``next()``, and the host-to-device
        copy, synchronised on CUDA); ``compute`` is preprocess + forward + backward +
        optimiser step, synchronised on CUDA. ``epoch_time_s`` runs from the creation of
        the iterator to the end of the last step. Each step's wait is kept
        (:attr:`EpochClock.waits`) for the wait percentiles.
        """
        dev = self.device
        self.model.train()
        sampler = self.sampler
        disk0 = None if sampler is not None else disk_read_bytes()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        if sampler is not None:
            sampler.mark()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        clock = EpochClock()
        compute_s = 0.0

        start = time.perf_counter()
        it = iter(loader.epoch(epoch))
        t0 = start
        while True:
            try:
                batch = next(it)
            except StopIteration:
                break
            images = batch.images.to(dev, non_blocking=True)
            labels = batch.labels.to(dev, non_blocking=True)
            self._sync()
            t1 = time.perf_counter()
            clock.add(batch, t1 - t0)

            n = labels.shape[0]
            loss, hits = self.step(images, labels)
            if loss is not None:
                loss_sum += loss.detach().double() * n
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

        samples = clock.samples
        row: dict[str, Any] = {
            "epoch": epoch,
            "epoch_time_s": epoch_s,
            "compute_time_s": compute_s,
            "throughput_img_s": samples / epoch_s if epoch_s > 0 else None,
            "train_loss": float(loss_sum) / samples if samples and self.trains else None,
            "train_accuracy": int(correct) / samples if samples and self.trains else None,
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
        if sampler is not None:
            row.update(sampler.window().columns())
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
                val = evaluate(self.model, val_loader.epoch(0), self.num_classes,
                               self.preprocess)
                row["val_accuracy"], row["val_f1"] = val.accuracy, val.f1
            rows.append(row)
            if after_epoch is not None:
                after_epoch(epoch, row)
        total = time.perf_counter() - start
        telemetry = self.sampler.totals() if self.sampler is not None else None
        waits = np.concatenate(self.waits) if self.waits else np.zeros(0)
        return TrainResult(rows, val, total, telemetry, waits)
