"""End-to-end ``node-agent run``/``bench``/``matrix`` on the CPU loaders (DESIGN sections
6-8): training learns, every runs/epochs column is filled (GPU columns null on CPU),
pandas and DuckDB read the tables, utilisation is measured right, and the whole flow
works against the loopback S3 server without the secret ever being written."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from node.bench import bench_step
from node.cli import cli
from node.loaders import LOADERS, Batch, Loader, LoaderConfig
from node.train import Trainer
from shared.formats import get_format
from shared.results import EPOCHS, RUNS

from conftest import Dataset, assert_secret_nowhere

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),  # see conftest: a busy shared test box
]

# Null on a CPU-only run; every other column is filled.
GPU_RUN_COLUMNS = {"gpu_name", "peak_vram_bytes", "gpu_util_mean_pct", "vram_kind"}
GPU_EPOCH_COLUMNS = {"peak_vram_bytes", "torch_peak_vram_bytes", "gpu_util_mean_pct"}
CPU_PAIRS = [("file", "png"), ("file", "jpeg-q95"), ("numpy_mmap", "npy"),
             ("hdf5", "hdf5-gzip"), ("zarr", "zarr-zstd")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's runs (as on a node: later runs find it filled)."""
    return tmp_path_factory.mktemp("run-cache")


def agent_args(command: str, ds: Dataset, cache: Path, results: str, *extra: str) -> list[str]:
    return [command, "--store", ds.store, "--dataset", ds.name, "--cache", str(cache),
            "--results", results, "--batch-size", "64", "--workers", "0", *extra]


def invoke(args: list[str], env: dict[str, str] | None = None):  # noqa: ANN201
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    return result


