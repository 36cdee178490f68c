"""Storage can cost accuracy: the same model, seed and epochs on one generated dataset
stored losslessly, as high-quality JPEG and as low-quality JPEG.

testdata/'s classes come in pairs that differ only in a fine texture; JPEG q10
quantises it away, so a model trained and validated on q10 can tell only the pair.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from node.cli import cli

from conftest import DATASET, convert

FORMATS = ("png", "jpeg-q95", "jpeg-q10")
TRAIN, TEST = 800, 200
EPOCHS = 3


def _val_accuracy(store: Path, fmt: str, tmp_path: Path) -> float:
    results = tmp_path / f"results-{fmt}"
    result = CliRunner().invoke(cli, [
        "run", "--store", str(store), "--dataset", DATASET, "--format", fmt, "--loader", "file",
        "--cache", str(tmp_path / "cache"), "--results", str(results), "--epochs", str(EPOCHS),
        "--batch-size", "32", "--workers", "0", "--seed", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (accuracy,) = pd.read_parquet(results / "runs")["val_accuracy"]
    return float(accuracy)


def test_low_jpeg_quality_lowers_accuracy_and_high_quality_does_not(
        tmp_path: Path, one_torch_thread: None) -> None:
    from testdata.datagen import make_cifar10_python

    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10_python(archive, train_per_batch=TRAIN // 5, test=TEST, seed=3)
    store = tmp_path / "store"
    code, output = convert(archive, str(store), FORMATS)
    assert code == 0, output
    accuracy = {fmt: _val_accuracy(store, fmt, tmp_path) for fmt in FORMATS}
    assert accuracy["png"] >= 0.7, accuracy  # the fine texture is learnt where it is kept
    assert accuracy["png"] - accuracy["jpeg-q10"] >= 0.15, accuracy
    assert abs(accuracy["png"] - accuracy["jpeg-q95"]) <= 0.06, accuracy
