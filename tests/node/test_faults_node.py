"""Faults around ``node-agent`` itself (issue 15): eight runs at once sharing one cache
and one results store, the results store going away before a run writes its rows, and
a bad value for every flag of every command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from shared.storage import Store

from conftest import Dataset, convert
from test_cache import agent, assert_cache_valid

RUN = ["--format", "npy", "--loader", "numpy_mmap", "--epochs", "1", "--max-steps", "2",
       "--batch-size", "32", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def npy_dataset(cifar_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The node tests' archive converted to npy only (the cheapest format to read)."""
    from shared.manifest import Manifest

    store = tmp_path_factory.mktemp("faults-node") / "store"
    code, output = convert(cifar_archive, str(store), ("npy",))
    assert code == 0, output
    return Dataset(str(store), "cifar10", Manifest.load(Store.open(str(store)), "cifar10"))


def run_args(ds: Dataset, cache: Path, results: str, command: str = "run") -> list[str]:
    return [command, "--store", ds.store, "--dataset", ds.name, "--cache", str(cache),
            "--results", results, *RUN]


# --------------------------------------------------------------------------- eight at once


def test_eight_runs_share_one_cache_and_results_store(npy_dataset: Dataset,
                                                      tmp_path: Path) -> None:
    """Eight real ``node-agent run`` processes, released together on an empty cache and
    an empty results store: all exit 0, eight run rows and their epoch rows read back,
    and the cache they filled together passes its checksums."""
    cache, results, n = tmp_path / "cache", tmp_path / "results", 8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 8 processes on a 2-core box
    procs = [agent(run_args(npy_dataset, cache, str(results)), env,
                   FL_READY=str(tmp_path / f"ready-{i}"), FL_GO=str(tmp_path / "go"))
             for i in range(n)]
    try:
        wait_for([tmp_path / f"ready-{i}" for i in range(n)], procs)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        stop(procs)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "Traceback" not in err
    runs = pd.read_parquet(results / "runs")
    epochs = pd.read_parquet(results / "epochs")
    assert len(runs) == n and runs["run_id"].nunique() == n
    assert (runs["status"] == "ok").all()
    assert sorted(epochs["run_id"]) == sorted(runs["run_id"])  # one epoch each, none lost
    assert not [p for p in results.rglob("*") if p.name.startswith(".")]
    assert_cache_valid(cache, npy_dataset, "npy")


def wait_for(paths: list[Path], procs: list) -> None:  # noqa: ANN001
    """Until every ``paths`` exists (each process signals it is ready); a dead one fails."""
    import time

    deadline = time.monotonic() + 240
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, "the agents did not start"
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, [p.communicate() for p in dead]
        time.sleep(0.05)


def stop(procs: list) -> None:  # noqa: ANN001
    """Kill (by pid) whichever of this test's processes still runs."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()

