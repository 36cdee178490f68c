"""The ``webdataset`` loader on packed tar shards (skipped without the webdataset package).

Shards are written in the packed layout (``<format>/<split>/shard-NNNNN/samples.tar``,
members ``<key>.jpg`` then ``<key>.cls``, an ``index.parquet`` with each sample's key,
label, member offset, length and checksum): by the registered ``wds-jpeg-q95`` format
through ``shared.shards.write_shard`` where it exists, else by this file in that layout,
with the JPEG q95 codec standing in for the format under its packed id.

The loader shuffles WebDataset's way (``follows_plan`` False), so instead of the planned
batches this checks what it does promise: every sample of the rank's ranges once per
epoch with its pixels and label, full batches but the last, same seed same order,
epochs in different orders, exact image member bytes, no worker left running.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import multiprocessing
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from node.loaders import LOADER_SPECS, LoaderConfig, ShardSlice
from shared.formats import Format, UnknownFormat, get_format
from shared.shards import INDEX_SCHEMA, read_index, shard_path, write_shard
from shared.storage import Store, checksum_bytes

pytest.importorskip("webdataset")

from node.loaders.webdataset_loader import WebDatasetLoader  # noqa: E402

FORMAT_ID = "wds-jpeg-q95"
SHARDS, PER_SHARD = 3, 41
H, W = 12, 16
BATCH = 16
SEED = 3
SPLIT = "train"
LABELS = np.random.default_rng(SEED).integers(0, 10, SHARDS * PER_SHARD)
FULL = ((0, PER_SHARD),) * SHARDS
MIDDLE = ((7, PER_SHARD), (0, PER_SHARD), (0, 29))  # a rank starting and stopping mid-shard


def image_of(i: int) -> np.ndarray:
    """Flat colours that survive JPEG: R and G spell the global index."""
    image = np.empty((H, W, 3), dtype=np.uint8)
    image[..., 0] = (i // 16) * 24 + 12
    image[..., 1] = (i % 16) * 16 + 8
    image[..., 2] = 128
    return image


def identity_of(image: np.ndarray) -> int:
    return round((float(image[..., 0].mean()) - 12) / 24) * 16 + \
        round((float(image[..., 1].mean()) - 8) / 16)


def _registered() -> bool:
    try:
        get_format(FORMAT_ID)
    except UnknownFormat:
        return False
    return True


REGISTERED = _registered()


def packed_format() -> Format:
    """The registered packed format, else the JPEG q95 codec under the packed id."""
    if REGISTERED:
        return get_format(FORMAT_ID)
    fmt = copy.copy(get_format("jpeg-q95"))
    object.__setattr__(fmt, "id", FORMAT_ID)
    return fmt


def write_layout_shard(folder: Path, fmt: Format, keys: list[str], ids: range) -> None:
    """One shard in the packed layout: the tar, then its index (the columns of
    the packed format's index: key, label, member, offset, bytes, checksum)."""
    folder.mkdir(parents=True)
    members, offsets, lengths, sums = [], [], [], []
    with tarfile.open(folder / "samples.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, i in zip(keys, ids, strict=True):
            data = fmt.encode(image_of(i))  # type: ignore[attr-defined]
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", b"%d" % LABELS[i])):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                if name.endswith(".jpg"):
                    members.append(name)
                    offsets.append(info.offset_data)
                    lengths.append(len(payload))
                    sums.append(checksum_bytes(payload))
    schema = pa.schema([*INDEX_SCHEMA, pa.field("member", pa.string()),
                        pa.field("offset", pa.int64()), pa.field("bytes", pa.int64()),
                        pa.field("checksum", pa.string())])
    columns = [keys, LABELS[list(ids)], members, offsets, lengths, sums]
    pq.write_table(pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema)],
                                        schema=schema), folder / "index.parquet")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wds-shards")
    fmt, store = packed_format(), Store.open(str(path))
    for s in range(SHARDS):
        ids = range(s * PER_SHARD, (s + 1) * PER_SHARD)
        keys = [f"k{i:05d}" for i in ids]
        if REGISTERED:
            write_shard(store, fmt, SPLIT, s, keys, np.stack([image_of(i) for i in ids]),
                        LABELS[list(ids)])
        else:
            write_layout_shard(path / shard_path(FORMAT_ID, SPLIT, s), fmt, keys, ids)
    return path


