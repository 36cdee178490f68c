"""node-agent's command-line contract (DESIGN section 6): the loader table, exit 2 with
one line for every usage error, exit 1 and a ``failed`` results row for a run that
fails midway, no traceback without ``--debug``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from node.cli import cli
from node.loader_table import loader_rows
from node.loaders import LOADERS

from conftest import Dataset, copy_store

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run_args(ds: Dataset, tmp: Path, loader: str, fmt: str, *extra: str) -> list[str]:
    return ["run", "--store", ds.store, "--dataset", ds.name, "--format", fmt,
            "--loader", loader, "--cache", str(tmp / "cache"), "--results",
            str(tmp / "results"), "--epochs", "1", "--batch-size", "64", "--workers", "0",
            "--max-steps", "1", *extra]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("node-agent: error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def test_loaders_table_lists_every_loader() -> None:
    result = CliRunner().invoke(cli, ["loaders"])
    assert result.exit_code == 0, result.output
    for name in LOADERS:
        assert name in result.output
    rows = loader_rows()
    assert [r["loader"] for r in rows] == list(LOADERS)
    for row in rows:
        assert row["device"] in ("cpu", "cuda") and row["formats"]
        if row["available"]:
            assert row["reason"] == ""
        else:  # one line that says why
            assert row["reason"].strip() and "\n" not in row["reason"], row
            assert row["reason"].split()[0].rstrip(":") == row["loader"], row
    if not torch.cuda.is_available():
        unavailable = {r["loader"] for r in rows if not r["available"]}
        assert unavailable == {n for n, c in LOADERS.items() if c.device_kind == "cuda"}
        assert "needs an NVIDIA GPU" in result.output


USAGE_ERRORS = {
    "unknown loader": (("nope", "npy"), (), ["'nope'", "numpy_mmap", "zarr"]),
    "unknown format": (("numpy_mmap", "gif-9"), (), ["gif-9"]),
    "format not in dataset": (("file", "bmp"), (), ["'bmp'", "not in dataset", "png"]),
    "loader/format mismatch": (("numpy_mmap", "png"), (), ["cannot read", "'png'", "file"]),
    "no-cache without zarr": (("numpy_mmap", "npy"), ("--no-cache",), ["--no-cache", "zarr"]),
    "missing dataset": (("numpy_mmap", "npy"), ("--dataset", "nothere"), ["'nothere'",
                                                                          "not found"]),
    "bad storage options": (("numpy_mmap", "npy"), ("--storage-options", '{"key": '),
                            ["--storage-options", "JSON"]),
    "bad storage options type": (("numpy_mmap", "npy"), ("--storage-options", "[1]"),
                                 ["--storage-options", "object"]),
    "rank outside world": (("numpy_mmap", "npy"), ("--rank", "3", "--world-size", "2"),
                           ["rank 3"]),
}
GPU_ERRORS = {
    "unavailable GPU loader": (("cupy", "npy"), (), ["'cupy'", "cannot run here"]),
    "GPU loader for files": (("dali", "png"), (), ["'dali'", "cannot run here"]),
    "cuda device": (("numpy_mmap", "npy"), ("--device", "cuda"), ["--device cuda", "CUDA"]),
}


@pytest.mark.parametrize("case", [*USAGE_ERRORS, *(pytest.param(c, marks=NO_CUDA)
                                                    for c in GPU_ERRORS)])
def test_usage_errors_exit_2_with_one_line(dataset: Dataset, tmp_path: Path, case: str) -> None:
    (loader, fmt), extra, needles = {**USAGE_ERRORS, **GPU_ERRORS}[case]
    args = run_args(dataset, tmp_path, loader, fmt)
    if "--dataset" in extra:  # replace, not repeat
        args[args.index("--dataset") + 1] = extra[1]
        extra = ()
    result = CliRunner().invoke(cli, [*args, *extra])
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "results").exists()  # nothing ran, nothing recorded


def test_cache_of_format_not_in_dataset_is_a_usage_error(dataset: Dataset,
                                                          tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["cache", "--store", dataset.store, "--dataset",
                                      dataset.name, "--format", "webp-lossless",
                                      "--cache", str(tmp_path)])
    assert result.exit_code == 2
    assert "not in dataset" in one_error_line(result.stderr)


def test_click_usage_error_is_exit_2(dataset: Dataset, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [*run_args(dataset, tmp_path, "numpy_mmap", "npy"),
                                      "--epochs", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def corrupt_store(dataset: Dataset, dst: Path) -> Dataset:
    """A copy of the npy folders whose train images no longer match their checksum."""
    ds = copy_store(dataset, dst, ("npy",))
    path = Path(ds.store) / ds.name / "npy" / "train" / "shard-00001" / "images.npy"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    return ds


def test_run_failing_midway_exits_1_and_records_the_failure(dataset: Dataset,
                                                            tmp_path: Path) -> None:
    ds = corrupt_store(dataset, tmp_path / "store")
    result = CliRunner().invoke(cli, run_args(ds, tmp_path, "numpy_mmap", "npy"))
    assert result.exit_code == 1, result.output
    line = one_error_line(result.stderr)
    assert "checksum mismatch" in line and "images.npy" in line
    runs = pd.read_parquet(tmp_path / "results" / "runs")
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["status"] == "failed"
    assert "CacheError" in row["error"] and "checksum mismatch" in row["error"]
    assert (row["loader"], row["format"], row["dataset"]) == ("numpy_mmap", "npy", ds.name)
    assert pd.notna(row["started_at"]) and pd.notna(row["finished_at"])


def test_exit_codes_in_a_real_process(dataset: Dataset, tmp_path: Path) -> None:
    """The installed entry point: exit 2 and exit 1, one line each, no traceback."""
    ds = corrupt_store(dataset, tmp_path / "store")
    script = Path(sys.executable).parent / "node-agent"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c",
                                                 "from node.cli import main; main()"]
    usage = subprocess.Popen([*cmd, *run_args(ds, tmp_path / "a", "nope", "npy")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed = subprocess.Popen([*cmd, *run_args(ds, tmp_path / "b", "numpy_mmap", "npy")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    (u_out, u_err), (f_out, f_err) = usage.communicate(timeout=300), failed.communicate(
        timeout=300)
    assert usage.returncode == 2, u_err
    assert "unknown loader" in one_error_line(u_err) and "Traceback" not in u_out
    assert failed.returncode == 1, f_err
    assert "checksum mismatch" in one_error_line(f_err) and "Traceback" not in f_out
    assert "failed" in f_out  # the run summary says so
    assert pd.read_parquet(tmp_path / "b" / "results" / "runs")["status"].tolist() == ["failed"]


def exact_error(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    return one_error_line(result.stderr).removeprefix("node-agent: error: ")


def test_format_all_says_run_takes_one_and_lists_the_datasets_formats(
        dataset: Dataset, tmp_path: Path) -> None:
    has = ", ".join(dataset.manifest.format_ids)
    assert exact_error(run_args(dataset, tmp_path, "file", "all")) == (
        "--format takes one format id, not 'all' (`node-agent matrix --formats all` runs "
        f"every one); dataset {dataset.name!r} has: {has}")


def test_missing_dataset_lists_the_datasets_the_store_holds(dataset: Dataset,
                                                            tmp_path: Path) -> None:
    args = run_args(dataset, tmp_path, "numpy_mmap", "npy")
    args[args.index("--dataset") + 1] = "nothere"
    assert exact_error(args) == (f"dataset 'nothere' not found in {dataset.store} "
                                 f"(no manifest.json); it holds: {dataset.name}")
    empty = tmp_path / "empty"
    empty.mkdir()
    args[args.index("--store") + 1] = str(empty)
    assert exact_error(args) == (f"dataset 'nothere' not found in {empty} "
                                 "(no manifest.json); it holds no converted dataset")


def test_a_store_that_does_not_exist_says_so(dataset: Dataset, tmp_path: Path) -> None:
    args = run_args(dataset, tmp_path, "numpy_mmap", "npy")
    args[args.index("--store") + 1] = str(tmp_path / "nostore")
    assert exact_error(args) == (f"store {tmp_path / 'nostore'} does not exist; --store "
                                 "takes the --dst folder that prep/convert.py wrote")


def test_matrix_with_nothing_to_run_exits_2_naming_why(dataset: Dataset,
                                                       tmp_path: Path) -> None:
    args = ["matrix", "--store", dataset.store, "--dataset", dataset.name, "--cache",
            str(tmp_path / "cache"), "--results", str(tmp_path / "results"),
            "--loaders", "hdf5", "--formats", "npy"]
    assert exact_error(args) == "matrix: nothing to run here; hdf5: none of the formats npy fits it"
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("command", ["run", "bench", "matrix"])
def test_every_run_option_lands_in_the_config(command: str) -> None:
    """Each option of run, bench and matrix reaches the frozen RunConfig under its own
    name (matrix's own options aside), and the config column leaves the storage options
    out: a new option with no config field would otherwise be dropped silently."""
    import dataclasses

    from node.config import MatrixConfig, RunConfig

    params = {p.name: f"value-of-{p.name}" for p in cli.commands[command].params
              if p.name != "help"}
    if command == "matrix":
        config = MatrixConfig.from_cli(**params).template
        for own in ("loader_list", "format_list", "repeat", "bench_mode"):
            params.pop(own)
    else:
        config = RunConfig.from_cli(mode="train", **params)
    assert {k: v for k, v in config.flat().items() if k in params} == params
    groups = [getattr(config, f.name) for f in dataclasses.fields(config)]
    assert all(len(dataclasses.fields(g)) <= 10 for g in groups)  # small, grouped
    assert "storage_options" not in config.public()
    assert set(config.public()) == set(config.flat()) - {"storage_options"}
