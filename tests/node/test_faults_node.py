"""Faults around ``node-agent`` itself (issue 15): eight runs at once sharing one cache
and one results store, the results store going away before a run writes its rows, and
a bad value for every flag of every command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from node.cli import cli
from node.report.tables import load_results
from shared.storage import Store

from conftest import Dataset, convert
from test_cache import REPO, agent, assert_cache_valid

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


# --------------------------------------------------------------------------- results outage

# node-agent whose Nth results write (FL_HOLD_AT; 1: the epochs rows, 2: the run row)
# touches FL_READY and waits for FL_GO, so the test can stop the store right before it.
HOLD_WRITE = """
import os, sys, time
import node.session as session
real, calls = session.write_rows, []
def held(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ["FL_HOLD_AT"]):
        open(os.environ["FL_READY"], "w").close()
        while not os.path.exists(os.environ["FL_GO"]):
            time.sleep(0.01)
    return real(*args, **kwargs)
session.write_rows = held
from node.cli import main
sys.argv = ["node-agent", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("hold_at", [1, 2], ids=["before-epochs", "before-run-row"])
def test_results_store_outage_during_run(npy_dataset: Dataset, start_s3: Callable[[], Any],
                                         tmp_path: Path, hold_at: int) -> None:
    """The S3 results store stops right before a results write: exit 1, one line naming
    the results store, no traceback, no secret, and no rows (nor temporaries) left in it:
    never epochs without their run."""
    server = start_s3()
    results = server.bucket("res") + "/results"
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE, *run_args(npy_dataset, tmp_path / "cache", results)],
        cwd=REPO, env={**server.env(), "FL_HOLD_AT": str(hold_at), "FL_READY": str(ready),
                       "FL_GO": str(go)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for([ready], [proc])
        server.stop()  # the fault: the results store is gone when the rows are written
        go.touch()
        out, err = proc.communicate(timeout=240)
    finally:
        stop([proc])
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("node-agent: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err  # after progress
    assert "s3://res/results" in errors[0], errors[0]
    assert server.secret not in out + err
    left = [p for p in (server.root / "res").rglob("*") if p.is_file()]
    if hold_at == 1:
        assert not left, f"results store holds {left}"
    # The run row commits a run: the epochs written before the outage are whole files,
    # and readers (the report) find no run and no epoch of it.
    assert all(p.suffix == ".parquet" and not p.name.startswith(".") for p in left), left
    for path in left:
        pq.read_table(path)
    found = load_results(Store.open(str(server.root / "res" / "results")))
    assert found.runs.empty and found.epochs.empty, found.epochs


# --------------------------------------------------------------------------- bad flags

COMMANDS = ("run", "bench", "cache", "matrix", "report")
# Text options have no type to get wrong: each gets a bad value here (a new one fails
# test_every_text_flag_has_a_bad_value until it is given one, or a reason in PATHS).
BAD_TEXT = {
    "--store": "{tmp}/no-such-store",
    "--dataset": "no-such-dataset",
    "--storage-options": "{{not json",
    "--results": "nope://results",
    "--format": "no-such-format",
    "--loader": "no-such-loader",
    "--loaders": "no-such-loader",
    "--formats": "no-such-format",
}
# Any text is a valid path: an unusable folder is an I/O failure met on writing (exit 1).
PATHS = {"--cache", "--out"}


def options(command: str) -> list[click.Option]:
    return [p for p in cli.commands[command].params
            if isinstance(p, click.Option) and p.name != "help"]


def bad_value(opt: click.Option, tmp: Path) -> str:
    """A value ``opt`` must refuse: wrong type, unknown choice, or from BAD_TEXT."""
    name = opt.opts[0]
    if opt.is_flag:
        return f"{name}=maybe"  # a flag takes no value
    if isinstance(opt.type, click.Choice):
        return f"{name}=no-such-choice"
    if isinstance(opt.type, (click.types.IntParamType, click.types.FloatParamType)):
        return f"{name}=many"
    return f"{name}={BAD_TEXT[name].format(tmp=tmp)}"


def good_args(command: str, ds: Dataset, tmp: Path) -> list[str]:
    """Valid arguments for ``command`` (the bad value comes last and wins)."""
    if command == "report":
        return ["report", "--results", str(tmp / "results"), "--out", str(tmp / "report")]
    if command == "cache":
        return ["cache", "--store", ds.store, "--dataset", ds.name, "--format", "npy",
                "--cache", str(tmp / "cache")]
    args = run_args(ds, tmp / "cache", str(tmp / "results"), command)
    if command == "matrix":
        args = [a for a in args if a not in ("--format", "npy", "--loader", "numpy_mmap")]
    return args


CASES = [(c, o.opts[0]) for c in COMMANDS for o in options(c) if o.opts[0] not in PATHS]


def test_every_text_flag_has_a_bad_value() -> None:
    texts = {o.opts[0] for c in COMMANDS for o in options(c) if not o.is_flag
             and isinstance(o.type, click.types.StringParamType)}
    assert texts <= set(BAD_TEXT) | PATHS, texts - set(BAD_TEXT) - PATHS


@pytest.mark.parametrize("command,flag", CASES, ids=[f"{c}{f}" for c, f in CASES])
def test_bad_flag_value_is_one_line_and_writes_nothing(npy_dataset: Dataset, tmp_path: Path,
                                                       command: str, flag: str) -> None:
    opt = next(o for o in options(command) if o.opts[0] == flag)
    bad = bad_value(opt, tmp_path)
    args = [*good_args(command, npy_dataset, tmp_path), bad]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    value = bad.split("=", 1)[1]
    assert flag in lines[0] or value in lines[0], lines[0]  # the flag, or what it was given
    written = [p.name for p in tmp_path.iterdir()]
    assert not written, written  # no cache, no results, no report
