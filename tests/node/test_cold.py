"""``--cold`` is measured, not assumed (DESIGN section 8).

A fresh cache is filled (so every cached file has just been written and checksummed:
the page cache holds it, some of it dirty) and ``bench --cold --epochs 3`` runs right
after: each epoch must read at least half the cached bytes from storage, as the OS
counts them for the process tree (DataLoader workers included), and be flagged cold.
The same run without ``--cold`` flags no epoch cold. Real files, real page cache;
``hdf5`` and ``zarr`` read in DataLoader workers that stay up across epochs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from node.cli import cli
from node.probes import disk_read_bytes

from conftest import Dataset

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(disk_read_bytes() is None, reason="/proc/<pid>/io unreadable here"),
]

# file: reads in a DataLoader worker process; numpy_mmap: page faults on a map.
PAIRS = [("numpy_mmap", "npy"), ("file", "png"), ("hdf5", "hdf5-gzip"), ("zarr", "zarr-zstd")]


def bench(ds: Dataset, cache: Path, results: Path, loader: str, fmt: str,
          *extra: str) -> tuple[pd.Series, pd.DataFrame]:
    args = ["bench", "--store", ds.store, "--dataset", ds.name, "--cache", str(cache),
            "--results", str(results), "--format", fmt, "--loader", loader,
            "--batch-size", "64", "--workers", "1", "--epochs", "3", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    runs, epochs = pd.read_parquet(results / "runs"), pd.read_parquet(results / "epochs")
    assert len(runs) == 1
    return runs.iloc[0], epochs.sort_values("epoch")


@pytest.mark.parametrize("loader,fmt", PAIRS, ids=[p[0] for p in PAIRS])
def test_cold_epochs_read_from_storage(dataset: Dataset, tmp_path: Path, loader: str,
                                       fmt: str) -> None:
    row, epochs = bench(dataset, tmp_path / "cache", tmp_path / "results", loader, fmt, "--cold")
    assert epochs["cold"].tolist() == [True, True, True]
    assert (epochs["disk_read_bytes"] >= row["cache_bytes"] / 2).all(), (
        epochs["disk_read_bytes"].tolist(), row["cache_bytes"])
    assert row["cold_requested"] and row["cold_epochs"] == 3


@pytest.mark.parametrize("loader,fmt", PAIRS, ids=[p[0] for p in PAIRS])
def test_warm_run_flags_no_epoch_cold(dataset: Dataset, tmp_path: Path, loader: str,
                                      fmt: str) -> None:
    row, epochs = bench(dataset, tmp_path / "cache", tmp_path / "results", loader, fmt)
    assert epochs["cold"].tolist() == [False, False, False]
    # Really warm: the data came from the page cache. (The first epoch may also fault in
    # library pages on first use, so it is left out.)
    assert (epochs["disk_read_bytes"].iloc[1:] < row["cache_bytes"] / 2).all()
    assert not row["cold_requested"] and row["cold_epochs"] == 0
