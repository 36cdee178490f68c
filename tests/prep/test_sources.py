"""Each raw-dataset source lists and loads generated data in every real layout."""

from __future__ import annotations

import pickle
import pickletools
import random
import re
import shutil
import tarfile
import uuid
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest

from testdata import datagen
from prep.sources import SOURCES, SourceError, SourceItem, get_source
from prep.sources.base import Source
from prep.sources.cifar10 import CifarRef
from prep.sources.cifar_pickle import Refused, safe_unpickle
from prep.sources.image_folder import val_count, val_members
from prep.transform import RejectError, prepare_image

PER_BATCH, TEST = 6, 5


def _extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _shuffled(items, seed: int = 0) -> list[SourceItem]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def _cifar_keys(binary: bool) -> set[str]:
    ext = ".bin" if binary else ""
    keys = {f"data_batch_{b}{ext}:{r}" for b in range(1, 6) for r in range(PER_BATCH)}
    return keys | {f"test_batch{ext}:{r}" for r in range(TEST)}


# --------------------------------------------------------------------------- cifar10


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("cifar")
    py = datagen.make_cifar10_python(root / "py" / "cifar-10-python.tar.gz",
                                     train_per_batch=PER_BATCH, test=TEST, seed=7)
    binary = datagen.make_cifar10_binary(root / "bin" / "cifar-10-binary.tar.gz",
                                         train_per_batch=PER_BATCH, test=TEST, seed=7)
    _extract(py.path, root / "py-extracted")
    _extract(binary.path, root / "bin-extracted")
    return {"root": root, "py": py, "bin": binary}


CIFAR_LAYOUTS = {
    "python archive": ("py/cifar-10-python.tar.gz", False),
    "folder holding the python archive": ("py", False),
    "binary archive": ("bin/cifar-10-binary.tar.gz", True),
    "extracted python folder's parent": ("py-extracted", False),
    "extracted python folder": ("py-extracted/cifar-10-batches-py", False),
    "extracted binary folder": ("bin-extracted/cifar-10-batches-bin", True),
}


@pytest.mark.parametrize("layout", list(CIFAR_LAYOUTS))
def test_cifar10_lists_and_loads_every_layout(cifar: dict, layout: str) -> None:
    rel, binary = CIFAR_LAYOUTS[layout]
    made = cifar["py"]
    assert np.array_equal(made.train_images, cifar["bin"].train_images)  # same seed, same data
    source = get_source("cifar10", str(cifar["root"] / rel))
    listing = source.list()

    assert listing.class_names == datagen.CIFAR_CLASSES
    assert listing.native_size == 32
    assert listing.splits == {"test": TEST, "train": 5 * PER_BATCH}
    assert {it.key for it in listing.items} == _cifar_keys(binary)
    assert listing.rejects == ()
    for item in listing.items:
        assert item.label == made.lookup(item.key)[1]
        assert item.split == ("test" if item.key.startswith("test_batch") else "train")

    # Loading happens in a Ray task: a pickled copy, items in shuffled order.
    remote = pickle.loads(pickle.dumps(source))
    order = _shuffled(listing.items)
    loaded = list(remote.load(order))
    assert [it for it, _ in loaded] == order
    for item, image in loaded:
        assert isinstance(image, np.ndarray)
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3) and image.flags.c_contiguous
        np.testing.assert_array_equal(image, made.lookup(item.key)[0])


def test_cifar10_generated_python_archive_uses_python2_opcodes(cifar: dict) -> None:
    with tarfile.open(cifar["py"].path) as tar:
        data = tar.extractfile("cifar-10-batches-py/data_batch_1").read()  # type: ignore[union-attr]
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    globals_ = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= ops
    assert not ops & {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    batch = safe_unpickle(data)
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert isinstance(batch[b"labels"], list) and batch[b"data"].shape == (PER_BATCH, 3072)


def test_cifar10_reads_python3_protocol2_pickles(tmp_path: Path) -> None:
    made = datagen.make_cifar10_python(tmp_path / "cifar-10-python.tar.gz",
                                       train_per_batch=PER_BATCH, test=TEST, seed=3, style="py3")
    source = get_source("cifar10", str(made.path))
    listing = source.list()
    assert len(listing.items) == 5 * PER_BATCH + TEST
    for item, image in source.load(listing.items):
        np.testing.assert_array_equal(image, made.lookup(item.key)[0])


def test_cifar10_reads_batches_holding_plain_lists(tmp_path: Path) -> None:
    made = datagen.make_cifar10_python(tmp_path / "a.tar.gz", train_per_batch=PER_BATCH,
                                       test=TEST, seed=5)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {"label_names": list(datagen.CIFAR_CLASSES)}, protocol=4))
    for name in (*[f"data_batch_{b}" for b in range(1, 6)], "test_batch"):
        keys = [f"{name}:{r}" for r in range(TEST if name == "test_batch" else PER_BATCH)]
        rows = [made.lookup(k)[0].transpose(2, 0, 1).reshape(-1).tolist() for k in keys]
        (folder / name).write_bytes(pickle.dumps(
            {"labels": [made.lookup(k)[1] for k in keys], "data": rows}, protocol=4))
    source = get_source("cifar10", str(folder))
    listing = source.list()
    for item, image in source.load(listing.items):
        np.testing.assert_array_equal(image, made.lookup(item.key)[0])
        assert item.label == made.lookup(item.key)[1]