def make_config(root: Path, ranges: tuple[tuple[int, int], ...], workers: int,
                seed: int = SEED) -> tuple[LoaderConfig, np.ndarray]:
    """The config and, per rank position, the global sample index."""
    slices, identities = [], []
    for s, (start, stop) in enumerate(ranges):
        folder = root / shard_path(FORMAT_ID, SPLIT, s)
        index = read_index(folder / "index.parquet")
        slices.append(ShardSlice(location=str(folder), labels=index.column("label").to_numpy(),
                                 files=None, start=start, stop=stop,
                                 keys=tuple(index.column("key").to_pylist())))
        identities.append(np.arange(start, stop) + s * PER_SHARD)
    config = LoaderConfig(fmt=packed_format(), shards=tuple(slices), batch_size=BATCH,
                          workers=workers, seed=seed, device=torch.device("cpu"),
                          image_shape=(H, W, 3))
    return config, np.concatenate(identities)


def image_member_bytes(config: LoaderConfig) -> int:
    """The image member bytes of the rank's samples (what the packed loader counts too)."""
    total = 0
    for s in config.shards:
        with tarfile.open(Path(s.location) / "samples.tar") as tar:
            sizes = [m.size for m in tar.getmembers() if not m.name.endswith(".cls")]
        total += sum(sizes[s.start:s.stop])
    return total


def check_epoch(loader: WebDatasetLoader, epoch: int, identities: np.ndarray) -> np.ndarray:
    """One epoch against what the loader promises; returns the delivery order."""
    config = loader.config
    batches = list(loader.epoch(epoch))
    assert len(batches) == len(loader)
    sizes = [len(b.positions) for b in batches]
    assert sizes[:-1] == [BATCH] * (len(sizes) - 1)
    for b in batches:
        assert b.images.dtype == torch.uint8 and tuple(b.images.shape) == (len(b.positions),
                                                                             H, W, 3)
        assert b.labels.dtype == b.positions.dtype == torch.int64
        expected = identities[b.positions.numpy()]
        assert [identity_of(image) for image in b.images.numpy()] == expected.tolist()
        assert b.labels.numpy().tolist() == LABELS[expected].tolist()
        assert b.bytes_read > 0
    order = torch.cat([b.positions for b in batches]).numpy()
    assert np.array_equal(np.sort(order), np.arange(config.num_samples))  # each once
    assert sum(b.bytes_read for b in batches) == image_member_bytes(config)
    return order


@pytest.mark.parametrize("workers,ranges", [(0, FULL), (2, MIDDLE)], ids=["w0-full", "w2-mid"])
def test_epochs_deliver_every_sample_once(root: Path, workers: int,
                                          ranges: tuple[tuple[int, int], ...]) -> None:
    config, identities = make_config(root, ranges, workers)
    children = set(multiprocessing.active_children())
    first, second = WebDatasetLoader(config), WebDatasetLoader(config)
    try:
        order0 = check_epoch(first, 0, identities)
        first.release()
        order1 = check_epoch(first, 1, identities)
        assert not np.array_equal(order0, order1), "epochs 0 and 1 came in the same order"
        assert np.array_equal(order0, check_epoch(second, 0, identities)), \
            "the same seed gave a different order"
        assert first.resources() == {"threads": 0 if workers else 1, "processes": workers}
    finally:
        first.close()
        second.close()
    assert not set(multiprocessing.active_children()) - children, "close() left workers"


