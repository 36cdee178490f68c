"""The node's shard cache (DESIGN sections 6 and 9): deterministic rank assignment,
skip-if-valid, corruption detected and fetched again, a killed fill resumes, two agents
share one cache directory, a full disk fails cleanly, and S3 stores with credentials
from the AWS environment only."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from node.cache import CacheError, ShardCache, ShardRange, assign, val_split
from node.cli import cli
from shared.manifest import INDEX_FILE, FormatEntry, Manifest, ShardEntry, SplitEntry
from shared.shards import read_index
from shared.storage import Store, checksum_file

from conftest import Dataset, assert_secret_nowhere, copy_store

REPO = Path(__file__).resolve().parents[2]

# Runs node-agent's CLI in a child process. Test hooks, from the environment:
# FL_SLOW_S sleeps before each file copy (so a fill can be killed midway);
# FL_READY / FL_GO: touch READY, then wait for GO (so two agents start filling together).
AGENT = """
import os, sys, time
slow = float(os.environ.get("FL_SLOW_S") or 0)
if slow:
    import shared.fetch as c
    copy = c.copy_hashing
    def slowed(src, dst):
        time.sleep(slow)
        return copy(src, dst)
    c.copy_hashing = slowed
from node.cli import main
import node.session  # imports torch: done before the start signal
if os.environ.get("FL_READY"):
    open(os.environ["FL_READY"], "w").close()
    while not os.path.exists(os.environ["FL_GO"]):
        time.sleep(0.01)
sys.argv = ["node-agent", *sys.argv[1:]]
main()
"""


# --------------------------------------------------------------------------- helpers


def agent(args: list[str], env: dict[str, str] | None = None, **env_extra: str) -> subprocess.Popen:
    """Start ``node-agent ARGS`` in a child process (stdout and stderr captured)."""
    return subprocess.Popen([sys.executable, "-c", AGENT, *args], cwd=REPO,
                            env={**(env or os.environ), **env_extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cache_args(ds: Dataset, fmt: str, cache: Path, *extra: str) -> list[str]:
    return ["cache", "--store", ds.store, "--dataset", ds.name, "--format", fmt,
            "--cache", str(cache), *extra]


def expected_files(manifest: Manifest, fmt: str, split: str,
                   store: Store) -> dict[str, str]:
    """Every file of a format's split, relative to the dataset root, with its checksum."""
    out = {}
    for shard in manifest.format(fmt).split_shards(split):
        out[f"{shard.path}/{INDEX_FILE}"] = shard.index_checksum
        out.update({f"{shard.path}/{f.path}": f.checksum for f in shard.files})
        index = read_index(store.read_bytes(f"{manifest.name}/{shard.path}/{INDEX_FILE}"))
        if "file" in index.column_names:
            out.update({f"{shard.path}/{name}": checksum for name, checksum in zip(
                index.column("file").to_pylist(), index.column("checksum").to_pylist())})
    return out


def assert_cache_valid(cache: Path, ds: Dataset, fmt: str,
                       splits: tuple[str, ...] = ("train", "test")) -> None:
    """Every file of ``splits`` is cached and matches its checksum; no temporary left."""
    root = cache / ds.name
    store = ds.store_obj()
    for split in splits:
        for rel, checksum in expected_files(ds.manifest, fmt, split, store).items():
            path = root / rel
            assert path.is_file(), f"{rel} not cached"
            assert checksum_file(path) == checksum, f"{rel} fails its checksum"
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, f"temporary files left: {leftovers[:5]}"


def assert_no_bad_file(cache: Path, ds: Dataset, fmt: str) -> None:
    """Whatever is in the cache passes its checksum (a partial cache is fine)."""
    root = cache / ds.name
    store = ds.store_obj()
    known = {}
    for split in ds.manifest.split_names:
        known.update(expected_files(ds.manifest, fmt, split, store))
    for path in root.rglob("*"):
        if not path.is_file() or path.name.endswith(".lock"):
            continue
        rel = path.relative_to(root).as_posix()
        assert ".tmp-" not in path.name, f"temporary file left: {rel}"
        assert rel in known, f"unexpected file {rel}"
        assert checksum_file(path) == known[rel], f"{rel} fails its checksum"


def fill(ds: Dataset, fmt: str, cache: Path, split: str = "train", **kwargs: int):  # noqa: ANN201
    cache_obj = ShardCache(ds.store_obj(), ds.manifest, cache)
    return cache_obj.fetch(assign(ds.manifest, fmt, split, **kwargs))


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def invoke(args: list[str], env: dict[str, str] | None = None):  # noqa: ANN201
    return CliRunner().invoke(cli, args, env=env)


# --------------------------------------------------------------------------- assignment


