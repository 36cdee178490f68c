"""A small sample of every registered source, in its real layout, for the contract test.

``SAMPLES[name](folder)`` writes one into ``folder`` and returns the URL to give the
source. A new source adds its writer here; tests/prep/test_source_contract.py fails
for a registered source that has none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from testdata.cifar import make_cifar10_python
from testdata.folders import make_image_folder
from testdata.tiny import make_tiny_imagenet


def _cifar10(folder: Path) -> str:
    return str(make_cifar10_python(folder / "cifar-10-python.tar.gz", train_per_batch=4,
                                   test=6, seed=1).path)


def _tiny_imagenet(folder: Path) -> str:
    return str(make_tiny_imagenet(folder, classes=3, train_per_class=4, val_per_class=2,
                                  zip=True, seed=1).path)


def _image_folder(folder: Path) -> str:
    return str(make_image_folder(folder / "photos", classes=3, per_class=5, size=(48, 40),
                                 odd_files=False, seed=1)["root"])


SAMPLES: dict[str, Callable[[Path], str]] = {
    "cifar10": _cifar10,
    "tiny-imagenet": _tiny_imagenet,
    "image-folder": _image_folder,
}
