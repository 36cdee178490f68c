"""Two ranks on this CPU machine train one model with DDP (gloo) through torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from prep.convert import main as convert
from testdata.datagen import make_cifar10_python


@pytest.mark.slow
def test_two_ranks_train_one_model(tmp_path: Path) -> None:
    make_cifar10_python(tmp_path / "c.tar.gz", train_per_batch=61, test=40, seed=3)
    # 305 train samples in shards of 100: uneven shards, and 305 is odd, so rank
    # ranges cut mid-shard and one sample is left out.
    assert convert(["--source", "cifar10", "--src", str(tmp_path / "c.tar.gz"),
                    "--dst", str(tmp_path / "store"), "--formats", "npy",
                    "--shard-samples", "100", "--address", "inline"]) == 0
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    cmd = [str(bindir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
           "node-agent", "run", "--store", str(tmp_path / "store"), "--dataset", "cifar10",
           "--format", "npy", "--loader", "numpy_mmap", "--cache", str(tmp_path / "cache"),
           "--results", str(tmp_path / "results"), "--epochs", "2", "--batch-size", "32",
           "--workers", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = pd.read_parquet(tmp_path / "results" / "runs").sort_values("rank")
    assert list(runs["rank"]) == [0, 1]
    assert set(runs["world_size"]) == {2}
    assert set(runs["status"]) == {"ok"}
    assert set(runs["samples_per_epoch"]) == {152}  # 305 // 2
    # One model: DDP keeps the replicas identical, so the trained weights match.
    assert runs["model_checksum"].nunique() == 1
    assert runs["run_id"].str.rsplit("-r", n=1).str[0].nunique() == 1
    # Rank 0 evaluates on the whole validation split; rank 1 does not.
    assert runs.iloc[0]["val_accuracy"] is not None and runs.iloc[0]["val_accuracy"] > 0.2
    assert pd.isna(runs.iloc[1]["val_accuracy"])

    epochs = pd.read_parquet(tmp_path / "results" / "epochs")
    steps = epochs.groupby("run_id")["steps"].apply(list)
    assert len(steps) == 2 and steps.iloc[0] == steps.iloc[1] == [5, 5]