def read_tables(results: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(results / "runs"), pd.read_parquet(results / "epochs")


def check_row(row: pd.Series, *, loader: str, fmt: str, epochs: int, mode: str = "train",
              extra_null: set[str] = frozenset()) -> None:
    """A successful CPU run's row: every column filled but the GPU ones."""
    assert list(row.index)[:len(RUNS.names)] == RUNS.names
    expected_null = GPU_RUN_COLUMNS | {"error"} | set(extra_null)
    if mode == "train":
        expected_null.add("emulated_step_ms")
    missing = [c for c in RUNS.names if c not in expected_null and pd.isna(row[c])]
    assert not missing, f"null columns: {missing}"
    filled = [c for c in expected_null if pd.notna(row[c])]
    assert not filled, f"columns that should be null on CPU: {filled}"
    assert (row["status"], row["loader"], row["format"], row["device"]) == ("ok", loader, fmt,
                                                                            "cpu")
    assert (row["epochs"], row["rank"], row["world_size"], row["io_path"]) == (epochs, 0, 1,
                                                                               "host")
    assert row["samples_per_epoch"] > 0 and row["bytes_read"] > 0
    assert 0 <= row["data_wait_fraction"] <= 1 and 0 < row["accelerator_utilization"] <= 1
    assert row["finished_at"] >= row["started_at"]
    for col in ("versions", "config", "hardware"):
        assert isinstance(json.loads(row[col]), dict)
    config = json.loads(row["config"])
    assert "storage_options" not in config and config["loader"] == loader


# Loaders whose reads cannot be split into read and decode (h5py, zarr do both at once).
NO_STAGES = {"hdf5", "zarr"}


def check_epochs(epochs: pd.DataFrame, run_id: str, n: int, *, val: bool = True,
                 cold: bool = False, trained: bool = True, loader: str = "") -> None:
    rows = epochs[epochs["run_id"] == run_id].sort_values("epoch")
    assert rows["epoch"].tolist() == list(range(n))
    # Measured: right after a fill the data is in the page cache, so a warm run has no
    # cold epoch (not even the first); a --cold run has only cold ones.
    assert rows["cold"].tolist() == [cold] * n
    null_ok = (GPU_EPOCH_COLUMNS | (set() if val else {"val_accuracy", "val_f1"})
               | (set() if trained else {"train_loss", "train_accuracy"})
               | ({"read_time_s", "decode_time_s"} if loader in NO_STAGES else set()))
    for col in EPOCHS.names:
        if col in null_ok:
            continue
        assert rows[col].notna().all(), f"epochs.{col} has nulls"
    assert rows[list(GPU_EPOCH_COLUMNS)].isna().all().all()
    assert (rows["data_time_s"] + rows["compute_time_s"] <= rows["epoch_time_s"] * 1.001).all()


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize("loader,fmt,no_cache", [(*p, False) for p in CPU_PAIRS]
                         + [("zarr", "zarr-zstd", True)],
                         ids=[f"{lo}-{f}" for lo, f in CPU_PAIRS] + ["zarr-no-cache"])
def test_run_learns_and_records_everything(dataset: Dataset, cache_dir: Path, tmp_path: Path,
                                           loader: str, fmt: str, no_cache: bool) -> None:
    results = tmp_path / "results"
    extra = ["--no-cache"] if no_cache else []
    out = invoke(agent_args("run", dataset, cache_dir, str(results), "--format", fmt,
                            "--loader", loader, "--epochs", "2", *extra)).output
    assert "run_id" in out and "val accuracy" in out  # the summary
    runs, epochs = read_tables(results)
    assert len(runs) == 1
    row = runs.iloc[0]
    check_row(row, loader=loader, fmt=fmt, epochs=2)
    assert row["val_accuracy"] > 0.3, row["val_accuracy"]  # 10 classes: chance is 0.1
    assert row["samples_per_epoch"] == 500 and row["mode"] == "train"
    assert row["model"] == "convnet"
    assert len(json.loads(row["confusion_matrix"])) == 10
    if no_cache:  # straight from the store: nothing cached, nothing in the cache dir
        assert row["cache_bytes"] == 0
    else:
        assert row["cache_bytes"] > 0
    check_epochs(epochs, row["run_id"], 2, loader=loader)
    assert row["cold_epochs"] == 0 and not row["cold_requested"]
    assert row["ram_kind"] == "pss" and row["cpu_budget"] >= 1
    assert row["loader_threads"] + row["loader_processes"] >= 1
    assert row["io_path_evidence"].startswith("host: ")
    # DuckDB reads the same files
    con = duckdb.connect()
    got = con.execute(f"select run_id, status, val_accuracy from read_parquet("
                      f"'{results}/runs/*.parquet')").fetchall()
    assert got == [(row["run_id"], "ok", pytest.approx(row["val_accuracy"]))]
    n_epochs = con.execute(f"select count(*) from read_parquet('{results}/epochs/*.parquet') "
                           f"where run_id = '{row['run_id']}'").fetchone()[0]
    assert n_epochs == 2


def test_cold_run(dataset: Dataset, cache_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    invoke(agent_args("run", dataset, cache_dir, str(results), "--format", "npy", "--loader",
                      "numpy_mmap", "--epochs", "2", "--max-steps", "2", "--cold"))
    runs, epochs = read_tables(results)
    row = runs.iloc[0]
    check_row(row, loader="numpy_mmap", fmt="npy", epochs=2)
    assert json.loads(row["config"])["cold"] is True
    check_epochs(epochs, row["run_id"], 2, cold=True)
    assert row["cold_requested"] and row["cold_epochs"] == 2
    assert (epochs["steps"] == 2).all() and (epochs["samples"] == 128).all()


# --------------------------------------------------------------------------- bench


class Throttled(Loader):
    """Synthetic batches, each delivered after a known sleep (the data time)."""

    name = "throttled"

    def __init__(self, batches: int, data_s: float, batch: int = 8) -> None:
        super().__init__(LoaderConfig(fmt=get_format("npy"), shards=(), batch_size=batch,
                                      workers=0, seed=0, device=torch.device("cpu"),
                                      image_shape=(8, 8, 3)))
        self.n, self.data_s, self.batch = batches, data_s, batch
        self.slept: list[float] = []

    @classmethod
    def supports(cls, fmt: object) -> bool:
        return True

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int) -> Iterator[Batch]:
        images = torch.zeros((self.batch, 8, 8, 3), dtype=torch.uint8)
        labels = torch.zeros(self.batch, dtype=torch.int64)
        for i in range(self.n):
            t0 = time.perf_counter()
            time.sleep(self.data_s)
            self.slept.append(time.perf_counter() - t0)
            yield Batch(images, labels, torch.arange(i * self.batch, (i + 1) * self.batch),
                        bytes_read=images.numel())


@pytest.mark.parametrize("data_ms,step_ms", [(10, 30), (30, 10)])
def test_bench_utilisation_matches_step_vs_data_time(data_ms: int, step_ms: int) -> None:
    loader = Throttled(batches=30, data_s=data_ms / 1000)
    result = Trainer(bench_step(step_ms), device="cpu").fit(loader, epochs=1)
    cols = result.run_columns()
    compute = len(loader.slept) * step_ms / 1000
    expected = compute / (compute + sum(loader.slept))  # no prefetch: data and step alternate
    assert cols["accelerator_utilization"] == pytest.approx(expected, abs=0.05)
    assert cols["data_wait_fraction"] == pytest.approx(1 - expected, abs=0.05)
    assert cols["samples_per_epoch"] == 30 * 8 and cols["bytes_read"] == 30 * 8 * 8 * 8 * 3


def test_bench_command(dataset: Dataset, cache_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    invoke(agent_args("bench", dataset, cache_dir, str(results), "--format", "npy", "--loader",
                      "numpy_mmap", "--epochs", "2", "--max-steps", "4", "--emulate-step-ms",
                      "20"))
    runs, epochs = read_tables(results)
    row = runs.iloc[0]
    check_row(row, loader="numpy_mmap", fmt="npy", epochs=2, mode="bench",
              extra_null={"val_accuracy", "val_precision", "val_recall", "val_f1",
                          "confusion_matrix", "model_checksum"})
    assert (row["mode"], row["model"], row["emulated_step_ms"]) == ("bench", "emulated-20ms",
                                                                    20.0)
    # 4 steps of 20 ms each per epoch, fed from memory: the accelerator is mostly busy
    assert row["accelerator_utilization"] > 0.5
    check_epochs(epochs, row["run_id"], 2, val=False, trained=False)
    assert epochs["train_loss"].isna().all()


# --------------------------------------------------------------------------- matrix


def test_matrix_over_the_cpu_loaders(dataset: Dataset, cache_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    result = invoke(agent_args("matrix", dataset, cache_dir, str(results), "--formats",
                               "png,npy,hdf5-gzip,zarr-zstd", "--epochs", "1",
                               "--max-steps", "3"))
    err = result.stderr
    pairs = [("file", "png"), ("numpy_mmap", "npy"), ("hdf5", "hdf5-gzip"),
             ("zarr", "zarr-zstd")]
    for k, (loader, fmt) in enumerate(pairs, 1):
        assert f"[{k}/4] {loader} x {fmt} (repeat 0)" in err, err
        assert f"[{k}/4] {loader} x {fmt}: ok" in err, err
    for name, cls in LOADERS.items():
        reason = cls.unavailable_reason()
        if reason:  # every GPU loader on a CPU machine, each saying why
            assert f"skip {name}: {reason}" in err, err
        elif name not in dict(pairs):
            assert f"skip {name}: none of the formats" in err, err
    if not torch.cuda.is_available():
        assert "needs an NVIDIA GPU" in err
    runs = pd.read_parquet(results / "runs")
    assert sorted(zip(runs["loader"], runs["format"])) == sorted(pairs)
    assert (runs["status"] == "ok").all() and (runs["repeat"] == 0).all()


# --------------------------------------------------------------------------- S3


def test_s3_end_to_end(s3_dataset: Dataset, s3_server, s3_bucket: str,  # noqa: ANN001
                       tmp_path: Path) -> None:
    """Store and results on S3, credentials from the AWS environment only."""
    results = f"{s3_bucket}/results"
    cache = tmp_path / "cache"
    result = invoke(agent_args("run", s3_dataset, cache, results, "--format", "npy",
                               "--loader", "numpy_mmap", "--epochs", "1", "--max-steps", "3"),
                    env=s3_server.env())
    options = s3_server.storage_options
    runs = pd.read_parquet(f"{results}/runs", storage_options=options)
    epochs = pd.read_parquet(f"{results}/epochs", storage_options=options)
    assert len(runs) == 1 and len(epochs) == 1
    row = runs.iloc[0]
    check_row(row, loader="numpy_mmap", fmt="npy", epochs=1)
    assert row["cache_bytes"] > 0
    assert json.loads(row["config"])["store"] == s3_dataset.store
    assert_secret_nowhere(s3_server.secret, s3_server.root, cache, tmp_path,
                          texts=(result.output, s3_dataset.output, runs.to_json(date_format="iso"),
                                 epochs.to_json(date_format="iso")))
