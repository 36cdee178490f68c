"""shared.manifest: round trip, validation naming the bad field, load from a store."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shared.manifest import (
    SCHEMA_VERSION,
    FileEntry,
    FormatEntry,
    Manifest,
    ManifestError,
    Reject,
    ShardEntry,
    SplitEntry,
)
from shared.storage import Store


def make_manifest(name: str = "cifar10") -> Manifest:
    shards_npy = tuple(
        ShardEntry(split=split, index=i, samples=n, bytes=1000 * n,
                   path=f"npy/{split}/shard-{i:05d}", index_checksum=f"blake2b:{i:032x}",
                   files=(FileEntry("images.npy", 900 * n, "blake2b:" + "a" * 32),
                          FileEntry("labels.npy", 8 * n + 128, "blake2b:" + "b" * 32)))
        for split, i, n in (("train", 0, 4), ("train", 1, 3), ("test", 0, 2)))
    shards_png = tuple(
        ShardEntry(split=s.split, index=s.index, samples=s.samples, bytes=500 * s.samples,
                   path=s.path.replace("npy", "png"), index_checksum=s.index_checksum)
        for s in shards_npy)
    return Manifest(
        name=name, source_kind="cifar10", source_url="/data/cifar-10-python.tar.gz",
        height=32, width=32, channels=3, dtype="uint8", resize="none",
        class_names=("airplane", "automobile", "bird"),
        splits=(SplitEntry("train", 7), SplitEntry("test", 2)), seed=1234, shard_samples=4,
        formats=(FormatEntry(id="npy", kind="array", params={}, shards=shards_npy,
                             total_bytes=9000, conversion_time_s=1.5),
                 FormatEntry(id="png", kind="files", params={"compress_level": 6},
                             shards=shards_png, total_bytes=4500, conversion_time_s=2.0)),
        rejects=(Reject("data_batch_1:7", "truncated"),), val_split="test", tool_version="0.1.0",
        created_at="2026-01-01T00:00:00Z")


def test_round_trip() -> None:
    manifest = make_manifest()
    text = manifest.to_json()
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION
    again = Manifest.from_json(text)
    assert again == manifest
    assert again.to_json() == text
    assert Manifest.from_json(text.encode()) == manifest
    assert isinstance(again.formats[0].shards[0].files, tuple)
    assert again.format("png").params == {"compress_level": 6}
    assert again.format("npy").split_shards("train")[1].index_path == \
        "npy/train/shard-00001/index.parquet"
    assert again.split_samples("test") == 2
    assert again.format_ids == ("npy", "png")
    assert again.split_names == ("train", "test")
    assert again.val_split == "test"


def test_save_and_load_from_store(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    manifest = make_manifest()
    manifest.save(store)
    assert store.walk_files() == ["cifar10/manifest.json"]
    assert Manifest.load(store, "cifar10") == manifest


def test_save_and_load_from_s3(s3_server, s3_bucket: str) -> None:
    store = Store.open(s3_bucket + "/datasets", s3_server.storage_options)
    manifest = make_manifest("masks")
    manifest.save(store)
    assert Manifest.load(store, "masks") == manifest


def test_load_missing_dataset(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    make_manifest("other").save(store)
    with pytest.raises(FileNotFoundError, match="tiny-imagenet"):
        Manifest.load(store, "tiny-imagenet")


def test_load_renamed_dataset_is_refused(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    store.write_bytes("copy/manifest.json", make_manifest("orig").to_json().encode())
    with pytest.raises(ManifestError, match="'name'"):
        Manifest.load(store, "copy")


def test_load_name_escaping(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    for bad in ("../x", "/etc"):
        with pytest.raises(ManifestError, match="'name'"):
            Manifest.load(store, bad)


def _data() -> dict[str, Any]:
    return json.loads(make_manifest().to_json())


def _expect_error(data: Any, field: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(json.dumps(data))
    assert f"'{field}'" in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize("field", ["name", "height", "width", "class_names", "splits", "seed",
                                   "formats", "source_url", "shard_samples"])
def test_missing_top_level_field(field: str) -> None:
    data = _data()
    del data[field]
    assert "missing" in str(_expect_error(data, field))


def test_missing_nested_fields() -> None:
    data = _data()
    del data["formats"][1]["shards"][0]["index_checksum"]
    _expect_error(data, "formats.shards.index_checksum")
    data = _data()
    del data["formats"][0]["shards"][2]["files"][0]["checksum"]
    _expect_error(data, "formats.shards.files.checksum")
    data = _data()
    del data["splits"][0]["samples"]
    _expect_error(data, "splits.samples")


@pytest.mark.parametrize("path,value,field", [
    (("height",), "32", "height"),
    (("height",), 32.0, "height"),
    (("seed",), True, "seed"),
    (("name",), 5, "name"),
    (("class_names",), "airplane", "class_names"),
    (("class_names",), [1, 2], "class_names"),
    (("splits",), {"train": 7}, "splits"),
    (("splits", 0), ["train", 7], "splits"),
    (("formats", 0, "params"), [], "formats.params"),
    (("formats", 0, "total_bytes"), "9000", "formats.total_bytes"),
    (("formats", 0, "conversion_time_s"), "fast", "formats.conversion_time_s"),
    (("formats", 0, "shards", 0, "samples"), None, "formats.shards.samples"),
    (("formats", 0, "shards", 0, "files"), "images.npy", "formats.shards.files"),
    (("formats", 0, "shards", 0, "files", 0, "bytes"), "9", "formats.shards.files.bytes"),
    (("rejects", 0, "reason"), 3, "rejects.reason"),
    (("dtype",), "float32", "dtype"),
    (("height",), 0, "height"),
    (("formats", 0, "kind"), "blob", "formats.kind"),
    (("formats", 0, "shards", 0, "samples"), -1, "shards.samples"),
])
def test_wrong_type_or_value(path: tuple, value: Any, field: str) -> None:
    data = _data()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    _expect_error(data, field)


@pytest.mark.parametrize("version", [None, 0, 2, "1", 1.5])
def test_bad_schema_version(version: Any) -> None:
    data = _data()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    _expect_error(data, "schema_version")


@pytest.mark.parametrize("path,field", [
    (("name",), "name"),
    (("formats", 0, "id"), "formats.id"),
    (("formats", 0, "shards", 1, "path"), "shards.path"),
    (("formats", 0, "shards", 1, "files", 0, "path"), "files.path"),
])
@pytest.mark.parametrize("bad", ["../x", "/abs/x", "a/../../x", "s3://b/x", "C:\\x"])
def test_paths_escaping_refused(path: tuple, field: str, bad: str) -> None:
    data = _data()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    _expect_error(data, field)


def test_not_an_object_or_not_json() -> None:
    for text in ("[]", "3", '"x"', "{", "not json", b"\xff\xfe"):
        with pytest.raises(ManifestError):
            Manifest.from_json(text)


def test_val_split_must_be_a_split() -> None:
    data = _data()
    data["val_split"] = "val"
    _expect_error(data, "val_split")
    del data["val_split"]  # manifests written before prep recorded it
    assert Manifest.from_dict(data).val_split is None


def test_repeated_format_ids() -> None:
    data = _data()
    data["formats"][1]["id"] = "npy"
    _expect_error(data, "formats")


def test_frozen() -> None:
    manifest = make_manifest()
    with pytest.raises(AttributeError):
        manifest.name = "x"  # type: ignore[misc]


def test_constructor_redacts_source_url() -> None:
    data = _data()
    data["source_url"] = "https://user:pa55word-xyz@example.org/raw.tar?token=abc123def"
    manifest = Manifest.from_json(json.dumps(copy.deepcopy(data)))
    assert "pa55word-xyz" not in manifest.to_json()
    assert "abc123def" not in manifest.to_json()
