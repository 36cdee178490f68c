"""The node builds a dataset's format from its manifest entry, and refuses one format
lookup in one place: ``node.cache.format_entry`` / ``dataset_format``."""

from __future__ import annotations

import json

import pytest

from node.cache import FormatNotInDataset, dataset_format, format_entry
from node.errors import UsageError
from shared.formats import get_format
from shared.manifest import FormatEntry, Manifest, SplitEntry


def _manifest(*formats: tuple[str, dict]) -> Manifest:
    entries = tuple(FormatEntry(id=fid, kind=get_format(fid).kind.value, params=params,
                                shards=(), total_bytes=0, conversion_time_s=0.0)
                    for fid, params in formats)
    return Manifest(name="ds", source_kind="cifar10", source_url="x", height=32, width=32,
                    channels=3, dtype="uint8", resize="native", class_names=("a", "b"),
                    splits=(SplitEntry("train", 1),), seed=0, shard_samples=1,
                    formats=entries)


def _recorded(format_id: str) -> dict:
    return json.loads(json.dumps(dict(get_format(format_id).params)))


def test_format_comes_from_the_entry() -> None:
    manifest = Manifest.from_json(_manifest(("jpeg-q95-444", _recorded("jpeg-q95-444")),
                                            ("npy", _recorded("npy"))).to_json())
    assert format_entry(manifest, "npy") is manifest.format("npy")
    fmt = dataset_format(manifest, "jpeg-q95-444")
    assert (fmt.id, fmt.params["subsampling"]) == ("jpeg-q95-444", "4:4:4")


def test_format_not_in_dataset_is_one_usage_error() -> None:
    manifest = _manifest(("npy", {}), ("png", {}))
    with pytest.raises(FormatNotInDataset, match=r"^format 'bmp' is not in dataset 'ds'; "
                                                 r"it has: npy, png$"):
        format_entry(manifest, "bmp")
    with pytest.raises(UsageError, match=r"^--format takes one format id, not 'all' .*"
                                         r"dataset 'ds' has: npy, png$"):
        dataset_format(manifest, "all")


def test_entry_written_with_other_parameters_is_a_usage_error() -> None:
    manifest = _manifest(("npy", dict(_recorded("npy"), data_offset=128)))
    with pytest.raises(UsageError, match=r"^dataset 'ds': format 'npy': .*data_offset=128"):
        dataset_format(manifest, "npy")
