"""One contract for every registered source, parametrised over the registry.

A source added to ``prep.sources.SOURCES`` is checked here with no change to this
file; it only needs a sample writer in ``testdata/samples.py`` (its absence fails).
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from prep.plan import plan_shards
from prep.sources import SOURCES, Source, SourceError, SourceListing, get_source
from prep.transform import prepare_image
from testdata.samples import SAMPLES

NAMES = SOURCES.names()


@pytest.fixture(scope="module", params=NAMES)
def sample(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, SourceListing]:
    """(source name, URL of its sample, the sample's listing)."""
    name = request.param
    if name not in SAMPLES:
        pytest.fail(f"source {name!r} has no sample writer in testdata/samples.py")
    url = SAMPLES[name](tmp_path_factory.mktemp(name))
    return name, url, get_source(name, url).list()


def test_registry_has_the_sources() -> None:
    assert {"cifar10", "tiny-imagenet", "image-folder"} <= set(NAMES)
    with pytest.raises(SourceError) as err:
        get_source("no-such-source", "/tmp")
    message = str(err.value)
    assert "\n" not in message and "'no-such-source'" in message
    assert all(name in message for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_declares_its_needs(name: str) -> None:
    cls = SOURCES.get(name)
    assert issubclass(cls, Source) and cls.name == name  # registered under its own name
    assert cls.needs_size() == (cls.native_size is None)
    assert cls.val_split, f"{name} declares no validation split"
    for option in cls.option_names():  # every option has a default: the CLI may omit it
        assert getattr(get_source(name, "/tmp"), option) is not None


def test_lists_labelled_items_in_a_stable_order(sample: tuple[str, str, SourceListing]) -> None:
    name, url, listing = sample
    assert listing.items, name
    keys = [it.key for it in listing.items]
    assert len(keys) == len(set(keys)), f"{name}: a key repeats"
    assert len(set(listing.class_names)) == len(listing.class_names) >= 2
    assert all(0 <= it.label < len(listing.class_names) for it in listing.items)
    assert len({it.label for it in listing.items}) >= 2  # labels are not all one class
    again = get_source(name, url).list()  # a fresh instance lists the same, in order
    assert (again.items, again.class_names, again.val_split) == (
        listing.items, listing.class_names, listing.val_split)
    assert listing.native_size == SOURCES.get(name).native_size


def test_declared_val_split_is_listed(sample: tuple[str, str, SourceListing]) -> None:
    name, _, listing = sample
    assert listing.val_split == SOURCES.get(name).val_split
    assert listing.val_split in listing.splits
    assert set(listing.splits) - {listing.val_split}, f"{name}: nothing left to train on"


def test_loads_payloads_that_decode_in_the_order_given(
        sample: tuple[str, str, SourceListing]) -> None:
    name, url, listing = sample
    cls = SOURCES.get(name)
    items = list(listing.items)
    random.Random(0).shuffle(items)
    loaded = list(get_source(name, url).load(items))
    assert [it for it, _ in loaded] == items
    for item, payload in loaded:
        assert isinstance(payload, (bytes, np.ndarray)), f"{item.key}: {payload!r}"
        image = prepare_image(payload, cls.native_size or 24)
        assert image.dtype == np.uint8 and image.shape[2] == 3
        if cls.native_size:
            assert prepare_image(payload, None).shape == (cls.native_size, cls.native_size, 3)


def test_plan_under_a_seed_is_stable(sample: tuple[str, str, SourceListing]) -> None:
    name, url, listing = sample
    plans = plan_shards(listing.items, 7, 5)
    assert plans == plan_shards(get_source(name, url).list().items, 7, 5)
    assert {p.split for p in plans} == set(listing.splits)
    assert sorted(k.key for p in plans for k in p.items) == sorted(it.key for it in listing.items)


def test_pickled_source_loads_the_same(sample: tuple[str, str, SourceListing]) -> None:
    name, url, listing = sample
    source = get_source(name, url)
    source.list()  # opens its store; a Ray task gets it without one
    copy = pickle.loads(pickle.dumps(source))
    items = listing.items[:3]
    for (_, a), (_, b) in zip(source.load(items), copy.load(items), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) if isinstance(a, np.ndarray) \
            else a == b


@pytest.mark.parametrize("name", NAMES)
def test_bad_url_is_one_line_source_error(name: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a dataset\n" * 10)
    for url in (str(tmp_path / "missing"), str(junk), "nosuch://user:hunter2pass@host/x"):
        with pytest.raises(SourceError) as err:
            get_source(name, url).list()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{name}: "), message
        assert "hunter2pass" not in message


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_refused(name: str) -> None:
    with pytest.raises(SourceError) as err:
        get_source(name, "/tmp", no_such_option=1)
    message = str(err.value)
    assert "\n" not in message and "no_such_option" in message
    assert get_source(name, "/tmp", no_such_option=None).name == name  # None: not given