@pytest.mark.parametrize("call", ["os.system", "builtins.eval"])
def test_cifar10_refuses_booby_trapped_pickle_without_running_it(tmp_path: Path, call: str) -> None:
    marker = tmp_path / "PWNED"
    archive = datagen.make_booby_trapped_cifar(tmp_path / "cifar-10-python.tar.gz",
                                               marker=str(marker), call=call)  # type: ignore[arg-type]
    with pytest.raises(SourceError) as err:
        get_source("cifar10", str(archive)).list()
    message = str(err.value)
    assert re.fullmatch(
        r"cifar10: data_batch_1 in \S+cifar-10-python\.tar\.gz holds a pickle that references "
        r"(posix|os|builtins|__builtin__)\.(system|eval); refusing to unpickle it", message), message
    assert "\n" not in message

    # A task handed an item of that batch refuses it too.
    item = SourceItem("data_batch_1:0", "train", 0,
                      CifarRef("", "cifar-10-batches-py/data_batch_1", 0))
    with pytest.raises(SourceError, match="refusing to unpickle"):
        list(get_source("cifar10", str(archive)).load([item]))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(np.array([1, "a"], dtype=object), protocol=2),
    pickle.dumps(np.zeros(2, dtype=[("a", "u1")]), protocol=4),
    pickle.dumps({"x": __import__("collections").OrderedDict()}, protocol=4),
    b"cos\nsystem\n(S'true'\ntR.",
    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04exec\x93.",
])
def test_restricted_unpickler_refuses_anything_but_plain_arrays(payload: bytes) -> None:
    with pytest.raises(Refused):
        safe_unpickle(payload)


def test_restricted_unpickler_reads_plain_arrays_in_every_protocol() -> None:
    arr = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        out = safe_unpickle(pickle.dumps({b"data": arr, b"n": np.int64(3)}, protocol=protocol))
        np.testing.assert_array_equal(out[b"data"], arr)
        assert out[b"n"] == 3


def test_cifar10_bad_sources_are_one_line_errors(tmp_path: Path, cifar: dict) -> None:
    with pytest.raises(SourceError, match="not found"):
        get_source("cifar10", str(tmp_path / "nowhere")).list()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(SourceError, match="not a readable tar archive"):
        get_source("cifar10", str(tmp_path / "junk.tar.gz")).list()
    partial = shutil.copytree(cifar["root"] / "py-extracted" / "cifar-10-batches-py", tmp_path / "partial")
    (partial / "data_batch_3").unlink()
    with pytest.raises(SourceError, match="lacks data_batch_3"):
        get_source("cifar10", str(partial)).list()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds neither"):
        get_source("cifar10", str(tmp_path / "empty")).list()


def test_cifar10_out_of_range_label_is_a_listing_reject(tmp_path: Path, cifar: dict) -> None:
    folder = shutil.copytree(cifar["root"] / "bin-extracted" / "cifar-10-batches-bin", tmp_path / "b")
    raw = bytearray((folder / "data_batch_2.bin").read_bytes())
    raw[3073 * 4] = 12  # label byte of row 4
    (folder / "data_batch_2.bin").write_bytes(bytes(raw))
    listing = get_source("cifar10", str(folder)).list()
    assert listing.rejects == (("data_batch_2.bin:4", "label 12 outside 0..9"),)
    assert len(listing.items) == 5 * PER_BATCH + TEST - 1


# --------------------------------------------------------------------------- tiny-imagenet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tiny")
    kwargs = dict(classes=4, train_per_class=5, val_per_class=3, seed=11)
    folder = datagen.make_tiny_imagenet(root / "folder", **kwargs)
    zipped = datagen.make_tiny_imagenet(root / "zipped", zip=True, **kwargs)
    return {"root": root, "folder": folder, "zip": zipped}