def test_another_seed_another_order(root: Path) -> None:
    orders = []
    for seed in (SEED, SEED + 1):
        config, identities = make_config(root, FULL, 0, seed=seed)
        loader = WebDatasetLoader(config)
        orders.append(check_epoch(loader, 0, identities))
        loader.close()
    assert not np.array_equal(*orders)


def test_a_key_the_index_does_not_list_is_refused(root: Path, tmp_path: Path) -> None:
    """The tar's keys are checked against the index (``member`` names where it has them)."""
    copy_root = tmp_path / "copy"
    for s in range(SHARDS):
        rel = shard_path(FORMAT_ID, SPLIT, s)
        shutil.copytree(root / rel, copy_root / rel)
    index_path = copy_root / shard_path(FORMAT_ID, SPLIT, 1) / "index.parquet"
    table = pq.read_table(index_path)
    name = "member" if "member" in table.column_names else "key"
    values = table.column(name).to_pylist()
    values[0] = "other" + ("." + values[0].split(".", 1)[1] if name == "member" else "")
    table = table.set_column(table.column_names.index(name), name, pa.array(values))
    pq.write_table(table, index_path)
    config, _ = make_config(copy_root, FULL, 0)
    with pytest.raises(ValueError, match="sample 0 is '[^']+', the shard's index says 'other'"):
        list(WebDatasetLoader(config).epoch(0))


def test_registered_for_packed_formats_only(root: Path, tmp_path: Path) -> None:
    spec = LOADER_SPECS["webdataset"]
    assert spec.load() is WebDatasetLoader and spec.requires == ("webdataset",)
    assert WebDatasetLoader.supports(packed_format())
    assert not WebDatasetLoader.supports(get_format("jpeg-q95"))
    assert WebDatasetLoader.unavailable_reason() is None
    config, _ = make_config(root, FULL, 0)
    for location, message in (("s3://bucket/shard-00000", "reads cached shards only"),
                              (str(tmp_path), "has no samples.tar")):
        bad = ShardSlice(location=location, labels=config.shards[0].labels, files=None,
                         start=0, stop=1, keys=config.shards[0].keys)
        with pytest.raises(ValueError, match=message):
            WebDatasetLoader(dataclasses.replace(config, shards=(bad,)))


def test_staging_bound_counts_prefetch_and_shuffle_buffer(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from node.loaders import LoaderUnavailable
    from node.loaders.staging import BUDGET_ENV, MIB, batch_bytes, worker_bound
    from node.loaders.webdataset_loader import SAMPLE_OVERHEAD, SHUFFLE_BUFFER

    config, _ = make_config(root, FULL, workers=2)
    largest = 0
    for s in config.shards:
        with tarfile.open(Path(s.location) / "samples.tar") as tar:
            largest = max([largest, *(m.size for m in tar.getmembers()
                                      if not m.name.endswith(".cls"))])
    loader = WebDatasetLoader(config)
    try:
        bound = loader.staging_bound()
        batches = worker_bound(batch_bytes(BATCH, (H, W, 3)), 2, pinned=False, prefetch=2)
        assert bound == batches._replace(fixed_bytes=2 * SHUFFLE_BUFFER * (largest
                                                                           + SAMPLE_OVERHEAD))
        dataloader = loader._build()  # the DataLoader prefetches as many as the bound counts
        assert dataloader.prefetch_factor * dataloader.num_workers == bound.batches - 2
        unshuffled = WebDatasetLoader(dataclasses.replace(config, shuffle=False))
        assert unshuffled.staging_bound() == batches  # no shuffle buffer
        monkeypatch.setenv(BUDGET_ENV, str(bound.total_bytes / MIB))
        loader.check_fits()
        monkeypatch.setenv(BUDGET_ENV, str((bound.total_bytes - 1) / MIB))
        with pytest.raises(LoaderUnavailable, match=r"^webdataset: host staging needs .* \+ "
                                                    r"\d+ MiB, over the budget"):
            loader.check_fits()
    finally:
        loader.close()
