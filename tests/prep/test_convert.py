"""prep/convert.py end to end: every source, every format, resumable, Ray, S3, outages.

Everything runs on generated data in the sources' real on-disk layouts, small enough for
a busy 2-core machine. Conversions run in-process with ``--address inline`` (no Ray
start-up) except where the process boundary (exit codes, one-line errors, SIGKILL) or
Ray itself is the point. Checks read the written shards back through the format
readers and compare them with what the generators wrote.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from testdata import datagen
from prep.convert import main
from prep.sources.image_folder import val_members
from shared.formats import CATALOG, get_format
from shared.manifest import INDEX_FILE, MANIFEST_FILE, Manifest
from shared.shards import STAGING_DIR, read_index
from shared.storage import Store

REPO = Path(__file__).resolve().parents[2]
CONVERT = str(REPO / "prep" / "convert.py")

# The root conftest under its own name (every conftest.py is "conftest" to pytest).
_spec = importlib.util.spec_from_file_location(
    "_formatlab_root_conftest_convert", REPO / "tests" / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _root
_spec.loader.exec_module(_root)  # type: ignore[union-attr]
free_port, start_s3_server = _root.free_port, _root.start_s3_server

PER_BATCH, TEST = 40, 40  # CIFAR: 200 train + 40 test
SHARD = 64
# Mean PSNR floors on noisy, saturated 32x32 images (JPEG subsamples chroma 4:2:0).
LOSSY_FLOOR_DB = {"jpeg-q95": 29.0, "jpeg-q95-444": 29.0, "jpeg-q75": 26.0, "jp2-lossy": 35.0, "webp-q90": 29.0}
_SHARD_META = b"formatlab.shard"


# --------------------------------------------------------------------------- helpers


def convert(argv: Sequence[str], capsys: pytest.CaptureFixture[str] | None = None
            ) -> tuple[int, str]:
    """Run ``main`` in-process (inline unless ``--address`` is given); exit code, output."""
    argv = list(argv)
    if "--address" not in argv:
        argv += ["--address", "inline"]
    if capsys is not None:
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out + err
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = main(argv)
    return code, buf.getvalue()


def run_cli(argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python prep/convert.py ...`` in a child process."""
    return subprocess.run([sys.executable, CONVERT, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("convert: error:")]


def assert_one_line_error(stderr: str) -> str:
    """Exactly one ``convert: error:`` line and no traceback; returns that line."""
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


def cifar_args(src: Path | str, dst: Path | str, formats: str, *extra: str) -> list[str]:
    return ["--source", "cifar10", "--src", str(src), "--dst", str(dst), "--formats", formats,
            "--shard-samples", str(SHARD), *extra]


@dataclass
class ShardData:
    split: str
    index: int
    keys: list[str]
    labels: list[int]
    images: np.ndarray


def read_format(dataset_dir: Path, manifest: Manifest, format_id: str) -> list[ShardData]:
    """Every shard of one format, in manifest order, read back through its reader."""
    fmt = get_format(format_id)
    out = []
    for entry in manifest.format(format_id).shards:
        table = read_index(dataset_dir / entry.index_path)
        files = table.column("file").to_pylist() if "file" in table.column_names else None
        with fmt.open_reader(dataset_dir / entry.path, files, num_samples=entry.samples) as reader:
            images = (reader.read_batch(list(range(len(reader)))) if entry.samples
                      else np.zeros((0, manifest.height, manifest.width, 3), np.uint8))
        assert len(table) == entry.samples == len(images)
        out.append(ShardData(entry.split, entry.index, table.column("key").to_pylist(),
                             table.column("label").to_pylist(), np.asarray(images)))
    return out


def keys_by_split(shards: list[ShardData]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in shards:
        out.setdefault(s.split, []).extend(s.keys)
    return out


def assert_exactly_once(dataset_dir: Path, manifest: Manifest,
                        expected: dict[str, set[str]]) -> dict[str, list[ShardData]]:
    """Every format holds each expected key exactly once, in its split, in the same
    shards and order as every other format; the manifest counts agree."""
    assert {s.name: s.samples for s in manifest.splits} == {k: len(v) for k, v in expected.items()}
    data = {fid: read_format(dataset_dir, manifest, fid) for fid in manifest.format_ids}
    reference = None
    for fid, shards in data.items():
        by_split = keys_by_split(shards)
        for split, keys in by_split.items():
            assert len(keys) == len(set(keys)), f"{fid}/{split}: duplicate samples"
        assert {k: set(v) for k, v in by_split.items()} == expected, fid
        layout = [(s.split, s.index, s.keys, s.labels) for s in shards]
        if reference is None:
            reference = layout
        assert layout == reference, f"{fid}: shards differ from {manifest.format_ids[0]}"
    return data


def assert_no_index_without_data(dataset_dir: Path) -> int:
    """Each ``index.parquet`` present has every file it names, with the recorded size.

    Returns the number of committed shard indexes found.
    """
    count = 0
    for index in dataset_dir.rglob(INDEX_FILE):
        if STAGING_DIR in index.relative_to(dataset_dir).parts:
            continue
        count += 1
        shard = index.parent
        table = pq.read_table(index)
        if "file" in table.column_names:
            for name, size in zip(table.column("file").to_pylist(),
                                  table.column("bytes").to_pylist(), strict=True):
                assert (shard / name).is_file(), f"{index}: {name} missing"
                assert (shard / name).stat().st_size == size, f"{index}: {name} size"
        meta = json.loads(table.schema.metadata[_SHARD_META])
        for extra in meta["files"]:
            path = shard / extra["path"]
            assert path.is_file(), f"{index}: {extra['path']} missing"
            assert path.stat().st_size == extra["bytes"], f"{index}: {extra['path']} size"
    return count


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def grep_tree(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def first_index(root: Path) -> bool:
    if not root.exists():
        return False
    return any(STAGING_DIR not in p.parts for p in root.rglob(INDEX_FILE))


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert-data")


@pytest.fixture(scope="module")
def cifar(data: Path) -> datagen.GeneratedCifar:
    return datagen.make_cifar10_python(data / "cifar-10-python.tar.gz",
                                       train_per_batch=PER_BATCH, test=TEST, seed=3)


def cifar_expected(gen: datagen.GeneratedCifar, binary: bool = False) -> dict[str, set[str]]:
    ext = ".bin" if binary else ""
    train = {f"data_batch_{b}{ext}:{r}" for b in range(1, 6) for r in range(gen.train_per_batch)}
    return {"train": train, "test": {f"test_batch{ext}:{r}" for r in range(len(gen.test_labels))}}


def assert_cifar_pixels(data: dict[str, list[ShardData]], gen: datagen.GeneratedCifar) -> None:
    """Lossless formats bit-exact against the generated pixels, lossy above a floor,
    labels as generated, label counts intact."""
    expected_counts = Counter(gen.train_labels.tolist()) + Counter(gen.test_labels.tolist())
    for fid, shards in data.items():
        fmt = get_format(fid)
        counts: Counter[int] = Counter()
        scores: list[float] = []
        for shard in shards:
            for key, label, image in zip(shard.keys, shard.labels, shard.images, strict=True):
                ref, ref_label = gen.lookup(key)
                assert label == ref_label, f"{fid} {key}"
                counts[label] += 1
                assert image.shape == (32, 32, 3) and image.dtype == np.uint8
                if fmt.lossless:
                    assert np.array_equal(image, ref), f"{fid} {key}: not bit-exact"
                else:
                    scores.append(psnr(image, ref))
        assert counts == expected_counts, fid
        if not fmt.lossless:
            mean, worst = float(np.mean(scores)), min(scores)
            floor = LOSSY_FLOOR_DB[fid]
            assert mean >= floor, f"{fid}: mean PSNR {mean:.1f} dB < {floor} dB"
            assert worst >= floor - 10, f"{fid}: one image at {worst:.1f} dB"


# --------------------------------------------------------------------------- 1. all formats


@dataclass
class Converted:
    gen: datagen.GeneratedCifar
    store: Path
    results: Path
    manifest: Manifest
    output: str

    @property
    def dataset(self) -> Path:
        return self.store / "cifar10"


@pytest.fixture(scope="module")
def cifar_all(data: Path, cifar: datagen.GeneratedCifar) -> Converted:
    store, results = data / "all-store", data / "all-results"
    code, output = convert(cifar_args(cifar.path, store, "all", "--results", str(results)))
    assert code == 0, output
    return Converted(cifar, store, results, Manifest.load(Store.open(str(store)), "cifar10"),
                     output)


def test_all_formats_manifest(cifar_all: Converted) -> None:
    m = cifar_all.manifest
    assert m.format_ids == CATALOG
    assert {s.name: s.samples for s in m.splits} == {"train": 5 * PER_BATCH, "test": TEST}
    assert m.class_names == datagen.CIFAR_CLASSES
    assert m.val_split == "test"  # recorded from the source, not guessed by the node
    assert (m.height, m.width, m.channels, m.dtype) == (32, 32, 3, "uint8")
    assert m.source_kind == "cifar10" and m.rejects == () and m.shard_samples == SHARD
    # train 200 -> 64 + 64 + 64 + 8, test 40 -> 40
    for f in m.formats:
        assert [(s.split, s.index, s.samples) for s in f.shards] == [
            ("test", 0, 40), ("train", 0, 64), ("train", 1, 64), ("train", 2, 64), ("train", 3, 8)]
        assert f.total_bytes == sum(s.bytes for s in f.shards) > 0
    text = (cifar_all.dataset / MANIFEST_FILE).read_text()
    assert STAGING_DIR not in text
    assert not (cifar_all.dataset / STAGING_DIR).exists()
    assert "(0 already committed)" in flat(cifar_all.output)


def test_all_formats_same_samples_and_pixels(cifar_all: Converted) -> None:
    data = assert_exactly_once(cifar_all.dataset, cifar_all.manifest,
                               cifar_expected(cifar_all.gen))
    assert_cifar_pixels(data, cifar_all.gen)
    assert assert_no_index_without_data(cifar_all.dataset) == len(CATALOG) * 5


def test_shards_are_shuffled(cifar_all: Converted) -> None:
    first = read_format(cifar_all.dataset, cifar_all.manifest, "npy")[1]
    assert (first.split, first.index) == ("train", 0)
    # Listed in source order, shard 0 would be data_batch_1's 40 rows and 24 of batch 2.
    assert len({k.split(":")[0] for k in first.keys}) == 5
    assert first.keys != sorted(first.keys, key=lambda k: (k.split(":")[0], int(k.split(":")[1])))
    assert len(set(first.labels)) >= 8


def test_results_conversions_rows(cifar_all: Converted) -> None:
    import pandas as pd

    df = pd.read_parquet(cifar_all.results / "conversions")
    assert len(df) == len(CATALOG) * 2
    assert sorted(zip(df["format"], df["split"])) == sorted(
        (f, s) for f in CATALOG for s in ("train", "test"))
    assert set(df.loc[df["split"] == "train", "samples"]) == {5 * PER_BATCH}
    assert set(df.loc[df["split"] == "test", "samples"]) == {TEST}
    assert (df["bytes"] > 0).all() and (df["dataset"] == "cifar10").all()
    assert df["job_id"].nunique() == 1


# --------------------------------------------------------------------------- 2. sources


def test_cifar_binary_archive_and_extracted_folder(tmp_path: Path) -> None:
    binary = datagen.make_cifar10_binary(tmp_path / "cifar-10-binary.tar.gz",
                                         train_per_batch=PER_BATCH, test=TEST, seed=4)
    py = datagen.make_cifar10_python(tmp_path / "py.tar.gz", train_per_batch=PER_BATCH,
                                     test=TEST, seed=5)
    with tarfile.open(py.path) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    for gen, src, is_bin in ((binary, binary.path, True),
                             (py, tmp_path / "extracted" / "cifar-10-batches-py", False)):
        store = tmp_path / f"store-{is_bin}"
        code, output = convert(cifar_args(src, store, "png,npy,jpeg-q95"))
        assert code == 0, output
        m = Manifest.load(Store.open(str(store)), "cifar10")
        assert m.class_names == datagen.CIFAR_CLASSES
        shards = assert_exactly_once(store / "cifar10", m, cifar_expected(gen, is_bin))
        assert_cifar_pixels(shards, gen)


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_tiny_imagenet(tmp_path: Path, as_zip: bool,
                       capsys: pytest.CaptureFixture[str]) -> None:
    gen = datagen.make_tiny_imagenet(tmp_path / "raw", classes=4, train_per_class=8,
                                     val_per_class=3, test_images=5, zip=as_zip, seed=2)
    assert gen.grayscale  # some JPEGs are single-channel, as in the real set
    store = tmp_path / "store"
    code, output = convert(["--source", "tiny-imagenet", "--src", str(gen.path),
                            "--dst", str(store), "--formats", "all"], capsys)
    assert code == 0, output
    assert "test split skipped (5 unlabelled images)" in flat(output)
    m = Manifest.load(Store.open(str(store)), "tiny-imagenet")
    assert m.val_split == "val"
    assert (m.height, m.width) == (64, 64) and m.resize.startswith("native")
    assert m.class_names == gen.class_names
    expected = {"train": {k for k in gen.labels if "/train/" in k},
                "val": {k for k in gen.labels if "/val/" in k}}
    assert {s: len(v) for s, v in expected.items()} == gen.splits
    shards = assert_exactly_once(store / "tiny-imagenet", m, expected)

    def source_bytes(key: str) -> bytes:
        if as_zip:
            with zipfile.ZipFile(gen.path) as zf:
                return zf.read(key)
        return (gen.path.parent / key).read_bytes()

    for fid, fshards in shards.items():
        for shard in fshards:
            for key, label, image in zip(shard.keys, shard.labels, shard.images, strict=True):
                assert label == gen.labels[key]
                with Image.open(io.BytesIO(source_bytes(key))) as src:
                    ref = np.asarray(src.convert("RGB"))
                if get_format(fid).lossless:  # native size: exact decode
                    assert np.array_equal(image, ref), f"{fid} {key}"
                else:
                    assert psnr(image, ref) > 20, f"{fid} {key}"
                if key in gen.grayscale and get_format(fid).lossless:
                    assert image.shape == (64, 64, 3)
                    assert np.array_equal(image[..., 0], image[..., 1])
                    assert np.array_equal(image[..., 0], image[..., 2])


def _square(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size``, centre crop: the resize policy, done independently."""
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, box=box))


def test_image_folder_odd_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made = datagen.make_image_folder(tmp_path / "raw", classes=3, per_class=6, size=(96, 72),
                                     seed=1)
    root: Path = made["root"]
    store = tmp_path / "store"
    code, output = convert(["--source", "image-folder", "--src", str(root), "--dst", str(store),
                            "--size", "48", "--formats", "all", "--shard-samples", "8"],
                           capsys)
    assert code == 0, output
    m = Manifest.load(Store.open(str(store)), "image-folder")
    assert m.val_split == "val"  # recorded: the split the source drew for validation
    assert (m.height, m.width) == (48, 48)
    assert m.class_names == tuple(made["classes"])

    # Rejected, each with its documented reason; listing rejects too.
    reasons = {r.key: r.reason for r in m.rejects}
    documented = {**made["rejects"], **made["listing_rejects"]}
    assert set(reasons) == set(documented)
    for key, start in documented.items():
        assert reasons[key].startswith(start), (key, reasons[key])
        assert key in flat(output)
    # Everything else converted, exactly once, in its hash-chosen split.
    expected: dict[str, set[str]] = {}
    val = val_members(made["files"], 0.1)
    for rel, info in made["files"].items():
        if info["expect"] == "ok":
            expected.setdefault("val" if rel in val else "train", set()).add(rel)
    shards = assert_exactly_once(store / "image-folder", m, expected)
    assert not any(h in reasons or h in output for h in made["hidden"])

    images: dict[str, np.ndarray] = {}
    for shard in shards["npy"]:
        for key, label, image in zip(shard.keys, shard.labels, shard.images, strict=True):
            assert label == made["files"][key]["label"]
            images[key] = image
    for fid in CATALOG:  # every format holds the npy pixels: exactly, or above a floor
        for shard in shards[fid]:
            for key, image in zip(shard.keys, shard.images, strict=True):
                if get_format(fid).lossless:
                    assert np.array_equal(image, images[key]), (fid, key)
                else:
                    assert psnr(image, images[key]) > 20, (fid, key)
    # A class-sorted folder does not give class-sorted shards.
    first_train = next(s for s in shards["npy"] if s.split == "train" and s.index == 0)
    assert len(set(first_train.labels)) >= 2

    special = made["special"]
    assert set(special) == {"cmyk", "gray", "i16", "palette", "palette_alpha", "rgba",
                            "exif_rotated"}
    for kind, rel in special.items():
        assert images[rel].shape == (48, 48, 3) and images[rel].dtype == np.uint8, kind
    with Image.open(root / special["palette"]) as im:
        base = _square(im.convert("RGB"), 48)  # the palette photo is the shared base image
    # 16-bit: the top byte of the green channel, as gray.
    deep = images[special["i16"]]
    assert np.array_equal(deep[..., 0], deep[..., 1]) and np.array_equal(deep[..., 0], deep[..., 2])
    assert np.abs(deep[..., 0].astype(int) - base[..., 1]).mean() < 6
    gray = images[special["gray"]]
    assert np.array_equal(gray[..., 0], gray[..., 2])
    assert np.abs(images[special["palette"]].astype(int) - base).mean() < 3
    assert np.abs(images[special["cmyk"]].astype(int) - base).mean() < 25
    # Alpha composited onto white: the left half of the photo is fully transparent.
    rgba = images[special["rgba"]]
    assert (rgba[:, :20] == 255).all()
    assert np.abs(rgba[:, 28:].astype(int) - base[:, 28:]).mean() < 6
    with Image.open(root / special["palette_alpha"]) as im:
        rgba_pal = im.convert("RGBA")
    assert rgba_pal.getchannel("A").getextrema()[0] == 0  # some pixels are transparent
    on_white = Image.alpha_composite(Image.new("RGBA", rgba_pal.size, "white"), rgba_pal)
    assert np.abs(images[special["palette_alpha"]].astype(int) - _square(on_white, 48)).mean() < 3
    # EXIF orientation applied: matches the rotated view, not the stored pixels.
    with Image.open(root / special["exif_rotated"]) as im:
        assert im.size == made["exif_stored_size"]
        stored = _square(im, 48)
        shown = _square(ImageOps.exif_transpose(im), 48)
    rotated = images[special["exif_rotated"]].astype(int)
    assert np.abs(rotated - shown).mean() < 6
    assert np.abs(rotated - stored).mean() > 3 * np.abs(rotated - shown).mean()


def test_image_folder_max_rejects_zero(tmp_path: Path) -> None:
    made = datagen.make_image_folder(tmp_path / "raw", classes=2, per_class=3, size=(64, 48))
    store = tmp_path / "store"
    proc = run_cli(["--source", "image-folder", "--src", str(made["root"]), "--dst", str(store),
                    "--size", "32", "--formats", "png", "--max-rejects", "0",
                    "--address", "inline"])
    assert proc.returncode == 1, proc.stderr
    line = assert_one_line_error(proc.stderr)
    assert "more than 0 inputs rejected" in line and "--max-rejects" in line
    assert not (store / "image-folder" / MANIFEST_FILE).exists()


def test_booby_trapped_cifar_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    archive = datagen.make_booby_trapped_cifar(tmp_path / "evil.tar.gz", marker=str(marker))
    proc = run_cli(cifar_args(archive, tmp_path / "store", "png", "--address", "inline"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert: error:"), proc.stderr
    assert "refusing to unpickle" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "store" / "cifar10" / MANIFEST_FILE).exists()


def test_bad_arguments(cifar: datagen.GeneratedCifar, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    # Unknown format id: exit 2, one line naming the valid ids (a real process).
    proc = run_cli(cifar_args(cifar.path, tmp_path / "s", "png,gif", "--address", "inline"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'gif'" in lines[0]
    for fid in (*CATALOG, "jpeg-qN"):
        assert fid in lines[0]
    # image-folder without --size; a --src that does not exist.
    (tmp_path / "folder" / "a").mkdir(parents=True)
    cases = [
        (["--source", "image-folder", "--src", str(tmp_path / "folder"),
          "--dst", str(tmp_path / "s"), "--formats", "png"], "--size is required"),
        (cifar_args(tmp_path / "missing.tar.gz", tmp_path / "s", "png"), "not found"),
    ]
    for argv, expect in cases:
        code, output = convert(argv, capsys)
        assert code == 2, output
        lines = output.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], output
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob(MANIFEST_FILE))


# --------------------------------------------------------------------------- 3. resumable


def test_rerun_rewrites_only_missing_shards(cifar: datagen.GeneratedCifar, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    argv = cifar_args(cifar.path, store, "png,npy,hdf5")
    assert convert(argv, capsys)[0] == 0
    dataset = store / "cifar10"
    (dataset / "png" / "train" / "shard-00001" / INDEX_FILE).unlink()
    shutil.rmtree(dataset / "hdf5" / "test" / "shard-00000")
    (dataset / MANIFEST_FILE).unlink()
    kept = dataset / "npy" / "train" / "shard-00002" / "images.npy"
    untouched = kept.stat().st_mtime_ns

    code, output = convert(argv, capsys)
    assert code == 0, output
    assert "5 shards (3 already committed)" in flat(output)
    assert kept.stat().st_mtime_ns == untouched  # a committed shard is not rewritten
    m = Manifest.load(Store.open(str(store)), "cifar10")
    data = assert_exactly_once(dataset, m, cifar_expected(cifar))
    assert_cifar_pixels(data, cifar)
    assert assert_no_index_without_data(dataset) == 3 * 5
    # A third run has nothing left to do.
    code, output = convert(argv, capsys)
    assert code == 0 and "5 shards (5 already committed)" in flat(output)


def test_conversion_figures_per_format(cifar: datagen.GeneratedCifar, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Encode time and rate per format, upload apart; a re-run times only the shards it
    converted (null where none), and one that converts nothing writes no rows."""
    import pandas as pd

    store, results = tmp_path / "store", tmp_path / "results"
    argv = cifar_args(cifar.path, store, "png,npy", "--results", str(results))
    assert convert(argv, capsys)[0] == 0
    first = pd.read_parquet(results / "conversions")
    assert len(first) == 4 and (first["shards_skipped"] == 0).all()
    assert dict(zip(first["split"], first["shards_converted"])) == {"train": 4, "test": 1}
    assert (first["encode_time_s"] > 0).all() and (first["upload_time_s"] > 0).all()
    train = first[first["split"] == "train"].set_index("format")
    for fid in ("png", "npy"):
        assert train.loc[fid, "encode_images_per_s"] == pytest.approx(
            5 * PER_BATCH / train.loc[fid, "encode_time_s"])
    assert train.loc["png", "encode_images_per_s"] != train.loc["npy", "encode_images_per_s"]

    (store / "cifar10" / "png" / "train" / "shard-00001" / INDEX_FILE).unlink()
    assert convert(argv, capsys)[0] == 0
    second = pd.read_parquet(results / "conversions")
    new = second[~second["job_id"].isin(first["job_id"])].set_index(["format", "split"])
    assert len(new) == 4  # every format and split, sizes whole: the latest job is complete
    assert list(new["samples"].sort_index()) == [TEST, 5 * PER_BATCH] * 2
    png = new.loc[("png", "train")]
    assert (png["shards_converted"], png["shards_skipped"]) == (1, 3)
    assert png["encode_images_per_s"] == pytest.approx(SHARD / png["encode_time_s"])
    untouched = new.drop(index=[("png", "train")])
    assert (untouched["shards_converted"] == 0).all()
    assert untouched[["encode_time_s", "encode_images_per_s", "upload_time_s"]].isna().all().all()

    code, output = convert(argv, capsys)
    assert code == 0 and "nothing converted, no rows written" in flat(output)
    assert len(list((results / "conversions").glob("*.parquet"))) == 2


def test_rerun_that_converts_nothing_does_not_measure_quality(
        cifar: datagen.GeneratedCifar, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Quality decodes every sampled image: only a job that converted shards measures it."""
    argv = cifar_args(cifar.path, tmp_path / "store", "jpeg-q75,png")
    code, first = convert(argv, capsys)
    assert code == 0, first
    row = next(line for line in first.splitlines() if "jpeg-q75" in line)
    psnr_cell = re.search(r"\b(\d+\.\d)\b\s*\S\s*0\.\d{4}", row)
    assert psnr_cell, row  # PSNR and SSIM measured on the first run
    assert "not measured" not in first

    code, again = convert(argv, capsys)
    assert code == 0 and "5 shards (5 already committed)" in flat(again), again
    assert "quality: nothing converted, not measured" in again
    row = next(line for line in again.splitlines() if "jpeg-q75" in line)
    assert not re.search(r"0\.\d{4}", row), row  # no SSIM: nothing was decoded

def test_killed_conversion_resumes_exactly(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    made = datagen.make_image_folder(tmp_path / "raw", classes=3, per_class=100, size=(40, 36),
                                     seed=6)
    store = tmp_path / "store"
    argv = ["--source", "image-folder", "--src", str(made["root"]), "--dst", str(store),
            "--size", "32", "--formats", "png,npy,jpeg-q95,hdf5", "--shard-samples", "16",
            "--address", "inline"]
    dataset = store / "image-folder"
    proc = subprocess.Popen([sys.executable, CONVERT, *argv], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: first_index(dataset), 120, proc, "the first committed shard")
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (dataset / MANIFEST_FILE).exists()
    committed = assert_no_index_without_data(dataset)
    assert committed >= 1

    code, output = convert(argv, capsys)
    assert code == 0, output
    assert "already committed" in output
    m = Manifest.load(Store.open(str(store)), "image-folder")
    rejected = set(made["rejects"]) | set(made["listing_rejects"])
    assert {r.key for r in m.rejects} == rejected
    expected: dict[str, set[str]] = {}
    val = val_members(made["files"], 0.1)
    for rel in made["files"]:
        if rel not in rejected:
            expected.setdefault("val" if rel in val else "train", set()).add(rel)
    assert sum(len(v) for v in expected.values()) == len(made["files"]) - len(made["rejects"])
    assert_exactly_once(dataset, m, expected)
    assert assert_no_index_without_data(dataset) == sum(len(f.shards) for f in m.formats)
    assert not (dataset / STAGING_DIR).exists()


# --------------------------------------------------------------------------- 4. real Ray


def _ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    # The job's entrypoint "python" must be this environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def ray_head(start_ray: Callable[..., Any]) -> Iterator[Any]:
    """One local Ray head (no auth, loopback) shared by this module's Ray tests."""
    head = start_ray(_ray_env(), num_cpus=2)
    yield head
    head.stop()


def _driver_logs(head: Any) -> set[str]:
    return {p.name for p in head.temp_dir.glob("session_*/logs/python-core-driver-*")}


@pytest.mark.slow
def test_ray_job_submit(ray_head: Any, cifar: datagen.GeneratedCifar,
                        tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = ray_head.job("submit", "--working-dir", str(REPO), "--", "python",
                        "prep/convert.py",
                        *cifar_args(cifar.path.resolve(), store.resolve(), "png,npy"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    m = Manifest.load(Store.open(str(store)), "cifar10")
    data = assert_exactly_once(store / "cifar10", m, cifar_expected(cifar))
    assert_cifar_pixels(data, cifar)
    # The uploaded package holds the code and not the virtual environment.
    packages = [p for p in ray_head.temp_dir.glob(
        "session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert packages, "no working_dir package found on the head"
    for pkg in packages:
        assert (pkg / "prep" / "convert.py").is_file()
        assert not (pkg / ".venv").exists()


@pytest.mark.slow
def test_standalone_run_joins_head(ray_head: Any, cifar: datagen.GeneratedCifar,
                                   tmp_path: Path) -> None:
    store = tmp_path / "store"
    before = _driver_logs(ray_head)
    proc = run_cli(cifar_args(cifar.path, store, "png,npy", "--address",
                              f"127.0.0.1:{ray_head.gcs_port}"), env=ray_head.env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _driver_logs(ray_head) - before, "the run did not join the running head"
    m = Manifest.load(Store.open(str(store)), "cifar10")
    assert_exactly_once(store / "cifar10", m, cifar_expected(cifar))


@pytest.mark.slow
def test_plan_asks_the_joined_cluster_for_its_cpus(ray_head: Any, cifar: datagen.GeneratedCifar,
                                                   tmp_path: Path) -> None:
    """``--plan`` on a cluster projects to its CPUs (the head has 2) and writes nothing."""
    store = tmp_path / "store"
    before = _driver_logs(ray_head)
    proc = run_cli(cifar_args(cifar.path, store, "png,npy", "--plan", "--address",
                              f"127.0.0.1:{ray_head.gcs_port}"), env=ray_head.env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from 16 sampled inputs, 2 cores" in proc.stdout
    # This machine may have 2 CPUs too: that the cluster was asked shows in its logs.
    assert _driver_logs(ray_head) - before, "the plan did not ask the running head"
    assert not store.exists()


@pytest.mark.slow
def test_ray_worker_killed_mid_task_is_retried(ray_head: Any, tmp_path: Path) -> None:
    """SIGKILL of a Ray worker while it converts a shard: Ray retries the task, the
    retry cleans the half-written shard, and every sample ends up exactly once."""
    import psutil

    gen = datagen.make_cifar10_python(tmp_path / "c.tar.gz", train_per_batch=120, test=40,
                                      seed=5)
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, CONVERT, *cifar_args(gen.path, store, "all", "--address",
                                              f"127.0.0.1:{ray_head.gcs_port}")],
        cwd=REPO, env=ray_head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    killed: list[int] = []

    def kill_a_worker() -> bool:
        for child in psutil.Process(ray_head.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "ray::convert_shard" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGKILL)
                    killed.append(child.pid)
                    return True
        return False

    try:
        wait_for(kill_a_worker, 120, proc, "a worker running convert_shard")
        out, err = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert killed
    assert proc.returncode == 0, err[-3000:]
    m = Manifest.load(Store.open(str(store)), "cifar10")
    assert_cifar_pixels(assert_exactly_once(store / "cifar10", m, cifar_expected(gen)), gen)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "nth", "exit_code"), [
    ("shard-data", 2, 0), ("index-write", 3, 0), ("shard-stage", 5, 0),
    ("manifest-write", 1, -signal.SIGKILL)])
def test_ray_killed_at_point_resumes_exactly(ray_head: Any, tmp_path: Path, point: str,
                                             nth: int, exit_code: int) -> None:
    """Real Ray: a worker SIGKILLs itself mid-shard (data in place without index, half
    an index, staged only) and Ray's retry must clean up after it; or the driver dies
    at its manifest write while joined to the head. Checks as in test_kill_anywhere."""
    from test_kill_anywhere import kill_and_resume

    gen = datagen.make_cifar10_python(tmp_path / "c.tar.gz", train_per_batch=40, test=40,
                                      seed=9)
    kill_and_resume(gen, tmp_path, point, nth, address=f"127.0.0.1:{ray_head.gcs_port}",
                    env=ray_head.env, killed_exit=exit_code)


def _repo_copies(temp_dir: Path) -> Callable[[str, list[str]], set[str]]:
    """A copytree filter leaving out working_dir files identical to this repository's."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        out = set()
        for name in names:
            path = Path(folder) / name
            parts = path.relative_to(temp_dir).parts
            if "working_dir_files" in parts and path.is_file() and not path.is_symlink():
                rel = Path(*parts[parts.index("working_dir_files") + 2:])
                if (REPO / rel).is_file() and (REPO / rel).read_bytes() == path.read_bytes():
                    out.add(name)
            elif path.is_socket() or path.is_fifo():
                out.add(name)
        return out
    return ignore


def _no_aws(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(("AWS_", "FORMATLAB_STORAGE"))}


@pytest.mark.slow
def test_secrets_stay_out_of_ray(ray_head: Any, s3_server: Any, s3_bucket: str,
                                 cifar: datagen.GeneratedCifar, tmp_path: Path) -> None:
    """Credentials only in storage options, through real Ray: a local Ray the driver
    starts (secret inline on the command line) and a running head (``ray job submit``
    with ``--storage-options @file`` and a standalone driver with the environment
    variable). Then the whole Ray temp folder of each, the store and every output are
    searched for the secret. A secret inline in a Ray job's entrypoint gets the warning
    that Ray has recorded it."""
    from test_faults import assert_secret_nowhere

    options = json.dumps(s3_server.storage_options)
    opts_file = tmp_path / "s3.json"
    opts_file.write_text(options)
    ray_tmp = Path(tempfile.mkdtemp(prefix="fls", dir="/tmp"))  # short: socket paths
    texts: dict[str, str] = {}
    try:
        local = run_cli(cifar_args(cifar.path, f"{s3_bucket}/local", "png,npy",
                                   "--storage-options", options),
                        env=_no_aws(_ray_env()) | {"RAY_TMPDIR": str(ray_tmp)}, timeout=300)
        texts["local ray"] = local.stdout + local.stderr
        assert local.returncode == 0, local.stderr[-3000:]
        assert any(ray_tmp.rglob("*.log")), "the local Ray wrote no session folder here"
        job = ray_head.job("submit", "--working-dir", str(REPO), "--", "python",
                           "prep/convert.py", *cifar_args(cifar.path.resolve(),
                                                          f"{s3_bucket}/job", "png",
                                                          "--storage-options", f"@{opts_file}"),
                           env=_no_aws(ray_head.env))
        texts["job submit"] = job.stdout + job.stderr
        assert job.returncode == 0, texts["job submit"][-3000:]
        joined = run_cli(cifar_args(cifar.path, f"{s3_bucket}/joined", "png", "--address",
                                    f"127.0.0.1:{ray_head.gcs_port}"),
                         env=_no_aws(ray_head.env) | {"FORMATLAB_STORAGE_OPTIONS": f"@{opts_file}"},
                         timeout=300)
        texts["joined"] = joined.stdout + joined.stderr
        assert joined.returncode == 0, joined.stderr[-3000:]
        for name in ("local", "job", "joined"):
            m = Manifest.load(Store.open(f"{s3_bucket}/{name}", s3_server.storage_options),
                              "cifar10")
            assert sum(s.samples for s in m.splits) == 5 * PER_BATCH + TEST
        # The head's copies of this repository (the job's working_dir) hold the test's own
        # key in tests/conftest.py: searched as copies, the rest of the head as is.
        head_copy = tmp_path / "head"
        shutil.copytree(ray_head.temp_dir, head_copy, symlinks=True,
                        ignore=_repo_copies(ray_head.temp_dir), ignore_dangling_symlinks=True)
        searched = assert_secret_nowhere(s3_server.secret, [
            ray_tmp, head_copy, s3_server.root / s3_bucket.removeprefix("s3://")], texts)
        assert searched > 50
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # The one case Ray records: a secret inline in a job's entrypoint. Say so.
    warned = ray_head.job("submit", "--working-dir", str(REPO), "--", "python",
                          "prep/convert.py", *cifar_args(cifar.path.resolve(),
                                                         f"{s3_bucket}/inline", "png",
                                                         "--storage-options", options),
                          env=_no_aws(ray_head.env))
    # (Its workers are not sent the secret, and this head's have no credentials.)
    assert "Ray has recorded this job's entrypoint" in flat(warned.stdout + warned.stderr)


# --------------------------------------------------------------------------- 5. S3


def test_s3_destination_keeps_secrets(s3_server, s3_bucket: str, cifar: datagen.GeneratedCifar,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    secret = s3_server.secret.encode()
    bucket_dir = s3_server.root / s3_bucket.removeprefix("s3://")
    outputs = []

    # Credentials in the AWS environment of a child process.
    proc = run_cli(cifar_args(cifar.path, f"{s3_bucket}/store", "png,npy", "--address", "inline",
                              "--results", f"{s3_bucket}/results"), env=s3_server.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs += [proc.stdout, proc.stderr]

    # Credentials only in --storage-options, in this process.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    results = tmp_path / "results"
    code, output = convert(cifar_args(cifar.path, f"{s3_bucket}/store2", "png,npy", "--results",
                                      str(results), "--storage-options",
                                      json.dumps(s3_server.storage_options)), capsys)
    assert code == 0, output
    outputs.append(output)

    for store_url in (f"{s3_bucket}/store", f"{s3_bucket}/store2"):
        m = Manifest.load(Store.open(store_url, s3_server.storage_options), "cifar10")
        assert m.source_url == str(cifar.path)
        local = bucket_dir / store_url.removeprefix(s3_bucket + "/") / "cifar10"
        data = assert_exactly_once(local, m, cifar_expected(cifar))
        assert_cifar_pixels(data, cifar)
        assert assert_no_index_without_data(local) == 2 * 5
    assert list((bucket_dir / "results" / "conversions").glob("*.parquet"))
    assert list((results / "conversions").glob("*.parquet"))

    for text in outputs:
        assert s3_server.secret not in text
    assert grep_tree(bucket_dir, secret) == []
    assert grep_tree(results, secret) == []


# --------------------------------------------------------------------------- 6. store outage


def test_store_outage_mid_conversion(tmp_path: Path) -> None:
    gen = datagen.make_cifar10_python(tmp_path / "c.tar.gz", train_per_batch=60, test=40,
                                      seed=8)
    root = tmp_path / "s3root"
    server = start_s3_server(root)
    port = int(server.endpoint.rsplit(":", 1)[1])
    try:
        url = server.bucket("outage")
        dataset = root / "outage" / "store" / "cifar10"
        argv = [sys.executable, CONVERT, *cifar_args(gen.path, f"{url}/store", "png,npy",
                                                      "--address", "inline")]
        proc = subprocess.Popen(argv, cwd=REPO, env=server.env(), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: first_index(dataset), 120, proc, "the first committed shard")
            server.stop()
            out, err = proc.communicate(timeout=180)
        finally:
            kill_group(proc)
        assert proc.returncode == 1, err
        line = assert_one_line_error(err)
        assert "cannot" in line and "s3://outage/store" in line, line
        assert server.secret not in out + err
        assert not (dataset / MANIFEST_FILE).exists()
        assert assert_no_index_without_data(dataset) >= 1

        server = start_s3_server(root, port)
        done = subprocess.run(argv, cwd=REPO, env=server.env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert server.secret not in done.stdout + done.stderr
        m = Manifest.load(Store.open(f"{url}/store", server.storage_options), "cifar10")
        assert_exactly_once(dataset, m, cifar_expected(gen))
        assert assert_no_index_without_data(dataset) == 2 * len(m.format("npy").shards)
    finally:
        server.stop()


def test_ray_task_arguments_hold_no_secret(tmp_path: Path) -> None:
    """What Ray is given as task arguments (and may write down) holds no secret, for
    options given inline, from a file and nested; the public ones still travel."""
    from prep.executors import ray_task_options

    secret = "s3cr3t-" + "x" * 20
    options = {"key": "AKIAEXAMPLE0001", "secret": secret, "endpoint_url": "http://h:1",
               "client_kwargs": {"region_name": "r", "aws_session_token": secret}}
    path = tmp_path / "o.json"
    path.write_text(json.dumps(options))
    for text in (json.dumps(options), f"@{path}"):
        args = ray_task_options(text, options)
        dumped = json.dumps(args)
        assert secret not in dumped and "AKIAEXAMPLE0001" not in dumped
        assert args["storage_options"]["endpoint_url"] == "http://h:1"
        assert args["storage_options"]["client_kwargs"] == {"region_name": "r"}
    assert ray_task_options(f"@{path}", options)["options_from"] == f"@{path.resolve()}"


BAD_FLAGS = [
    (["--source", "nope"], "--source"), (["--size", "0"], "--size"),
    (["--size", "abc"], "--size"), (["--size", "-3"], "--size"),
    (["--formats", "png,gif"], "'gif'"), (["--formats", ""], "format"),
    (["--shard-samples", "0"], "--shard-samples"), (["--shard-samples", "1.5"], "--shard-samples"),
    (["--val-fraction", "1"], "--val-fraction"), (["--val-fraction", "nan"], "--val-fraction"),
    (["--val-fraction", "x"], "--val-fraction"), (["--max-rejects", "-1"], "--max-rejects"),
    (["--seed", "-1"], "--seed"), (["--seed", "s"], "--seed"), (["--limit", "0"], "--limit"),
    (["--storage-options", "{oops"], "--storage-options"),
    (["--storage-options", "[1]"], "--storage-options"),
    (["--storage-options", "@/no/such/file.json"], "--storage-options"),
    (["--src"], "--src"), (["--bogus", "1"], "--bogus"),
    (["--plan", "--plan-sample", "0"], "--plan-sample"), (["--plan-cores", "2"], "--plan"),
    (["--plan", "--plan-cores", "x"], "--plan-cores"), (["--plan-sample", "3"], "--plan"),
]


@pytest.mark.parametrize(("bad", "named"), BAD_FLAGS, ids=[" ".join(b) for b, _ in BAD_FLAGS])
def test_bad_value_for_every_flag(bad: list[str], named: str, cifar: datagen.GeneratedCifar,
                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 and one line naming the flag or value; no traceback, nothing written."""
    argv = cifar_args(cifar.path, tmp_path / "store", "png") + ["--address", "inline", *bad]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    line = assert_one_line_error(err)
    assert err.strip() == line and named in line, err
    assert not (tmp_path / "store").exists()