def _manifest_with(sizes: tuple[int, ...]) -> Manifest:
    shards = tuple(ShardEntry(split="train", index=i, samples=n, bytes=0,
                              path=f"npy/train/shard-{i:05d}", index_checksum="x")
                   for i, n in enumerate(sizes))
    return Manifest(name="m", source_kind="cifar10", source_url="x", height=32, width=32,
                    channels=3, dtype="uint8", resize="native", class_names=("a", "b"),
                    splits=(SplitEntry("train", sum(sizes)),), seed=0, shard_samples=max(sizes),
                    formats=(FormatEntry(id="npy", kind="array", params={}, shards=shards,
                                         total_bytes=0, conversion_time_s=0.0),))


def _global(manifest: Manifest, ranges: list[ShardRange]) -> list[int]:
    """The global sample numbers a rank's ranges cover, in order."""
    offsets, offset = {}, 0
    for shard in sorted(manifest.format("npy").split_shards("train"), key=lambda s: s.index):
        offsets[shard.index] = offset
        offset += shard.samples
    return [offsets[r.entry.index] + i for r in ranges for i in range(r.start, r.stop)]


@pytest.mark.parametrize("sizes", [(200, 200, 100), (7, 5), (3,), (10, 1, 10)])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 7])
def test_assignment_equal_disjoint_deterministic(sizes: tuple[int, ...], world: int) -> None:
    manifest = _manifest_with(sizes)
    n = sum(sizes)
    m = n // world
    covered: list[int] = []
    for rank in range(world):
        ranges = assign(manifest, "npy", "train", rank, world)
        assert ranges == assign(manifest, "npy", "train", rank, world)  # deterministic
        assert sum(r.stop - r.start for r in ranges) == m  # every rank: n // W samples
        assert all(0 <= r.start < r.stop <= r.entry.samples for r in ranges)
        samples = _global(manifest, ranges)
        assert samples == list(range(rank * m, (rank + 1) * m))  # [r*m, (r+1)*m)
        covered += samples
    assert len(covered) == len(set(covered)) == world * m  # disjoint; remainder left out


def test_assignment_more_ranks_than_shards_and_mid_shard() -> None:
    manifest = _manifest_with((7, 5))  # 2 shards, 5 ranks: m = 2
    r3 = assign(manifest, "npy", "train", 3, 5)  # samples 6, 7: end of shard 0, start of 1
    assert [(r.entry.index, r.start, r.stop) for r in r3] == [(0, 6, 7), (1, 0, 1)]
    r0 = assign(manifest, "npy", "train", 0, 5)
    assert [(r.entry.index, r.start, r.stop) for r in r0] == [(0, 0, 2)]
    with pytest.raises(ValueError):
        assign(manifest, "npy", "train", 5, 5)


def test_assignment_of_the_converted_dataset(dataset: Dataset) -> None:
    """500 train samples in shards of 200, 200, 100; 3 ranks of 166, boundaries inside."""
    got = [[(r.entry.index, r.start, r.stop) for r in assign(dataset.manifest, "npy", "train",
                                                               rank, 3)] for rank in range(3)]
    assert got == [[(0, 0, 166)], [(0, 166, 200), (1, 0, 132)], [(1, 132, 200), (2, 0, 98)]]
    assert val_split(dataset.manifest) == "test"


# --------------------------------------------------------------------------- fill


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_fill_then_refill_fetches_nothing(dataset: Dataset, tmp_path: Path, fmt: str) -> None:
    cache = tmp_path / "cache"
    slices, first = fill(dataset, fmt, cache)
    assert first.files_fetched == first.files_total > 0
    assert first.bytes_fetched == first.bytes_total > 0
    assert sum(len(s) for s in slices) == 500
    assert [len(s.labels) for s in slices] == [200, 200, 100]
    _, second = fill(dataset, fmt, cache)
    assert (second.files_fetched, second.files_refetched, second.bytes_fetched) == (0, 0, 0)
    assert (second.files_total, second.bytes_total) == (first.files_total, first.bytes_total)
    assert_cache_valid(cache, dataset, fmt, ("train",))


