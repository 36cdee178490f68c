"""shared.shards: write and commit shards (index last), find committed ones, check indexes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.formats import (FORMATS, Format, PillowFormat, format_id_help, get_format,
                            parse_format_list)
from shared.formats.registry import register
from shared.manifest import INDEX_FILE, FormatEntry
from shared.shards import (FILES_INDEX_SCHEMA, INDEX_SCHEMA, ShardIndex, committed_shard,
                           read_index, shard_path, write_shard)
from shared.storage import PathEscapeError, Store, checksum_bytes

N = 6


@pytest.fixture(params=["local", "s3"])
def dataset(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A dataset root in a local folder or in a fresh S3 bucket."""
    if request.param == "local":
        return Store.open(str(tmp_path / "store" / "ds"))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Store.open(bucket + "/store/ds", server.storage_options)


def sample_data(seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N, 8, 10, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=N).astype(np.int64)
    keys = [f"data_batch_1:{i + 10 * seed}" for i in range(N)]
    return keys, images, labels


def local_copy(dataset: Store, rel: str, dest: Path) -> Path:
    """Download a shard folder to ``dest`` (so format readers can open it)."""
    for name in dataset.walk_files(rel):
        target = dest / name[len(rel) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        dataset.get_file(name, target)
    return dest


def test_file_format_shard(dataset: Store, tmp_path: Path) -> None:
    fmt = get_format("png")
    keys, images, labels = sample_data()
    staging = tmp_path / "staging"
    staging.mkdir()
    entry = write_shard(dataset, fmt, "train", 0, keys, images, labels,
                        staging_dir=str(staging))
    assert entry.path == shard_path("png", "train", 0) == "png/train/shard-00000"
    assert entry.split == "train" and entry.index == 0 and entry.samples == N
    assert entry.files == ()  # every file of a png shard is listed in the index
    assert list(staging.iterdir()) == []  # staging cleaned up

    index_bytes = dataset.read_bytes(entry.index_path)
    assert checksum_bytes(index_bytes) == entry.index_checksum
    table = read_index(index_bytes)
    assert table.column_names == ["key", "label", "file", "bytes", "checksum"]
    assert table.schema.field("key").type == pa.string()
    assert table.schema.field("label").type == pa.int64()
    assert table.schema.field("bytes").type == pa.int64()
    assert table.column("key").to_pylist() == keys
    assert table.column("label").to_pylist() == labels.tolist()

    files = table.column("file").to_pylist()
    assert dataset.walk_files(entry.path) == sorted(
        [f"{entry.path}/{f}" for f in files] + [entry.index_path])
    data_bytes = 0
    for name, size, digest in zip(files, table.column("bytes").to_pylist(),
                                  table.column("checksum").to_pylist()):
        raw = dataset.read_bytes(f"{entry.path}/{name}")
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(raw) == size and checksum_bytes(raw) == digest
        data_bytes += size
    assert entry.bytes == data_bytes + len(index_bytes)

    shard_dir = local_copy(dataset, entry.path, tmp_path / "copy")
    with fmt.open_reader(shard_dir, files) as reader:
        assert len(reader) == N
        assert np.array_equal(reader.read_batch(range(N)), images)

    assert committed_shard(dataset, "png", "train", 0, keys) == entry
    assert committed_shard(dataset, "png", "train", 0) == entry


@pytest.mark.parametrize("format_id,expected_files", [
    ("npy", ["images.npy", "labels.npy"]),
    ("hdf5", ["data.h5"]),
])
def test_array_format_shard(dataset: Store, tmp_path: Path, format_id: str,
                            expected_files: list[str]) -> None:
    fmt = get_format(format_id)
    keys, images, labels = sample_data(1)
    entry = write_shard(dataset, fmt, "test", 3, keys, images, labels)
    assert entry.path == f"{format_id}/test/shard-00003"

    index_bytes = dataset.read_bytes(entry.index_path)
    assert checksum_bytes(index_bytes) == entry.index_checksum
    table = read_index(index_bytes)
    assert table.column_names == ["key", "label"]
    assert table.column("key").to_pylist() == keys
    assert table.column("label").to_pylist() == labels.tolist()

    assert [f.path for f in entry.files] == expected_files
    for f in entry.files:
        raw = dataset.read_bytes(f"{entry.path}/{f.path}")
        assert len(raw) == f.bytes == dataset.size(f"{entry.path}/{f.path}")
        assert checksum_bytes(raw) == f.checksum
    assert entry.bytes == sum(f.bytes for f in entry.files) + len(index_bytes)
    assert dataset.walk_files(entry.path) == sorted(
        [f"{entry.path}/{f.path}" for f in entry.files] + [entry.index_path])
    if format_id == "npy":
        raw = dataset.read_bytes(f"{entry.path}/images.npy")
        assert np.array_equal(np.load(io.BytesIO(raw), allow_pickle=False), images)
        raw = dataset.read_bytes(f"{entry.path}/labels.npy")
        got = np.load(io.BytesIO(raw), allow_pickle=False)
        assert got.dtype == np.int64 and np.array_equal(got, labels)

    shard_dir = local_copy(dataset, entry.path, tmp_path / "copy")
    with fmt.open_reader(shard_dir, num_samples=N) as reader:
        assert np.array_equal(reader.read_batch([5, 0, 2]), images[[5, 0, 2]])

    assert committed_shard(dataset, format_id, "test", 3, keys) == entry


def test_committed_shard_missing_or_different(dataset: Store) -> None:
    fmt = get_format("npy")
    keys, images, labels = sample_data()
    assert committed_shard(dataset, "npy", "train", 0, keys) is None
    entry = write_shard(dataset, fmt, "train", 0, keys, images, labels)
    assert committed_shard(dataset, "npy", "train", 0, keys) == entry
    assert committed_shard(dataset, "npy", "train", 0, keys[::-1]) is None
    assert committed_shard(dataset, "npy", "train", 0, keys[:-1]) is None
    assert committed_shard(dataset, "npy", "train", 1, keys) is None
    assert committed_shard(dataset, "npy", "test", 0, keys) is None
    dataset.write_bytes(entry.index_path, b"not parquet")
    assert committed_shard(dataset, "npy", "train", 0, keys) is None
    dataset.delete(entry.index_path)
    assert committed_shard(dataset, "npy", "train", 0, keys) is None


def test_partial_shard_is_not_committed_and_is_cleaned(dataset: Store) -> None:
    fmt = get_format("png")
    keys, images, labels = sample_data()
    rel = shard_path("png", "train", 0)
    # An interrupted attempt: data files, some junk, no index.
    dataset.write_bytes(f"{rel}/000000.png", b"truncated")
    dataset.write_bytes(f"{rel}/stale-from-old-run.png", b"old")
    assert committed_shard(dataset, "png", "train", 0, keys) is None
    assert committed_shard(dataset, "png", "train", 0) is None

    entry = write_shard(dataset, fmt, "train", 0, keys, images, labels)
    files = read_index(dataset.read_bytes(entry.index_path)).column("file").to_pylist()
    assert dataset.walk_files(rel) == sorted([f"{rel}/{f}" for f in files] + [entry.index_path])
    assert f"{rel}/stale-from-old-run.png" not in dataset.walk_files(rel)
    assert dataset.read_bytes(f"{rel}/000000.png") != b"truncated"
    assert committed_shard(dataset, "png", "train", 0, keys) == entry


def test_rewrite_replaces_committed_shard(tmp_path: Path) -> None:
    dataset = Store.open(str(tmp_path / "ds"))
    fmt = get_format("npy")
    keys, images, labels = sample_data(0)
    first = write_shard(dataset, fmt, "train", 0, keys, images, labels)
    keys2, images2, labels2 = sample_data(2)
    second = write_shard(dataset, fmt, "train", 0, keys2[:4], images2[:4], labels2[:4])
    assert second != first
    assert committed_shard(dataset, "npy", "train", 0, keys) is None
    assert second.samples == 4
    assert committed_shard(dataset, "npy", "train", 0, keys2[:4]) == second
    assert sorted(p.name for p in (tmp_path / "ds" / second.path).iterdir()) == \
        ["images.npy", INDEX_FILE, "labels.npy"]


def test_write_shard_refuses_mismatched_lengths(tmp_path: Path) -> None:
    dataset = Store.open(str(tmp_path / "ds"))
    keys, images, labels = sample_data()
    with pytest.raises(ValueError):
        write_shard(dataset, get_format("npy"), "train", 0, keys[:-1], images, labels)
    with pytest.raises(ValueError):
        write_shard(dataset, get_format("png"), "train", 0, keys, images, labels[:-1])
    assert dataset.walk_files() == []


def _index_with_files(files: list[str]) -> bytes:
    table = pa.table({"key": [f"k{i}" for i in range(len(files))],
                      "label": pa.array(range(len(files)), pa.int64()),
                      "file": files, "bytes": pa.array([1] * len(files), pa.int64()),
                      "checksum": ["blake2b:00"] * len(files)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "s3://x/y", "C:\\x"])
def test_read_index_rejects_escaping_files(bad: str, tmp_path: Path) -> None:
    data = _index_with_files(["000000.png", bad])
    with pytest.raises(PathEscapeError):
        read_index(data)
    path = tmp_path / INDEX_FILE
    path.write_bytes(data)
    with pytest.raises(PathEscapeError):
        read_index(path)


def test_read_index_accepts_plain_files(tmp_path: Path) -> None:
    data = _index_with_files(["000000.png", "sub/000001.png"])
    assert read_index(data).column("file").to_pylist() == ["000000.png", "sub/000001.png"]
    path = tmp_path / INDEX_FILE
    path.write_bytes(data)
    assert read_index(str(path)).num_rows == 2


@pytest.mark.parametrize("format_id, schema", [("png", FILES_INDEX_SCHEMA), ("npy", INDEX_SCHEMA)])
def test_written_index_follows_the_schema(format_id: str, schema: pa.Schema,
                                          tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "ds"))
    keys, images, labels = sample_data()
    entry = write_shard(store, get_format(format_id), "train", 0, keys, images, labels)
    data = store.read_bytes(f"{entry.path}/{INDEX_FILE}")
    assert read_index(data).schema.remove_metadata() == schema
    index = ShardIndex.parse(data)
    assert index.keys == tuple(keys)
    assert index.labels.dtype == np.int64 and index.labels.tolist() == labels.tolist()
    if schema is INDEX_SCHEMA:
        assert index.files is None and index.sample_files() == []
    else:
        assert index.files is not None and len(index.files) == N
        for (name, checksum, size), in_store in zip(index.sample_files(), index.files):
            blob = store.read_bytes(f"{entry.path}/{in_store}")
            assert (name, checksum, size) == (in_store, checksum_bytes(blob), len(blob))


