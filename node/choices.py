"""Names the command line offers, kept free of heavy imports so ``--help`` answers at once."""

from __future__ import annotations

MODELS: tuple[str, ...] = ("convnet", "resnet18", "googlenet")
