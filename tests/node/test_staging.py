"""Host staging bounds (node/loaders/staging.py): computed, never timed.

The bounds are counts of batch buffers from each loader's prefetch rules; these tests
check the counts for known cases, that they grow with batch size and workers only, that
a real DataLoader-based loader is built with the prefetch its bound assumes, and that
a loader over the budget is refused in one line before it reads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from node.loaders import LOADERS, LoaderUnavailable
from node.loaders.base import LoaderConfig, ShardSlice
from node.loaders.staging import (
    BUDGET_ENV,
    MIB,
    StagingBound,
    batch_bytes,
    check_host_staging,
    cupy_bound,
    host_budget,
    mmap_bound,
    physical_memory,
    prefetch_factor,
    staging_reason,
    worker_bound,
)
from shared.formats import get_format
from shared.shards import read_index, shard_path, write_shard
from shared.storage import Store

B512 = batch_bytes(256, (512, 512, 3))  # 192 MiB: the study's batch


def test_batch_bytes_and_prefetch() -> None:
    assert B512 == 256 * 512 * 512 * 3
    assert prefetch_factor(B512, 8) == 2  # 1.5 GiB a round: the floor
    assert prefetch_factor(batch_bytes(32, (32, 32, 3)), 4) == 4  # tiny: the ceiling
    assert prefetch_factor(200 << 20, 2) == 2  # 1 GiB // 400 MiB


def test_worker_bound_counts() -> None:
    # 8 workers x 2 prefetched + held + previous; pinned copies of all but one; 2 scratch
    # batches per worker
    cuda = worker_bound(B512, 8, pinned=True)
    assert cuda == StagingBound(18, 17, 16, B512)
    assert cuda.total_bytes == 51 * B512
    assert worker_bound(B512, 8, pinned=False).total_bytes == 34 * B512
    assert worker_bound(B512, 0, pinned=False) == StagingBound(2, 0, 2, B512)
    assert worker_bound(B512, 0, pinned=True).total_bytes == 5 * B512
    small = batch_bytes(32, (32, 32, 3))
    assert worker_bound(small, 4, pinned=False) == StagingBound(18, 0, 8, small)


def test_mmap_and_cupy_bounds() -> None:
    assert mmap_bound(B512, 4, pinned=False).total_bytes == 7 * B512
    assert mmap_bound(B512, 4, pinned=True).total_bytes == 6 * B512
    assert mmap_bound(B512, 0, pinned=False).total_bytes == 2 * B512
    assert cupy_bound(10 << 30).total_bytes == 128 * MIB  # two 64 MiB chunks, any size
    assert cupy_bound(1000).total_bytes == 2000


def test_thread_bound_and_read_ahead() -> None:
    from node.loaders.staging import thread_bound, with_read_ahead

    assert thread_bound(B512, True, pinned=False) == StagingBound(4, 0, 1, B512)
    assert thread_bound(B512, False, pinned=True) == StagingBound(0, 2, 1, B512)
    base = thread_bound(B512, True, pinned=False)._replace(fixed_bytes=32 * MIB)
    roomy = with_read_ahead(base, 4 << 30, 64 << 30)  # the ceiling, then
    assert roomy.read_ahead == 4 << 30 and roomy.describe().endswith("+ 4096 MiB read-ahead")
    tight = with_read_ahead(base, 4 << 30, base.total_bytes + 100 * MIB)  # what is left
    assert tight.read_ahead == 100 * MIB and tight.total_bytes == base.total_bytes + 100 * MIB
    assert with_read_ahead(base, 4 << 30, base.total_bytes - 1).read_ahead == 0


def test_bounds_grow_with_batch_and_workers_only() -> None:
    for bound in (worker_bound, mmap_bound):
        for pinned in (False, True):
            by_batch = [bound(batch_bytes(b, (512, 512, 3)), 4, pinned).total_bytes
                        for b in (16, 64, 256)]
            by_workers = [bound(B512, w, pinned).total_bytes for w in (0, 2, 8)]
            assert by_batch == sorted(by_batch) and len(set(by_batch)) == 3
            assert by_workers == sorted(by_workers) and len(set(by_workers)) == 3


def test_budget_from_the_environment(tmp_path: Path) -> None:
    assert host_budget({BUDGET_ENV: "512"}) == 512 * MIB
    assert host_budget({}) == physical_memory() // 2
    limit = tmp_path / "memory.max"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for text, expect in (("1073741824\n", 1 << 30), ("max\n", total)):
        limit.write_text(text)
        assert physical_memory(str(limit)) == expect
    for bad in ("lots", "0"):
        with pytest.raises(ValueError, match=BUDGET_ENV):
            host_budget({BUDGET_ENV: bad})
    bound = worker_bound(B512, 8, pinned=True)
    assert staging_reason("file", bound, bound.total_bytes) is None
    reason = staging_reason("file", bound, bound.total_bytes - 1)
    assert reason is not None and "\n" not in reason
    assert reason.startswith("file: host staging needs up to 9792 MiB "
                             "(18 batches + 17 pinned + 16 scratch) x 192.0 MiB")
    with pytest.raises(LoaderUnavailable, match=f"^zarr: {BUDGET_ENV}='x' is not"):
        check_host_staging("zarr", bound, environ={BUDGET_ENV: "x"})
    # The flag's value (the loader config's host_staging_mib) overrides the environment
    fits = bound.total_bytes / MIB
    assert host_budget({BUDGET_ENV: "1"}, mib=fits) == bound.total_bytes
    check_host_staging("file", bound, fits, environ={BUDGET_ENV: "1"})
    with pytest.raises(LoaderUnavailable, match=r"MiB \(--host-staging-mib\); use a smaller"):
        check_host_staging("file", bound, fits / 2, environ={BUDGET_ENV: str(2 * fits)})


def config_for(root: Path, format_id: str, *, batch: int, workers: int) -> LoaderConfig:
    store, fmt = Store.open(str(root)), get_format(format_id)
    rng = np.random.default_rng(0)
    write_shard(store, fmt, "train", 0, [f"k{i}" for i in range(20)],
                rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, 20))
    location = root / shard_path(format_id, "train", 0)
    index = read_index(location / "index.parquet")
    files = tuple(index.column("file").to_pylist()) if "file" in index.column_names else None
    shard = ShardSlice(location=str(location), labels=index.column("label").to_numpy(),
                       files=files, start=0, stop=20)
    return LoaderConfig(fmt=fmt, shards=(shard,), batch_size=batch, workers=workers, seed=0,
                        device=torch.device("cpu"), image_shape=(8, 8, 3))


@pytest.mark.parametrize(("loader_name", "format_id"), [("file", "png"), ("hdf5", "hdf5"),
                                                        ("zarr", "zarr")])
def test_loaders_are_built_as_bounded_and_refused_over_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader_name: str,
        format_id: str) -> None:
    config = config_for(tmp_path, format_id, batch=4, workers=2)
    loader = LOADERS[loader_name](config)
    bound = loader.staging_bound()
    assert bound == worker_bound(4 * 8 * 8 * 3, 2, pinned=False)
    try:
        dataloader = loader._build()  # the real DataLoader the epoch would iterate
        assert dataloader.prefetch_factor * dataloader.num_workers == bound.batches - 2
        monkeypatch.setenv(BUDGET_ENV, str(bound.total_bytes / MIB))
        loader.check_fits()  # exactly at the budget: fits
        monkeypatch.setenv(BUDGET_ENV, str((bound.total_bytes - 1) / MIB))
        with pytest.raises(LoaderUnavailable, match=rf"^{loader_name}: host staging needs"):
            loader.check_fits()
    finally:
        loader.close()


@pytest.mark.parametrize("workers", [0, 3])
def test_numpy_mmap_is_bounded_and_refused_over_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    from node.errors import UsageError
    from node.session import build_loader

    config = config_for(tmp_path, "npy", batch=4, workers=workers)
    loader = LOADERS["numpy_mmap"](config)
    try:
        bound = loader.staging_bound()
        assert bound == mmap_bound(4 * 8 * 8 * 3, workers, pinned=False)
        monkeypatch.setenv(BUDGET_ENV, str(bound.total_bytes / MIB))
        loader.check_fits()
    finally:
        loader.close()
    # The run path (session.build_loader) refuses it in one line before any read.
    monkeypatch.setenv(BUDGET_ENV, str((bound.total_bytes - 1) / MIB))
    with pytest.raises(UsageError, match=r"^loader 'numpy_mmap': numpy_mmap: host staging "
                                         r"needs") as info:
        build_loader(LOADERS["numpy_mmap"], config)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def npy_store(cifar_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from conftest import convert

    store = tmp_path_factory.mktemp("staging-npy") / "store"
    code, output = convert(cifar_archive, str(store), ("npy",))
    assert code == 0, output
    return str(store)


def test_host_staging_flag_overrides_the_environment(
        npy_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``node-agent --host-staging-mib``: refused under it in one line (exit 2, nothing
    written); over an environment budget that would refuse, it lets the run go, and the
    config column records it."""
    import json

    import pandas as pd
    from click.testing import CliRunner

    from node.cli import cli

    def run(out: Path, mib: str) -> object:
        return CliRunner().invoke(cli, [
            "bench", "--store", npy_store, "--dataset", "cifar10", "--format", "npy",
            "--loader", "numpy_mmap", "--cache", str(out / "cache"), "--results",
            str(out / "results"), "--epochs", "1", "--batch-size", "64", "--workers", "0",
            "--max-steps", "1", "--host-staging-mib", mib])

    monkeypatch.delenv(BUDGET_ENV, raising=False)
    refused = run(tmp_path / "a", "0.01")  # a batch of 64 32x32 images is 0.19 MiB
    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in refused.output, refused.stderr
    assert lines[0].startswith("node-agent: error: loader 'numpy_mmap': numpy_mmap: host "
                               "staging needs up to 0.38 MiB"), lines[0]
    assert "over the budget of 0.01 MiB (--host-staging-mib)" in lines[0]
    assert not (tmp_path / "a" / "results").exists()
    monkeypatch.setenv(BUDGET_ENV, "0.01")
    ran = run(tmp_path / "b", "64")
    assert ran.exit_code == 0, ran.output
    row = pd.read_parquet(tmp_path / "b" / "results" / "runs").iloc[0]
    config = row["config"] if isinstance(row["config"], dict) else json.loads(row["config"])
    assert config["host_staging_mib"] == 64
