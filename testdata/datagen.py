"""Synthetic datasets in the sources' real on-disk formats, for tests and demos.

Every generator writes the layout the real download has (a CIFAR-10 python or binary
tarball, a Tiny ImageNet folder or zip, a folder of class sub-folders) and returns what
it wrote, so tests can compare. Images are learnable, and what storage loses can cost
accuracy: pairs of classes share a coarse look (hue band, wide stripes) and the two
classes of a pair differ only in a fine texture that low-quality JPEG removes (see
:func:`render_images`); a small ConvNet tells the pairs apart within an epoch or two.

CLI::

    python -m testdata.datagen {cifar10,cifar10-binary,tiny-imagenet,image-folder} --out PATH
        [--train N] [--test N] [--classes K] [--size S] [--seed N] [--zip]
        [--splits] [--no-odd-files]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from testdata.cifar import (CIFAR_CLASSES, GeneratedCifar, make_booby_trapped_cifar,
                            make_cifar10_binary, make_cifar10_python)
from testdata.folders import make_image_folder
from testdata.pixels import _corrupt_jpeg, _jpeg, _png, _png_bomb, render_images
from testdata.tiny import GeneratedTiny, make_tiny_imagenet

__all__ = ["CIFAR_CLASSES", "GeneratedCifar", "GeneratedTiny", "_corrupt_jpeg", "_jpeg", "_png",
           "_png_bomb", "main", "make_booby_trapped_cifar", "make_cifar10_binary",
           "make_cifar10_python", "make_image_folder", "make_tiny_imagenet", "render_images"]


def _parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        width = int(w)
        height = int(h) if h else width
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Write one synthetic dataset; see the module docstring for the flags."""
    parser = argparse.ArgumentParser(prog="python -m testdata.datagen", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("cifar10", "cifar10-binary", "tiny-imagenet", "image-folder"))
    parser.add_argument("--out", required=True, type=Path,
                        help="archive path (cifar10*: .tar.gz, tiny --zip: .zip) or folder to write into")
    parser.add_argument("--train", type=_positive,
                        help="cifar10: train images in all (a multiple of 5; default 50000); "
                             "tiny-imagenet: per class (default 100); image-folder: per class (default 20)")
    parser.add_argument("--test", type=_positive,
                        help="cifar10: test images (default 10000); tiny-imagenet: val images per class "
                             "(default 20); image-folder: unused (val and test get a fifth of --train)")
    parser.add_argument("--classes", type=_positive,
                        help="tiny-imagenet (default 10) and image-folder (default 3); CIFAR-10 has 10")
    parser.add_argument("--size", type=_parse_size,
                        help="tiny-imagenet: side (default 64); image-folder: WxH (default 640x480)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--zip", action="store_true", help="tiny-imagenet: write tiny-imagenet-200.zip")
    parser.add_argument("--splits", action="store_true",
                        help="image-folder: put class folders under train/ val/ test/")
    parser.add_argument("--no-odd-files", action="store_true",
                        help="image-folder: leave out the corrupt, empty, odd-mode and hidden files")
    args = parser.parse_args(argv)

    if args.kind.startswith("cifar10"):
        if args.classes not in (None, 10):
            parser.error("CIFAR-10 always has 10 classes")
        train = 50_000 if args.train is None else args.train
        if train % 5:
            parser.error("--train for cifar10 must be a multiple of 5 (five batch files)")
        binary = args.kind == "cifar10-binary"
        out = args.out if args.out.name.endswith(".tar.gz") else args.out / (
            "cifar-10-binary.tar.gz" if binary else "cifar-10-python.tar.gz")
        make = make_cifar10_binary if binary else make_cifar10_python
        made = make(out, train_per_batch=train // 5, test=10_000 if args.test is None else args.test,
                    seed=args.seed)
        print(f"wrote {made.path}: {len(made.train_labels)} train, {len(made.test_labels)} test")
    elif args.kind == "tiny-imagenet":
        tiny = make_tiny_imagenet(args.out, classes=args.classes or 10,
                                  train_per_class=100 if args.train is None else args.train,
                                  val_per_class=20 if args.test is None else args.test,
                                  size=args.size[0] if args.size else 64, zip=args.zip, seed=args.seed)
        print(f"wrote {tiny.path}: {len(tiny.wnids)} classes, train {tiny.splits['train']}, "
              f"val {tiny.splits['val']}, test {tiny.test_images}")
    else:
        made_folder = make_image_folder(args.out, classes=args.classes or 3,
                                        per_class=20 if args.train is None else args.train,
                                        size=args.size or (640, 480), splits=args.splits,
                                        odd_files=not args.no_odd_files, seed=args.seed)
        print(f"wrote {made_folder['root']}: {len(made_folder['files'])} files in "
              f"{len(made_folder['classes'])} classes, {len(made_folder['rejects'])} meant to be rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
