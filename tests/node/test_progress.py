"""Progress lines (stderr) and tables (stdout) of run and matrix; the estimates."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from node.cli import cli
from shared.progress import duration, seconds_left

from conftest import Dataset


def test_time_left_from_the_rate_so_far() -> None:
    assert seconds_left(0, 10, 5.0) is None
    assert seconds_left(2, 10, 5.0) == 20.0
    assert seconds_left(10, 10, 5.0) == 0.0
    assert [duration(s) for s in (None, 42, 185, 3720)] == ["?", "42 s", "3 min 5 s",
                                                            "1 h 2 min"]


def agent(dataset: Dataset, tmp_path: Path, command: str, *extra: str) -> list[str]:
    return [command, "--store", dataset.store, "--dataset", dataset.name, "--cache",
            str(tmp_path / "cache"), "--results", str(tmp_path / "results"), "--epochs", "2",
            "--batch-size", "50", "--workers", "0", "--max-steps", "2", *extra]


def test_run_prints_the_cache_and_each_epoch_with_an_estimate(dataset: Dataset,
                                                              tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, agent(dataset, tmp_path, "run", "--format", "npy",
                                           "--loader", "numpy_mmap"))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    label = f"{dataset.name}/npy/numpy_mmap"
    assert any(line.startswith(f"{dataset.name}/npy: cache ready: ") for line in lines), lines
    first = next(line for line in lines if line.startswith(f"{label}: epoch 1/2: "))
    assert " img/s" in first and "loss " in first and first.endswith(" left"), first
    last = next(line for line in lines if line.startswith(f"{label}: epoch 2/2: "))
    assert not last.endswith(" left"), last
    assert "epoch 1/2" not in result.stdout  # progress on stderr, the table on stdout


def test_matrix_counts_pairs_estimates_and_ends_with_a_table(dataset: Dataset,
                                                             tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, agent(dataset, tmp_path, "matrix", "--loaders",
                                           "file,numpy_mmap", "--formats", "npy-files,npy"))
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "[1/2] file x npy-files (repeat 0): 0 done, 2 left\n" in err, err
    assert "[2/2] numpy_mmap x npy (repeat 0): 1 done, 1 left, about " in err, err
    table = result.stdout
    assert "matrix: 2 runs in " in table
    for name in ("npy-files", "numpy_mmap", "img/s", "val acc"):
        assert name in table, table
