"""The models, optimisers and preprocessing every loader trains with, built by name.

A loader hands over uint8 NHWC batches on the training device; :class:`Preprocess`
turns them into normalised float NCHW (channels-last memory) with the same batched,
seeded augmentation for every loader, so that only the data path differs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.choices import MODELS  # defined torch-free, for --help

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
