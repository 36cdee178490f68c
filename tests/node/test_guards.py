"""Warnings before training: each guard's exact line, and silence when all is well."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

from node.cache_fill import CacheFill
from node.cli import cli
from node.guards import run_warnings, step_warnings, val_warnings

from conftest import Dataset

CLASSES = ("cat", "dog", "owl", "yak")


def test_few_steps_per_epoch() -> None:
    assert step_warnings(106, 32) == [
        "only 4 steps per epoch (106 images, batch 32): fewer than 10, so start-up "
        "dominates every figure; use --batch-size 10 or fewer, or more images"]
    assert step_warnings(1000, 32, max_steps=3)[0].startswith("only 3 steps per epoch")
    assert step_warnings(1000, 32) == []


def test_batch_larger_than_the_training_set() -> None:
    assert step_warnings(106, 256) == [
        "batch size 256 exceeds the 106 training images: every step is the same partial "
        "batch; lower --batch-size",
        "only 1 step per epoch (106 images, batch 256): fewer than 10, so start-up "
        "dominates every figure; use --batch-size 10 or fewer, or more images"]


def test_validation_split_missing_a_class_or_small() -> None:
    labels = np.array([0] * 5 + [1] * 4 + [3] * 5)
    assert val_warnings(labels, CLASSES) == [
        "the validation split has no image of class 'owl' (1 of 4 classes): their recall "
        "is undefined",
        "the validation split has 4-5 images per class (fewer than 20): accuracy "
        "differences between runs are mostly noise"]
    assert val_warnings(np.repeat(np.arange(4), 20), CLASSES) == []
    assert val_warnings(np.zeros(0, dtype=np.int64), CLASSES) == [
        "the validation split is empty: accuracy is not measured"]


def test_run_warnings_over_a_fill_skips_val_when_not_validating() -> None:
    from node.cache import CacheStats
    from node.loaders.base import ShardSlice

    train = [ShardSlice("x", np.zeros(100, dtype=np.int64), None, 0, 100)]
    val = [ShardSlice("y", np.array([0, 0, 1, 1, 2, 2, 3, 3]), None, 2, 8)]
    fill = CacheFill(train, val, "val", CacheStats())
    got = run_warnings(fill, 10, None, CLASSES, validate=True)
    assert got == ["the validation split has no image of class 'cat' (1 of 4 classes): "
                   "their recall is undefined",
                   "the validation split has 2 images per class (fewer than 20): accuracy "
                   "differences between runs are mostly noise"]
    assert run_warnings(fill, 10, None, CLASSES, validate=False) == []


def test_a_run_prints_and_records_its_warnings(dataset: Dataset, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [
        "run", "--store", dataset.store, "--dataset", dataset.name, "--format", "npy",
        "--loader", "numpy_mmap", "--cache", str(tmp_path / "cache"), "--results",
        str(tmp_path / "results"), "--epochs", "1", "--batch-size", "256", "--workers", "0",
        "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warned[0] == ("warning: only 1 step per epoch (500 images, batch 256): fewer than "
                         "10, so start-up dominates every figure; use --batch-size 50 or "
                         "fewer, or more images")
    config = pd.read_parquet(tmp_path / "results" / "runs")["config"].iloc[0]
    assert "only 1 step per epoch" in config and '"warnings"' in config