def test_shard_index_without_sizes_and_without_labels() -> None:
    table = pq.read_table(io.BytesIO(_index_with_files(["a.png"]))).drop_columns(["bytes"])
    index = ShardIndex.from_table(table)
    assert index.sample_files() == [("a.png", "blake2b:00", None)]  # written before `bytes`
    with pytest.raises(ValueError, match="'label'"):
        ShardIndex.from_table(table.drop_columns(["label"]))


class PcxFormat(PillowFormat):
    """``pcx``: the whole of a new format module (the codec is Pillow's)."""

    def __init__(self) -> None:
        super().__init__("pcx", "pcx", True, extension="pcx", compression="rle",
                         pillow_format="PCX", save_options={})


def test_a_new_format_is_one_class_and_one_registration_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered, a format is a CLI value, part of ``all``, written and committed by the
    one shard lifecycle, read back, and rebuilt from its manifest entry."""
    monkeypatch.setattr(FORMATS, "_entries", dict(FORMATS._entries))
    monkeypatch.setattr(FORMATS, "catalog", list(FORMATS.catalog))
    register(PcxFormat)  # the registration line

    assert "pcx" in format_id_help() and parse_format_list("png,pcx")[1].id == "pcx"
    store = Store.open(str(tmp_path / "ds"))
    keys, images, labels = sample_data()
    entry = write_shard(store, get_format("pcx"), "train", 0, keys, images, labels)
    assert committed_shard(store, "pcx", "train", 0, keys) == entry
    index = ShardIndex.parse(store.read_bytes(f"{entry.path}/{INDEX_FILE}"))
    fmt = get_format("pcx")
    manifest_entry = FormatEntry(id=fmt.id, kind=fmt.kind.value, params=dict(fmt.params),
                                 shards=(entry,), total_bytes=entry.bytes,
                                 conversion_time_s=0.0)
    reader = Format.from_entry(manifest_entry).open_reader(store.path(entry.path), index.files)
    assert np.array_equal(reader.read_batch(range(N)), images)
    assert index.labels.tolist() == labels.tolist()