TINY_LAYOUTS = {
    "zip": "zipped/tiny-imagenet-200.zip",
    "folder holding the zip": "zipped",
    "extracted folder": "folder/tiny-imagenet-200",
    "extracted folder's parent": "folder",
}


@pytest.mark.parametrize("layout", list(TINY_LAYOUTS))
def test_tiny_imagenet_lists_and_loads_every_layout(tiny: dict, layout: str) -> None:
    made = tiny["zip"]
    assert made.labels == tiny["folder"].labels
    source = get_source("tiny-imagenet", str(tiny["root"] / TINY_LAYOUTS[layout]))
    listing = source.list()

    assert listing.class_names == made.class_names  # first synonym in words.txt
    assert listing.native_size == 64
    assert listing.splits == {"train": 20, "val": 12}
    assert {it.key: it.label for it in listing.items} == made.labels
    assert any("test split skipped (12 unlabelled images)" in n for n in listing.notes)
    assert listing.rejects == ()
    for item in listing.items:
        assert item.key.startswith(f"tiny-imagenet-200/{item.split}/")
        if item.split == "train":  # label = position of the wnid in wnids.txt
            assert item.label == made.wnids.index(item.key.split("/")[2])

    order = _shuffled(listing.items)
    loaded = list(pickle.loads(pickle.dumps(source)).load(order))
    assert [it for it, _ in loaded] == order
    for item, payload in loaded:
        assert isinstance(payload, bytes) and payload[:2] == b"\xff\xd8"
        image = prepare_image(payload, None)
        assert image.shape == (64, 64, 3)
        if item.key in made.grayscale:
            assert (image[..., 0] == image[..., 1]).all()


def test_tiny_imagenet_zip_is_read_in_place(tiny: dict, tmp_path: Path) -> None:
    copy = tmp_path / "tiny-imagenet-200.zip"
    shutil.copy(tiny["zip"].path, copy)
    before = set(tmp_path.iterdir())
    source = get_source("tiny-imagenet", str(copy))
    list(source.load(source.list().items))
    assert set(tmp_path.iterdir()) == before


def test_tiny_imagenet_annotation_problems_are_rejects(tiny: dict, tmp_path: Path) -> None:
    root = shutil.copytree(tiny["folder"].path, tmp_path / "tiny-imagenet-200")
    ann = root / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[0] = lines[0].replace(lines[0].split("\t")[1], "n99999999")
    lines.append("val_999.JPEG\tn99999999\t0\t0\t1\t1")
    ann.write_text("\n".join(lines[:-2] + lines[-1:]) + "\n")  # drops one annotation
    dropped = lines[-2].split("\t")[0]
    listing = get_source("tiny-imagenet", str(root)).list()
    reasons = dict(listing.rejects)
    prefix = "tiny-imagenet-200/val/images/"
    assert reasons[prefix + lines[0].split("\t")[0]] == (
        "class n99999999 from val_annotations.txt is not in wnids.txt")
    assert reasons[prefix + "val_999.JPEG"] == "listed in val/val_annotations.txt but missing"
    assert reasons[prefix + dropped] == "not listed in val/val_annotations.txt"
    assert listing.splits == {"train": 20, "val": 10}


def test_tiny_imagenet_missing_metadata_is_an_error(tiny: dict, tmp_path: Path) -> None:
    root = shutil.copytree(tiny["folder"].path, tmp_path / "tiny-imagenet-200")
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(SourceError, match=r"no val/val_annotations\.txt"):
        get_source("tiny-imagenet", str(root)).list()
    (root / "wnids.txt").unlink()
    with pytest.raises(SourceError, match=r"neither tiny-imagenet-200\.zip nor a folder with wnids\.txt"):
        get_source("tiny-imagenet", str(root)).list()


# --------------------------------------------------------------------------- image-folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return datagen.make_image_folder(tmp_path_factory.mktemp("folder") / "photos", classes=3,
                                     per_class=6, size=(96, 64), seed=2)


def _expected_items(made: dict) -> dict[str, int]:
    return {rel: info["label"] for rel, info in made["files"].items()}


