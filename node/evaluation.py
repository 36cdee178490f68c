"""Classification quality of a model over a loader's batches: accuracy, macro
precision, recall and F1, and the confusion matrix."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.loaders.base import Batch
from node.models import Preprocess, unwrap


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