def test_corrupted_cached_files_are_fetched_again(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fill(dataset, "png", cache)
    fill(dataset, "npy", cache)
    shard = cache / dataset.name / "png" / "train" / "shard-00000"
    pngs = sorted(shard.glob("*.png"))
    flip_byte(pngs[3], len(pngs[3].read_bytes()) // 2)  # same size, other bytes
    pngs[7].write_bytes(pngs[7].read_bytes()[:20])  # truncated
    flip_byte(cache / dataset.name / "npy" / "train" / "shard-00001" / "images.npy", 5000)
    (shard / INDEX_FILE).write_bytes(b"not parquet")

    _, png_stats = fill(dataset, "png", cache)
    assert (png_stats.files_refetched, png_stats.files_fetched) == (3, 3)
    _, npy_stats = fill(dataset, "npy", cache)
    assert (npy_stats.files_refetched, npy_stats.files_fetched) == (1, 1)
    store_copy = Path(dataset.store) / dataset.name / "npy" / "train" / "shard-00001"
    assert npy_stats.bytes_fetched == (store_copy / "images.npy").stat().st_size
    assert_cache_valid(cache, dataset, "png", ("train",))
    assert_cache_valid(cache, dataset, "npy", ("train",))


def test_store_copy_that_never_matches_is_an_error(dataset: Dataset, tmp_path: Path) -> None:
    ds = copy_store(dataset, tmp_path / "store", ("npy",))
    flip_byte(Path(ds.store) / ds.name / "npy" / "train" / "shard-00002" / "images.npy", 200)
    with pytest.raises(CacheError, match="checksum mismatch"):
        fill(ds, "npy", tmp_path / "cache")
    assert_no_bad_file(tmp_path / "cache", ds, "npy")


def test_rank_caches_only_its_shards(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = invoke(cache_args(dataset, "npy", cache, "--rank", "2", "--world-size", "3"))
    assert result.exit_code == 0, result.output
    assert "166 train samples" in result.output
    shards = sorted(p.relative_to(cache / dataset.name).as_posix()
                    for p in (cache / dataset.name).glob("npy/*/shard-*") if p.is_dir())
    assert shards == ["npy/train/shard-00001", "npy/train/shard-00002"]  # no val on rank 2


# --------------------------------------------------------------------------- faults


def test_killed_fill_resumes(dataset: Dataset, tmp_path: Path) -> None:
    """SIGKILL a slowed `node-agent cache` midway; leftovers of a killed fill are added
    (half the files gone, stray temporaries); the re-run completes a valid cache."""
    cache = tmp_path / "cache"
    shard = cache / dataset.name / "png" / "train" / "shard-00000"
    proc = agent(cache_args(dataset, "png", cache), FL_SLOW_S="0.05")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if shard.is_dir() and sum(1 for _ in shard.glob("*.png")) >= 40:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"fill ended before the kill: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cached = sorted(shard.glob("*.png"))
    assert 40 <= len(cached) < 200, len(cached)
    assert_no_bad_file(cache, dataset, "png")  # killed midway, nothing half-written

    for path in cached[::2]:
        path.unlink()
    (shard / f".{cached[1].name}.tmp-0000deadbeef").write_bytes(b"half a fi")
    (shard / ".index.parquet.tmp-00000badf00d").write_bytes(b"")
    result = invoke(cache_args(dataset, "png", cache))
    assert result.exit_code == 0, result.output
    assert_cache_valid(cache, dataset, "png")


def test_two_agents_share_one_cache(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [agent(cache_args(dataset, "png", cache), FL_SLOW_S="0.002",
                   FL_READY=str(tmp_path / f"ready-{i}"), FL_GO=str(tmp_path / "go"))
             for i in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, "agents did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    fetched = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "604 files" in out, out  # 500 + 100 samples and 4 shard indexes
        fetched.append(int(re.search(r"fetched (\d+) files", out).group(1)))
    assert sum(fetched) == 604, fetched  # the shard locks: no file fetched twice
    assert_cache_valid(cache, dataset, "png")


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_full_disk_is_a_clear_error(dataset: Dataset, small_fs: Callable[[str], Any],
                                    fmt: str) -> None:
    """A real 200 KiB tmpfs fills: one line, exit 1, and what is cached stays valid."""
    disk = small_fs("200k")
    result = CliRunner().invoke(cli, cache_args(dataset, fmt, disk.path))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("node-agent: error: ")
    assert "disk full" in lines[0] and "Traceback" not in result.output
    assert_no_bad_file(disk.path, dataset, fmt)  # no temporary, no half file, checksums pass
    disk.resize("20m")  # room again: the same command completes the cache
    again = CliRunner().invoke(cli, cache_args(dataset, fmt, disk.path))
    assert again.exit_code == 0, again.output
    assert_cache_valid(disk.path, dataset, fmt)


def test_cache_from_s3_with_environment_credentials(s3_dataset: Dataset, s3_server,  # noqa: ANN001
                                                    tmp_path: Path) -> None:
    """Credentials come from the AWS environment only: no --storage-options."""
    cache = tmp_path / "cache"
    env = s3_server.env()
    outputs = []
    for fmt in ("png", "npy"):
        result = invoke(cache_args(s3_dataset, fmt, cache), env=env)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        assert_cache_valid(cache, s3_dataset, fmt)
    again = invoke(cache_args(s3_dataset, "png", cache), env=env)
    assert again.exit_code == 0 and "fetched 0 files" in again.output, again.output
    assert_secret_nowhere(s3_server.secret, cache, s3_server.root,
                          texts=(*outputs, again.output, s3_dataset.output))