def test_image_folder_without_split_folders(folder: dict) -> None:
    source = get_source("image-folder", str(folder["root"]))
    listing = source.list()
    assert listing.class_names == tuple(folder["classes"])
    assert listing.native_size is None
    assert {it.key: it.label for it in listing.items} == _expected_items(folder)
    assert dict(listing.rejects) == folder["listing_rejects"]
    assert not set(folder["hidden"]) & {it.key for it in listing.items}
    val = val_members(folder["files"], 0.1)
    for item in listing.items:
        assert item.split == ("val" if item.key in val else "train")
    assert set(listing.splits) <= {"train", "val"}

    # The split is a function of the path alone: same listing every time.
    assert get_source("image-folder", str(folder["root"])).list() == listing
    half = get_source("image-folder", str(folder["root"]), val_fraction=0.5).list()
    assert 0 < half.splits["val"] < len(half.items)


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    made = datagen.make_image_folder(tmp_path / "photos", classes=2, per_class=5, size=(80, 60),
                                     splits=True, seed=4)
    listing = get_source("image-folder", str(made["root"])).list()
    assert listing.splits == {"test": 2, "train": 5 * 2 + len(made["special"]) + len(made["rejects"]),
                              "val": 2}
    assert {it.key: it.label for it in listing.items} == _expected_items(made)
    for item in listing.items:
        assert item.split == item.key.split("/")[0] == made["files"][item.key]["split"]
    assert listing.class_names == tuple(made["classes"])
    assert "split folders used as splits" in listing.notes[0]
    assert listing.val_split == "val"
    # Without a val folder, a validation folder validates, else test; train alone: none.
    shutil.rmtree(made["root"] / "val")
    assert get_source("image-folder", str(made["root"])).list().val_split == "test"
    (made["root"] / "test").rename(made["root"] / "Validation")
    assert get_source("image-folder", str(made["root"])).list().val_split == "Validation"
    shutil.rmtree(made["root"] / "Validation")
    assert get_source("image-folder", str(made["root"])).list().val_split is None


def test_image_folder_outcomes_through_the_transform(folder: dict) -> None:
    source = get_source("image-folder", str(folder["root"]))
    outcomes = {}
    for item, payload in source.load(source.list().items):
        assert isinstance(payload, bytes)
        try:
            image = prepare_image(payload, 48)
        except RejectError as exc:
            outcomes[item.key] = exc.reason
        else:
            assert image.shape == (48, 48, 3) and image.dtype == np.uint8
            outcomes[item.key] = "ok"
    for rel, info in folder["files"].items():
        assert outcomes[rel].startswith(info["expect"]), (rel, outcomes[rel])


def test_image_folder_any_fsspec_url(folder: dict) -> None:
    fs = fsspec.filesystem("memory")
    base = f"/formatlab-test-{uuid.uuid4().hex}"
    try:
        for path in Path(folder["root"]).rglob("*"):
            if path.is_file():
                fs.pipe_file(f"{base}/{path.relative_to(folder['root']).as_posix()}", path.read_bytes())
        source = get_source("image-folder", f"memory://{base}")
        listing = source.list()
        assert {it.key: it.label for it in listing.items} == _expected_items(folder)
        for item, payload in pickle.loads(pickle.dumps(source)).load(_shuffled(listing.items)):
            assert payload == (Path(folder["root"]) / item.key).read_bytes()
    finally:
        fs.rm(base, recursive=True)


def test_image_folder_unreadable_file_is_yielded_as_an_exception(tmp_path: Path) -> None:
    made = datagen.make_image_folder(tmp_path / "p", classes=2, per_class=2, size=(40, 30),
                                     odd_files=False)
    source = get_source("image-folder", str(made["root"]))
    items = source.list().items
    (Path(made["root"]) / items[1].key).unlink()
    results = list(source.load(items))
    assert [it for it, _ in results] == list(items)
    assert isinstance(results[1][1], Exception)
    assert all(isinstance(p, bytes) for i, (_, p) in enumerate(results) if i != 1)


