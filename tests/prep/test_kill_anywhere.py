"""Kill anywhere: real SIGKILLs of ``prep/convert.py`` at named points of every phase.

Each case sets ``FORMATLAB_KILL_AT=<point>:<N>`` (shared/killpoint.py), so the process
SIGKILLs itself at the Nth arrival at that point: planning, a shard encoded in staging,
a shard's data in place before its index, halfway through an index, the manifest or
the conversions file. After each kill: no index without its data, no manifest unless
the kill came after the commit; the re-run exits 0 with every sample exactly once in
every format, staging removed, no temporary file left, one conversions file per job
that converted. ``make test`` runs a bounded set; the ``slow`` variant (run with
``FORMATLAB_KILL_ALL=1``) many more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from testdata import datagen
from prep.convert import PENDING_DIR
from shared.manifest import MANIFEST_FILE, Manifest
from shared.shards import STAGING_DIR
from shared.storage import Store
from test_convert import (CONVERT, REPO, assert_exactly_once, assert_no_index_without_data,
                          cifar_args, cifar_expected)

FORMATS = "png,npy,hdf5,zarr"
SHARDS = 5  # train 200 -> 4 shards of 64 (the last 8), test 40 -> 1
# (point, N): one or more in every phase.
BOUNDED = [("plan", 1), ("shard-stage", 3), ("shard-data", 6), ("index-write", 9),
           ("manifest-write", 1), ("results-write", 1)]
ARRIVALS = {"plan": 1, "shard-stage": SHARDS * 4, "shard-data": SHARDS * 4,
            "index-write": SHARDS * 4, "manifest-write": 1, "results-write": 1, "write": 5}
MANY = [(p, n) for p, total in ARRIVALS.items() for n in range(1, total + 1)]
AFTER_COMMIT = {"results-write"}


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> datagen.GeneratedCifar:
    return datagen.make_cifar10_python(tmp_path_factory.mktemp("kill") / "c.tar.gz",
                                       train_per_batch=40, test=40, seed=9)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def kill_and_resume(gen: datagen.GeneratedCifar, tmp_path: Path, point: str, nth: int,
                    address: str = "inline", env: dict[str, str] | None = None,
                    killed_exit: int = -signal.SIGKILL) -> None:
    """Kill at ``point``:``nth``, check what is left, re-run, check the dataset.

    ``killed_exit``: the killed run's exit code (0 when a Ray worker was killed and
    Ray's retry finished the job).
    """
    store, results = tmp_path / "store", tmp_path / "results"
    argv = [sys.executable, CONVERT, *cifar_args(gen.path, store, FORMATS, "--results",
                                                 str(results), "--address", address)]
    base = dict(env or os.environ)
    killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**base, "FORMATLAB_KILL_AT": f"{point}:{nth}",
                                 "FORMATLAB_KILL_STATE": str(tmp_path / "kill-state")})
    dataset = store / "cifar10"
    arrivals = int((tmp_path / "kill-state" / f"{point}.count").read_bytes())
    assert arrivals >= nth, f"{point}:{nth} never reached ({arrivals} arrivals)"
    assert killed.returncode == killed_exit, (point, nth, killed.stderr[-2000:])
    if killed_exit == -signal.SIGKILL:
        assert (dataset / MANIFEST_FILE).exists() == (point in AFTER_COMMIT)
    if dataset.exists():
        assert_no_index_without_data(dataset)
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=base)
    assert done.returncode == 0, (point, nth, done.stderr[-2000:])
    m = Manifest.load(Store.open(str(store)), "cifar10")
    assert_exactly_once(dataset, m, cifar_expected(gen))
    assert assert_no_index_without_data(dataset) == 4 * SHARDS
    assert not (dataset / STAGING_DIR).exists()
    assert temp_files(dataset) == []
    # Exactly one job's rows reach the results store: the killed job never finished its
    # results write, so either the re-run converted the rest, or (killed after its
    # manifest) the re-run delivered the rows the killed job held; none held back.
    files = sorted((results / "conversions").glob("*.parquet"))
    assert len(files) == 1, (point, nth, files)
    rows = pd.read_parquet(files[0])
    assert sorted(set(zip(rows["format"], rows["split"]))) == sorted(
        (f, s) for f in FORMATS.split(",") for s in ("test", "train"))
    assert list((dataset / PENDING_DIR).glob("*")) == [] if (dataset / PENDING_DIR).exists() else True


@pytest.mark.parametrize(("point", "nth"), BOUNDED, ids=[f"{p}-{n}" for p, n in BOUNDED])
def test_driver_killed_at_point_resumes_exactly(point: str, nth: int, tmp_path: Path,
                                                gen: datagen.GeneratedCifar) -> None:
    kill_and_resume(gen, tmp_path, point, nth)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FORMATLAB_KILL_ALL"),
                    reason="every kill point: set FORMATLAB_KILL_ALL=1 (~10 min)")
@pytest.mark.parametrize(("point", "nth"), MANY, ids=[f"{p}-{n}" for p, n in MANY])
def test_driver_killed_anywhere_resumes_exactly(point: str, nth: int, tmp_path: Path,
                                                gen: datagen.GeneratedCifar) -> None:
    kill_and_resume(gen, tmp_path, point, nth)
