"""Packed formats (``wds-<codec>``): one WebDataset tar per shard, members indexed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shared.formats import CATALOG, FormatKind, UnknownFormat, get_format, parse_format_list
from shared.formats.wds import TAR_NAME, PackedFormat, tar_members
from shared.manifest import INDEX_FILE, FormatEntry
from shared.shards import PACKED_INDEX_SCHEMA, ShardIndex, committed_shard, read_index, write_shard
from shared.storage import Store, checksum_bytes

N = 7
PACKED = [f.id for f in parse_format_list("packed")]


def sample_data(n: int = N, h: int = 12, w: int = 10) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:h, 0:w]
    images = np.stack([np.clip(rng.uniform(0, 255, 3) + 6 * x[..., None] + 3 * y[..., None]
                               + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
                       for _ in range(n)])
    labels = rng.integers(0, 1000, n).astype(np.int64)
    # Source keys with dots and slashes: the tar's keys must not carry them.
    return [f"train/class {i % 3}/img.{i}.png" for i in range(n)], images, labels


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Store, object]]:
    store = Store.open(str(tmp_path_factory.mktemp("packed") / "ds"))
    keys, images, labels = sample_data()
    return {fid: (store, write_shard(store, get_format(fid), "train", 0, keys, images, labels))
            for fid in PACKED}


def test_packed_group_is_every_catalog_image_codec() -> None:
    codecs = [f for f in CATALOG if get_format(f).kind is FormatKind.FILES and f != "npy-files"]
    assert PACKED == [f"wds-{c}" for c in codecs]
    assert "wds-jpeg-q95" in PACKED and "wds-png" in PACKED and "wds-webp-lossless" in PACKED
    assert [f.id for f in parse_format_list("all")] == list(CATALOG)  # 'all' is unchanged
    assert get_format("wds-jpeg-q50").codec.id == "jpeg-q50"  # quality families pack too


@pytest.mark.parametrize("bad", ["wds-", "wds-npy", "wds-npy-files", "wds-hdf5", "wds-foo",
                                 "wds-jpeg-q0", "wds-wds-png"])
def test_packed_ids_of_non_image_codecs_are_rejected(bad: str) -> None:
    with pytest.raises(UnknownFormat, match=f"unknown format '{bad}'"):
        get_format(bad)


@pytest.mark.parametrize("format_id", PACKED)
def test_packed_shard_round_trip(written, format_id: str) -> None:
    store, entry = written[format_id]
    fmt: PackedFormat = get_format(format_id)
    keys, images, labels = sample_data()
    assert [f.path for f in entry.files] == [TAR_NAME]  # the tar is checksummed as a file
    shard = Path(store.path(entry.path))
    tar_bytes = (shard / TAR_NAME).read_bytes()
    assert checksum_bytes(tar_bytes) == entry.files[0].checksum
    table = read_index(shard / INDEX_FILE)
    assert table.schema.remove_metadata() == PACKED_INDEX_SCHEMA
    index = ShardIndex.from_table(table)
    assert index.keys == tuple(keys) and index.labels.tolist() == labels.tolist()
    assert index.files is None  # nothing for the cache to fetch per sample

    # WebDataset layout: <key>.<ext> then <key>.cls, in shard order, keys without dots.
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = [m.name for m in tar.getmembers()]
        cls = [tar.extractfile(n).read() for n in names[1::2]]
    exts = [f"{i:06d}.{fmt.codec.extension}" for i in range(N)]
    assert names[0::2] == exts == list(table.column("member").to_pylist())
    assert names[1::2] == [f"{i:06d}.cls" for i in range(N)]
    assert cls == [str(v).encode() for v in labels.tolist()]

    # Each index row's offset and length point at exactly that sample's codec bytes.
    assert [(o, s) for _, o, s in tar_members(io.BytesIO(tar_bytes))] == list(
        zip(index.offsets, index.sizes))
    with fmt.open_reader(shard) as reader:
        assert len(reader) == N
        for i in range(N):
            data = tar_bytes[index.offsets[i]:index.offsets[i] + index.sizes[i]]
            assert checksum_bytes(data) == index.checksums[i]
            assert data == fmt.codec.encode(images[i])  # the codec's own file bytes
            np.testing.assert_array_equal(reader.read(i), fmt.codec.decode(data))
            if fmt.lossless:
                np.testing.assert_array_equal(reader.read(i), images[i])
        assert reader.bytes_read == (2 if fmt.lossless else 1) * sum(index.sizes)


def test_packed_shard_resumes_like_every_format(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "ds"))
    fmt = get_format("wds-jpeg-q95")
    keys, images, labels = sample_data()
    rel = "wds-jpeg-q95/train/shard-00000"
    store.write_bytes(f"{rel}/{TAR_NAME}", b"truncated by a kill")  # data, no index
    assert committed_shard(store, fmt.id, "train", 0, keys) is None
    entry = write_shard(store, fmt, "train", 0, keys, images, labels)
    assert committed_shard(store, fmt.id, "train", 0, keys) == entry
    assert committed_shard(store, fmt.id, "train", 0, keys[::-1]) is None
    first = store.read_bytes(f"{rel}/{TAR_NAME}")
    store.delete(f"{rel}/{INDEX_FILE}")  # killed between data and index: rewritten
    again = write_shard(store, fmt, "train", 0, keys, images, labels)
    assert again == entry and store.read_bytes(f"{rel}/{TAR_NAME}") == first
    assert entry.bytes == len(first) + len(store.read_bytes(f"{rel}/{INDEX_FILE}"))


def test_packed_shard_in_s3(s3_server, s3_bucket: str) -> None:
    store = Store.open(s3_bucket + "/ds", s3_server.storage_options)
    fmt = get_format("wds-png")
    keys, images, labels = sample_data()
    entry = write_shard(store, fmt, "train", 0, keys, images, labels)
    assert committed_shard(store, fmt.id, "train", 0, keys) == entry
    with fmt.open_reader(store.url_of(entry.path),
                         storage_options=s3_server.storage_options) as reader:
        np.testing.assert_array_equal(np.stack([reader.read(i) for i in range(N)]), images)


def test_manifest_accepts_the_packed_kind() -> None:
    fmt = get_format("wds-png")
    entry = FormatEntry(id=fmt.id, kind=fmt.kind.value, params=dict(fmt.params), shards=(),
                        total_bytes=0, conversion_time_s=0.0)
    assert entry.kind == "packed"
    with pytest.raises(ValueError, match="formats.kind"):
        FormatEntry(id="x", kind="tarball", params={}, shards=(), total_bytes=0,
                    conversion_time_s=0.0)