def test_image_folder_bad_urls(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no files"):
        get_source("image-folder", str(tmp_path / "empty")).list()
    with pytest.raises(SourceError, match="not found"):
        get_source("image-folder", str(tmp_path / "missing")).list()
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(SourceError, match="is not a folder"):
        get_source("image-folder", str(tmp_path / "file.jpg")).list()


# --------------------------------------------------------------------------- registry


def test_registry_names_and_errors() -> None:
    assert list(SOURCES) == ["cifar10", "tiny-imagenet", "image-folder"]
    assert all(issubclass(cls, Source) and cls.name == name for name, cls in SOURCES.items())
    with pytest.raises(SourceError, match="unknown source 'mnist'; valid sources: cifar10, "
                                          "tiny-imagenet, image-folder"):
        get_source("mnist", "/tmp")
    with pytest.raises(SourceError, match="cifar10: does not take option val_fraction"):
        get_source("cifar10", "/tmp", val_fraction=0.2)
    assert isinstance(get_source("cifar10", "/tmp", val_fraction=None), SOURCES["cifar10"])
    with pytest.raises(SourceError, match="val_fraction must be in"):
        get_source("image-folder", "/tmp", val_fraction=1.5)


def test_sources_pickle_without_their_filesystem(folder: dict) -> None:
    source = get_source("image-folder", str(folder["root"]), {"anon": True})
    source.list()
    assert source._store is not None
    clone = pickle.loads(pickle.dumps(source))
    assert clone._store is None and clone.storage_options == {"anon": True}
    assert clone.val_fraction == source.val_fraction


def test_source_errors_hide_credentials() -> None:
    source = get_source("image-folder", "memory://user:hunter2secret@/nothing-here")
    with pytest.raises(SourceError) as err:
        source.list()
    assert "hunter2secret" not in str(err.value)


def test_zip_members_survive_a_corrupt_member(tiny: dict, tmp_path: Path) -> None:
    # A damaged member becomes that item's exception; the rest still load.
    broken = tmp_path / "tiny-imagenet-200.zip"
    shutil.copy(tiny["zip"].path, broken)
    source = get_source("tiny-imagenet", str(broken))
    items = source.list().items
    with zipfile.ZipFile(broken) as zf:
        info = zf.getinfo(items[0].ref.path)  # type: ignore[union-attr]
    raw = bytearray(broken.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + 5] ^= 0xFF  # flips a byte of the data
    broken.write_bytes(bytes(raw))
    results = dict((it.key, p) for it, p in get_source("tiny-imagenet", str(broken)).load(items[:3]))
    assert isinstance(results[items[0].key], Exception)
    assert isinstance(results[items[1].key], bytes)


def test_every_source_reads_from_s3(s3_server, s3_bucket: str, cifar: dict, tiny: dict,
                                    folder: dict) -> None:
    bucket_dir = s3_server.root / s3_bucket.removeprefix("s3://")
    shutil.copy(cifar["py"].path, bucket_dir / "cifar-10-python.tar.gz")
    shutil.copy(tiny["zip"].path, bucket_dir / "tiny-imagenet-200.zip")
    shutil.copytree(folder["root"], bucket_dir / "photos")
    options = s3_server.storage_options
    cases = [
        ("cifar10", f"{s3_bucket}/cifar-10-python.tar.gz"),
        ("tiny-imagenet", f"{s3_bucket}/tiny-imagenet-200.zip"),
        ("image-folder", f"{s3_bucket}/photos"),
    ]
    for name, url in cases:
        source = get_source(name, url, options)
        listing = source.list()
        loaded = list(pickle.loads(pickle.dumps(source)).load(_shuffled(listing.items)))
        assert len(loaded) == len(listing.items)
        for item, payload in loaded:
            if name == "cifar10":
                np.testing.assert_array_equal(payload, cifar["py"].lookup(item.key)[0])
            elif name == "tiny-imagenet":
                assert item.label == tiny["zip"].labels[item.key] and payload[:2] == b"\xff\xd8"
            else:
                assert payload == (Path(folder["root"]) / item.key).read_bytes()
    with pytest.raises(SourceError) as err:
        get_source("cifar10", f"{s3_bucket}/missing.tar.gz", options).list()
    assert options["secret"] not in str(err.value)


def test_image_folder_val_split_is_stratified_by_class(tmp_path: Path) -> None:
    """Every class gets round(f * n) val files (at least one, never all), chosen by the
    lowest path hashes within the class; the same listing every time."""
    import hashlib

    sizes = {"cat": 30, "dog": 7, "owl": 2, "yak": 1}
    for cls, n in sizes.items():
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i:03d}.jpg").write_bytes(b"x")
    listing = get_source("image-folder", str(tmp_path), val_fraction=0.1).list()
    val = {it.key for it in listing.items if it.split == "val"}
    per_class = {cls: sum(k.startswith(f"{cls}/") for k in val) for cls in sizes}
    assert per_class == {"cat": 3, "dog": 1, "owl": 1, "yak": 0}
    assert [val_count(n, 0.1) for n in (30, 7, 2, 1)] == [3, 1, 1, 0]
    for cls in sizes:
        ranked = sorted((k for k in (it.key for it in listing.items) if k.startswith(f"{cls}/")),
                        key=lambda k: hashlib.sha1(k.encode()).digest())
        assert set(ranked[:per_class[cls]]) == {k for k in val if k.startswith(f"{cls}/")}
    assert get_source("image-folder", str(tmp_path), val_fraction=0.1).list() == listing
    assert val_count(10, 0.0) == 0 and val_count(10, 0.99) == 9
