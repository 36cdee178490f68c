"""The ``packed`` loader beyond the shared contract: cached and streamed runs end to end
(loopback S3), the streamed epoch's block order, read-ahead and its ranged-GET fallback,
the decoders and the DataLoader-process variant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from node.cache import ShardCache, assign, remote_slices
from node.cli import cli
from node.loaders import LoaderConfig
from node.loaders.packed import PackedLoader, PackedThreadLoader, _compiled_jpeg, turbojpeg_path
from shared.formats import get_format
from shared.manifest import Manifest
from shared.storage import Store

from conftest import DATASET, Dataset, convert

FORMAT = "wds-jpeg-q95"
pytestmark = [
    pytest.mark.filterwarnings(  # torchvision.io's deprecation notice, once per decode
        "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def packed_s3(cifar_archive: Path, s3_server) -> Dataset:  # noqa: ANN001 - root fixture
    """The CIFAR-10 archive converted to packed JPEG and PNG on the loopback S3 server."""
    bucket = s3_server.bucket("packed-data")
    options = json.dumps(s3_server.storage_options)
    code, output = convert(cifar_archive, f"{bucket}/store", (FORMAT, "wds-png"),
                           "--storage-options", options)
    assert code == 0, output
    manifest = Manifest.load(Store.open(f"{bucket}/store", s3_server.storage_options), DATASET)
    return Dataset(f"{bucket}/store", DATASET, manifest, output, options)


def run_agent(ds: Dataset, cache: Path, results: Path, *extra: str) -> pd.Series:
    args = ["run", "--store", ds.store, "--dataset", ds.name, "--cache", str(cache),
            "--results", str(results), "--batch-size", "64", "--workers", "2",
            "--storage-options", ds.storage_options, "--loader", "packed", "--epochs", "2",
            *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    runs = pd.read_parquet(results / "runs")
    assert len(runs) == 1
    return runs.iloc[0]


def test_run_cached_and_streamed(packed_s3: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cached = run_agent(packed_s3, cache, tmp_path / "r1", "--format", FORMAT)
    streamed = run_agent(packed_s3, cache / "unused", tmp_path / "r2", "--format", FORMAT,
                         "--no-cache")
    for row in (cached, streamed):
        assert row["status"] == "ok" and row["samples_per_epoch"] == 500
        assert row["val_accuracy"] > 0.3  # 10 classes: chance is 0.1
        assert row["cache_time_s"] >= 0
    # JPEG members decode in the compiled loop, which drops the GIL: threads, cached or
    # streamed. Without libturbojpeg the cached copy falls back to DataLoader workers.
    want = (2, 0) if _compiled_jpeg(get_format(FORMAT)) else (0, 2)
    assert (cached["loader_threads"], cached["loader_processes"]) == want
    assert (streamed["loader_threads"], streamed["loader_processes"]) == (2, 0)
    assert cached["cache_bytes"] > 0 and streamed["cache_bytes"] == 0
    assert "copied from a memory map of the cached tar" in cached["io_path_evidence"]
    assert "ranged GETs from the store URL" in streamed["io_path_evidence"]
    assert not (cache / "unused").exists() or not any((cache / "unused").rglob("*.tar"))
    # Both report the first (streamed or cached) epoch's time beside the cache time.
    epochs = pd.read_parquet(tmp_path / "r2" / "epochs")
    assert epochs.sort_values("epoch")["epoch_time_s"].iloc[0] > 0
    # Member bytes per epoch are the same either way.
    assert cached["bytes_read"] == streamed["bytes_read"]


def test_matrix_runs_the_packed_formats_and_the_installed_peers(packed_s3: Dataset,
                                                                tmp_path: Path) -> None:
    """``node-agent matrix`` pairs every packed format with every loader that reads packed
    shards and runs here (``packed``; ``webdataset`` where the peers extra is installed;
    ``dali_packed`` skipped with its reason on a CPU machine), and the report ranks them."""
    import importlib.util

    results = tmp_path / "results"
    result = CliRunner().invoke(cli, [
        "matrix", "--store", packed_s3.store, "--dataset", packed_s3.name,
        "--cache", str(tmp_path / "cache"), "--results", str(results),
        "--storage-options", packed_s3.storage_options, "--formats", "wds-jpeg-q95,wds-png",
        "--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--workers", "1",
        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    loaders = ["packed"] + (["webdataset"] if importlib.util.find_spec("webdataset") else [])
    runs = pd.read_parquet(results / "runs")
    assert sorted(zip(runs["loader"], runs["format"])) == sorted(
        (name, fmt) for name in loaders for fmt in ("wds-jpeg-q95", "wds-png"))
    assert (runs["status"] == "ok").all()
    if not torch.cuda.is_available():
        assert "skip dali_packed:" in result.output
    report = CliRunner().invoke(cli, ["report", "--results", str(results),
                                      "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    for name in loaders:
        assert name in report.output


def test_no_cache_help_names_every_streaming_loader() -> None:
    from node.loaders.registry import LOADER_SPECS

    text = " ".join(CliRunner().invoke(cli, ["run", "--help"]).output.split())
    streaming = [n for n in LOADER_SPECS if LOADER_SPECS.get(n).streams]
    assert {"zarr", "packed"} <= set(streaming)
    assert f"Read straight from the store, no cache (loaders: {', '.join(streaming)})" in text


def configs(ds: Dataset, tmp_path: Path, format_id: str, workers: int = 2
            ) -> tuple[LoaderConfig, LoaderConfig]:
    """Loader configs over the train split: cached copy, and streamed from the store."""
    store = ds.store_obj()
    ranges = assign(ds.manifest, format_id, "train")
    cached, _ = ShardCache(store, ds.manifest, tmp_path / "cache").fetch(ranges)
    remote = remote_slices(store, ds.manifest, ranges)

    def config(slices: list) -> LoaderConfig:
        return LoaderConfig(fmt=get_format(format_id), shards=tuple(slices), batch_size=48,
                            workers=workers, seed=3, device=torch.device("cpu"),
                            image_shape=(32, 32, 3),
                            storage_options=json.loads(ds.storage_options))
    return config(cached), config(remote)


def epoch_by_position(loader: PackedLoader, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    batches = list(loader.epoch(epoch))
    positions = torch.cat([b.positions for b in batches]).numpy()
    images = torch.cat([b.images for b in batches]).numpy()
    assert np.array_equal(np.sort(positions), np.arange(len(positions)))
    return images[np.argsort(positions)], np.array([b.bytes_read for b in batches])


@pytest.mark.parametrize("buffer_bytes", [None, 1],
                         ids=["whole-shards", "ranged-gets"])
def test_streamed_epoch_equals_the_cached_one(packed_s3: Dataset, tmp_path: Path,
                                              buffer_bytes: int | None) -> None:
    cached_cfg, remote_cfg = configs(packed_s3, tmp_path, FORMAT)
    cached, streamed = PackedLoader(cached_cfg), PackedLoader(remote_cfg)
    try:
        want, want_bytes = epoch_by_position(cached)
        list(streamed.epoch(0))  # builds the reader
        source = streamed._reader.source
        assert source.remote
        if buffer_bytes is not None:
            source.buffer_bytes = buffer_bytes  # no block fits: every member by a ranged GET
        source.fetched_bytes = 0
        got, got_bytes = epoch_by_position(streamed, 1)
        tar_bytes = sum(f.bytes for r in assign(packed_s3.manifest, FORMAT, "train")
                        for f in r.entry.files)
        if buffer_bytes is None:  # the blocks (here the whole rank: one block), once each
            assert 0.9 * tar_bytes < source.fetched_bytes <= tar_bytes
        else:  # just the members
            assert source.fetched_bytes == got_bytes.sum()
        want1, _ = epoch_by_position(cached, 1)
        np.testing.assert_array_equal(got, want1)
        np.testing.assert_array_equal(want, want1)  # same pixels whatever the order
        assert got_bytes.sum() == want_bytes.sum()
    finally:
        cached.close()
        streamed.close()


def test_a_streamed_epoch_runs_block_by_block_within_its_read_ahead(
        packed_s3: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed: the epoch is the block schedule (shards in a random order, blocks of at
    least a batch, each shuffled); blocks are fetched in that order, each once, never
    more held than the read-ahead, and the first batch comes before the rank has arrived."""
    from node.loaders import packed_stream
    from node.loaders.window import window_schedule

    monkeypatch.setattr(packed_stream, "BLOCK_BYTES", 1)  # blocks of one batch (48 samples)
    cached_cfg, remote_cfg = configs(packed_s3, tmp_path, FORMAT)
    cached, streamed = PackedLoader(cached_cfg), PackedLoader(remote_cfg)
    try:
        want, _ = epoch_by_position(cached)
        schedule = streamed.stream_schedule(0)
        lengths = [len(s) for s in remote_cfg.shards]
        again = window_schedule(lengths, [s.start for s in remote_cfg.shards], half=48,
                                batch_size=48, seed=3, epoch=0)
        assert schedule.half == 48 and len(schedule.blocks) == -(-sum(lengths) // 48)
        for a, b in zip(schedule.batches, again.batches, strict=True):
            np.testing.assert_array_equal(a, b)
        source = streamed._ensure_reader().source
        plan = packed_stream._BlockPlan.of(source.shards, streamed._reader.shard_map, schedule)
        source.buffer_bytes = budget = int(3 * plan.block_bytes.max())
        batches = streamed.epoch(0)
        first = next(batches)
        assert source.fetched_bytes <= budget < plan.block_bytes.sum()
        rest = list(batches)
        positions = [first.positions.numpy(), *(b.positions.numpy() for b in rest)]
        for got, expected in zip(positions, schedule.batches, strict=True):
            np.testing.assert_array_equal(got, np.sort(expected))  # the block order
        images = torch.cat([first.images, *(b.images for b in rest)]).numpy()
        np.testing.assert_array_equal(images[np.argsort(np.concatenate(positions))], want)
        assert source.fetched_bytes == plan.block_bytes.sum()  # every block once
        assert 0 < source.peak_held_bytes <= budget
        assert "block-shuffled epochs (blocks of 48 samples" in streamed.io_evidence
        assert streamed.stream_schedule(1).batches[0].tolist() != schedule.batches[0].tolist()
    finally:
        cached.close()
        streamed.close()


def test_thread_variant_reads_the_same(packed_s3: Dataset, tmp_path: Path) -> None:
    cached_cfg, _ = configs(packed_s3, tmp_path, "wds-png")
    threads, processes = PackedThreadLoader(cached_cfg), PackedLoader(cached_cfg)
    try:
        a, _ = epoch_by_position(threads)
        b, _ = epoch_by_position(processes)
        np.testing.assert_array_equal(a, b)
        assert "DataLoader workers" in processes.io_evidence and "threads" in threads.io_evidence
        assert processes.resources() == {"threads": 0, "processes": 2}
        assert threads.resources() == {"threads": 2, "processes": 0}
    finally:
        threads.close()
        processes.close()


@pytest.mark.skipif(turbojpeg_path() is None, reason="no libturbojpeg on this machine")
def test_turbojpeg_decodes_as_torchvision_does(packed_s3: Dataset, tmp_path: Path) -> None:
    cached_cfg, _ = configs(packed_s3, tmp_path, FORMAT, workers=0)
    loader = PackedLoader(cached_cfg)
    try:
        turbo, _ = epoch_by_position(loader)
        assert "libturbojpeg" in loader.io_evidence
        loader._reader.turbo = None  # the fallback decoder
        fallback, _ = epoch_by_position(loader)
        np.testing.assert_array_equal(turbo, fallback)
    finally:
        loader.close()


def test_wrong_image_size_is_one_clear_error(packed_s3: Dataset, tmp_path: Path) -> None:
    cached_cfg, _ = configs(packed_s3, tmp_path, FORMAT, workers=0)
    bad = LoaderConfig(**{**cached_cfg.__dict__, "image_shape": (16, 32, 3)})
    loader = PackedLoader(bad)
    try:
        with pytest.raises(ValueError, match=r"decoded to shape \(32, 32, 3\)"):
            list(loader.epoch(0))
    finally:
        loader.close()


def test_cache_verifies_the_tar_and_fetches_a_damaged_one_again(packed_s3: Dataset,
                                                                tmp_path: Path) -> None:
    store, cache_dir = packed_s3.store_obj(), tmp_path / "cache"
    ranges = assign(packed_s3.manifest, "wds-png", "train")
    slices, stats = ShardCache(store, packed_s3.manifest, cache_dir).fetch(ranges)
    # One tar and one index per shard: nothing per sample.
    assert stats.files_fetched == 2 * len(ranges) and stats.files_refetched == 0
    tar = Path(slices[0].location) / "samples.tar"
    good = tar.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    tar.write_bytes(bytes(damaged))
    _, again = ShardCache(store, packed_s3.manifest, cache_dir).fetch(ranges)
    assert again.files_refetched == 1 and again.files_fetched == 1
    assert tar.read_bytes() == good


def test_staging_bound_and_stream_read_ahead_within_the_budget(
        packed_s3: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cached small PNGs: the DataLoader workers' bound; in threads: the ring; streamed:
    the ring, the GETs in flight and a read-ahead of what the budget leaves, which the
    reader then holds to (blocks fetched ahead where two fit, ranged GETs otherwise)."""
    from node.loaders import LoaderUnavailable
    from node.loaders.packed_stream import FETCH_THREADS, PART_BYTES, STREAM_BUFFER_BYTES
    from node.loaders.staging import (
        BUDGET_ENV, MIB, batch_bytes, physical_memory, thread_bound, worker_bound)

    cached_cfg, remote_cfg = configs(packed_s3, tmp_path, FORMAT)
    png_cfg, _ = configs(packed_s3, tmp_path / "png", "wds-png")
    b = batch_bytes(48, (32, 32, 3))
    assert PackedLoader(png_cfg).staging_bound() == worker_bound(b, 2, pinned=False)
    if _compiled_jpeg(cached_cfg.fmt):  # JPEG decodes in the compiled loop, in threads
        assert PackedLoader(cached_cfg).staging_bound() == thread_bound(b, True, False)
    assert PackedThreadLoader(cached_cfg).staging_bound() == thread_bound(b, True, False)
    base = thread_bound(b, True, False)._replace(fixed_bytes=FETCH_THREADS * PART_BYTES)
    default = min(STREAM_BUFFER_BYTES, physical_memory() // 2 - base.total_bytes)
    assert PackedLoader(remote_cfg).staging_bound() == base._replace(read_ahead=default)
    tar_bytes = sum(f.bytes for r in assign(packed_s3.manifest, FORMAT, "train")
                    for f in r.entry.files)
    for room, whole_shards in ((tar_bytes + MIB, True), (1024, False)):
        monkeypatch.setenv(BUDGET_ENV, str((base.total_bytes + room) / MIB))
        streamed = PackedLoader(remote_cfg)
        try:
            bound = streamed.staging_bound()
            assert abs(bound.read_ahead - room) <= 1
            streamed.check_fits()
            _, got_bytes = epoch_by_position(streamed)
            source = streamed._reader.source
            assert source.buffer_bytes == bound.read_ahead
            if whole_shards:
                assert 0.9 * tar_bytes < source.fetched_bytes <= tar_bytes
            else:  # no block fits in 1 KiB: just the members, by ranged GETs
                assert source.fetched_bytes == got_bytes.sum()
        finally:
            streamed.close()
    monkeypatch.setenv(BUDGET_ENV, str((base.total_bytes - 1024) / MIB))
    with pytest.raises(LoaderUnavailable, match=r"^packed: host staging needs .* over the"):
        PackedLoader(remote_cfg).check_fits()
