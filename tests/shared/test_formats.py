"""Every catalog format round-trips a shard; on-disk bytes are what each format promises."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.formats import (
    CATALOG,
    ArrayShardReader,
    Format,
    FormatKind,
    FormatMismatch,
    SampleFile,
    UnknownFormat,
    get_format,
    parse_format_list,
)
from shared.formats.jpeg import JpegFormat
from shared.manifest import FormatEntry
from shared.quality import psnr
from shared.storage import Store, checksum_file

SHAPES = [(32, 32), (48, 40)]
N = 6
# Floors from measured per-image PSNR on these images, about 3 dB below the lowest:
# jpeg-q95 36.2, jpeg-q95-444 37.3, jpeg-q75 35.3, jp2-lossy 39.4, webp-q90 35.7 (Pillow 13).
PSNR_FLOOR = {"jpeg-q95": 33.0, "jpeg-q95-444": 34.0, "jpeg-q75": 32.0, "jp2-lossy": 36.0,
              "webp-q90": 32.0}
ARRAY_FORMATS = [f for f in CATALOG if get_format(f).kind is FormatKind.ARRAY]


def make_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus mild noise, so lossy codecs behave as on photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        base = rng.uniform(0, 255, 3)
        img = (base + x[..., None] * rng.uniform(-4, 4, 3) + y[..., None] * rng.uniform(-4, 4, 3)
               + rng.normal(0, 4, (h, w, 3)))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


class Written:
    """One shard written by one format."""

    def __init__(self, fmt: Format, root: Path, shape: tuple[int, int]) -> None:
        self.fmt = fmt
        self.dir = root / fmt.id / f"{shape[0]}x{shape[1]}"
        self.dir.mkdir(parents=True)
        self.images = make_images(N, *shape, seed=shape[0])
        self.labels = np.arange(N, dtype=np.int64) * 7
        self.result = fmt.write_shard(self.dir, self.images, self.labels)
        self.files = [s.file for s in self.result] if self.result is not None else None

    def reader(self):
        return self.fmt.open_reader(self.dir, self.files, num_samples=N)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, tuple[int, int]], Written]:
    root = tmp_path_factory.mktemp("formats")
    return {(f, s): Written(get_format(f), root, s) for f in CATALOG for s in SHAPES}


def check_matches(fmt: Format, want: np.ndarray, got: np.ndarray) -> None:
    assert got.dtype == np.uint8 and got.shape == want.shape
    if fmt.lossless:
        assert np.array_equal(got, want)
    else:
        assert psnr(want, got) >= PSNR_FLOOR[fmt.id], f"{fmt.id}: {psnr(want, got):.2f} dB"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("format_id", CATALOG)
def test_round_trip(shards, format_id: str, shape: tuple[int, int]) -> None:
    w = shards[format_id, shape]
    if w.fmt.kind is FormatKind.FILES:
        assert len(w.result) == N and all(isinstance(s, SampleFile) for s in w.result)
        for s in w.result:
            assert s.bytes == (w.dir / s.file).stat().st_size
            assert s.checksum == checksum_file(w.dir / s.file)
    else:
        assert w.result is None
    with w.reader() as reader:
        assert len(reader) == N
        for i in range(N):
            sample = reader.read(i)
            assert sample.flags.c_contiguous
            check_matches(w.fmt, w.images[i], sample)
        order = [4, 0, 5, 4, 2]
        batch = reader.read_batch(order)
        assert batch.flags.c_contiguous
        np.testing.assert_array_equal(batch, np.stack([reader.read(i) for i in order]))
        check_matches(w.fmt, w.images[order], batch)
        assert reader.bytes_read > 0


@pytest.mark.parametrize("format_id", ARRAY_FORMATS)
def test_array_reader_rejects_out_of_range(shards, format_id: str) -> None:
    with shards[format_id, SHAPES[0]].reader() as reader, pytest.raises(IndexError):
        reader.read_batch([0, N])


def _read_in_child(reader) -> np.ndarray:
    return reader.read_batch([3, 1])


@pytest.mark.parametrize("format_id", ARRAY_FORMATS)
def test_array_reader_survives_fork_and_pickle(shards, format_id: str) -> None:
    """Loaders build readers in the main process and use them in DataLoader workers."""
    w = shards[format_id, SHAPES[0]]
    reader = w.reader()
    reader.read(0)  # opened in the parent first, as a loader would
    copy = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(copy.read_batch([2, 0]), w.images[[2, 0]])
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply(_read_in_child, (reader,))
    np.testing.assert_array_equal(got, w.images[[3, 1]])
    reader.close()


def _tiff_compression(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return img.info["compression"]


MAGIC = {
    "bmp": lambda b: b[:2] == b"BM",
    "png": lambda b: b[:4] == b"\x89PNG",
    "tiff": lambda b: b[:4] in (b"II*\0", b"MM\0*") and _tiff_compression(b) == "raw",
    "tiff-lzw": lambda b: b[:4] in (b"II*\0", b"MM\0*") and _tiff_compression(b) == "tiff_lzw",
    "tiff-zip": lambda b: (b[:4] in (b"II*\0", b"MM\0*")
                           and _tiff_compression(b) == "tiff_adobe_deflate"),
    "jpeg-q95": lambda b: b[:3] == b"\xff\xd8\xff",
    "jpeg-q95-444": lambda b: b[:3] == b"\xff\xd8\xff",
    "jpeg-q75": lambda b: b[:3] == b"\xff\xd8\xff",
    "jp2-lossless": lambda b: b[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    "jp2-lossy": lambda b: b[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    "webp-lossless": lambda b: b[:4] == b"RIFF" and b[8:16] == b"WEBPVP8L",
    "webp-q90": lambda b: b[:4] == b"RIFF" and b[8:16] == b"WEBPVP8 ",
    "npy-files": lambda b: b[:6] == b"\x93NUMPY" and b[6] == 1,
}


@pytest.mark.parametrize("format_id", [f for f in CATALOG if f in MAGIC])
def test_file_format_magic_bytes(shards, format_id: str) -> None:
    w = shards[format_id, SHAPES[1]]
    for name in w.files:
        assert MAGIC[format_id]((w.dir / name).read_bytes()), name


def test_npy_files_are_version_1_and_load_without_pickle(shards) -> None:
    w = shards["npy-files", SHAPES[1]]
    for i, name in enumerate(w.files):
        with open(w.dir / name, "rb") as f:
            assert np.lib.format.read_magic(f) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert (shape, fortran, dtype) == ((48, 40, 3), False, np.dtype(np.uint8))
        np.testing.assert_array_equal(np.load(w.dir / name, allow_pickle=False), w.images[i])


def test_npy_shard_layout(shards) -> None:
    w = shards["npy", SHAPES[1]]
    for name, dtype, shape in [("images.npy", np.uint8, (N, 48, 40, 3)),
                               ("labels.npy", np.int64, (N,))]:
        raw = (w.dir / name).read_bytes()
        assert raw[:6] == b"\x93NUMPY" and raw[6] == 1
        array = np.load(w.dir / name, allow_pickle=False)
        assert array.dtype == dtype and array.shape == shape
    np.testing.assert_array_equal(np.load(w.dir / "labels.npy"), w.labels)
    with w.reader() as reader:
        images = reader.images_array()
        assert isinstance(images, np.memmap) and not images.flags.writeable
        np.testing.assert_array_equal(images, w.images)


@pytest.mark.parametrize("format_id,compression", [
    ("hdf5", None), ("hdf5-gzip", "gzip"), ("hdf5-lzf", "lzf")])
def test_hdf5_layout(shards, format_id: str, compression: str | None) -> None:
    import h5py

    w = shards[format_id, SHAPES[1]]
    assert (w.dir / "data.h5").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    with h5py.File(w.dir / "data.h5", "r") as f:
        images, labels = f["images"], f["labels"]
        assert images.dtype == np.uint8 and images.shape == (N, 48, 40, 3)
        assert images.chunks == (1, 48, 40, 3)
        assert images.compression == compression
        if compression == "gzip":
            assert images.compression_opts == 4
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels[...], w.labels)


@pytest.mark.parametrize("format_id", ["zarr", "zarr-zstd"])
def test_zarr_layout(shards, format_id: str) -> None:
    w = shards[format_id, SHAPES[1]]
    group = w.dir / "data.zarr"
    assert json.loads((group / "zarr.json").read_text())["zarr_format"] == 3
    meta = json.loads((group / "images" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "uint8"
    assert meta["shape"] == [N, 48, 40, 3]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"][1:] == [48, 40, 3]
    codecs = [c["name"] for c in meta["codecs"]]
    assert ("zstd" in codecs) == (format_id == "zarr-zstd")
    if format_id == "zarr-zstd":
        zstd = next(c for c in meta["codecs"] if c["name"] == "zstd")
        assert zstd["configuration"]["level"] == 3
    with w.reader() as reader:
        np.testing.assert_array_equal(reader.labels_array(), w.labels)


def test_zarr_reads_from_fsspec_url(shards) -> None:
    """The ``--no-cache`` path: a zarr shard read straight from a remote store."""
    w = shards["zarr-zstd", SHAPES[1]]
    url = f"memory://formatlab-test-{uuid.uuid4().hex[:8]}"
    store = Store.open(url)
    store.put_dir(w.dir, "ds/zarr-zstd/train/shard-00000")
    try:
        reader = w.fmt.open_reader(f"{url}/ds/zarr-zstd/train/shard-00000", num_samples=N,
                                   storage_options={})
        assert len(reader) == N
        np.testing.assert_array_equal(reader.read_batch([5, 1, 3]), w.images[[5, 1, 3]])
        np.testing.assert_array_equal(reader.read(2), w.images[2])
        assert reader.bytes_read > 0
        reader.close()
    finally:
        store.delete("", recursive=True)


@pytest.mark.parametrize("format_id", ["npy", "hdf5", "bmp"])
def test_local_only_formats_refuse_urls(format_id: str) -> None:
    with pytest.raises(ValueError, match="local"):
        get_format(format_id).open_reader("s3://bucket/ds/x/train/shard-00000", ["a"])


def test_file_reader_needs_file_list(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file list"):
        get_format("png").open_reader(tmp_path)


@pytest.mark.parametrize("format_id", ["png", "npy", "hdf5", "zarr"])
def test_writer_rejects_bad_arrays(tmp_path: Path, format_id: str) -> None:
    fmt = get_format(format_id)
    with pytest.raises(ValueError, match="uint8"):
        fmt.write_shard(tmp_path, np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels"):
        fmt.write_shard(tmp_path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, np.int64))


# --------------------------------------------------------------------------- registry


def test_catalog_ids_resolve_and_describe() -> None:
    assert len(CATALOG) == 19 and len(set(CATALOG)) == 19
    for format_id in CATALOG:
        fmt = get_format(format_id)
        assert fmt.id == format_id
        row = fmt.describe()
        assert row["bits"] == 8 and isinstance(row["compression"], str) and row["compression"]
        json.dumps(row)  # manifests and reports serialise it
    assert {f: get_format(f).lossless for f in PSNR_FLOOR} == dict.fromkeys(PSNR_FLOOR, False)


@pytest.mark.parametrize("family", ["jpeg", "webp"])
def test_quality_ids_parse_1_to_100(family: str) -> None:
    for q in range(1, 101):
        fmt = get_format(f"{family}-q{q}")
        assert fmt.id == f"{family}-q{q}" and fmt.params["quality"] == q
        assert fmt.describe()["compression"] == f"q{q}" and not fmt.lossless


@pytest.mark.parametrize("bad", ["jpeg-q0", "jpeg-q101", "jpeg-q095", "webp-q0", "foo",
                                 "JPEG-q95", "png-q5", "jpeg-q", ""])
def test_unknown_ids_are_rejected_with_the_valid_list(bad: str) -> None:
    with pytest.raises(UnknownFormat) as err:
        get_format(bad)
    message = str(err.value)
    assert "jpeg-qN" in message and "webp-qN" in message and "zarr-zstd" in message


def test_parse_format_list() -> None:
    assert [f.id for f in parse_format_list("all")] == list(CATALOG)
    got = parse_format_list(" png, jpeg-q50 ,png,webp-q90,all ")
    assert [f.id for f in got][:3] == ["png", "jpeg-q50", "webp-q90"]
    assert len(got) == len(CATALOG) + 1
    with pytest.raises(UnknownFormat, match="'foo', 'jpeg-q0'.*jpeg-qN"):
        parse_format_list("png,foo,jpeg-q0,foo")
    with pytest.raises(UnknownFormat):
        parse_format_list(" , ")


def test_importing_formats_does_not_import_h5py_or_zarr() -> None:
    import subprocess
    import sys

    code = "import sys, shared.formats; print('h5py' in sys.modules or 'zarr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def _sampling(data: bytes) -> int:
    """Pillow's code for a JPEG's chroma sampling: 0 is 4:4:4, 2 is 4:2:0."""
    import io

    from PIL import Image, JpegImagePlugin

    with Image.open(io.BytesIO(data)) as img:
        return JpegImagePlugin.get_sampling(img)


def test_jpeg_444_keeps_full_chroma_and_scores_higher() -> None:
    """jpeg-qN-444 writes 4:4:4 JPEGs; on sharp colour edges it beats 4:2:0 clearly."""
    from shared.formats.registry import chroma_subsampling

    y, x = np.mgrid[0:32, 0:32]
    stripes = np.stack([(x % 4 < 2) * 200 + 20, (y % 4 < 2) * 180 + 30,
                        ((x + y) % 6 < 3) * 150 + 50], axis=-1).astype(np.uint8)
    plain, full = get_format("jpeg-q95"), get_format("jpeg-q95-444")
    assert (full.id, full.params["subsampling"], full.compression) == (
        "jpeg-q95-444", "4:4:4", "q95-444")
    assert _sampling(full.encode(stripes)) == 0 and _sampling(plain.encode(stripes)) == 2
    p420 = psnr(stripes, plain.decode(plain.encode(stripes)))
    p444 = psnr(stripes, full.decode(full.encode(stripes)))
    assert p444 > p420 + 3, (p420, p444)
    assert [chroma_subsampling(get_format(f)) for f in
            ("jpeg-q95", "jpeg-q95-444", "webp-q90", "webp-lossless", "png", "npy")] == [
        "4:2:0", "4:4:4", "4:2:0", "4:4:4", "4:4:4", "4:4:4"]
    assert get_format("jpeg-q7-444").id == "jpeg-q7-444"
    for bad in ("jpeg-q95-420", "webp-q90-444", "jpeg-q0-444"):
        with pytest.raises(UnknownFormat):
            get_format(bad)


def test_registry_is_keyed_by_each_formats_own_id() -> None:
    """Every fixed entry builds the format of its key; families build the id asked for."""
    from shared.formats import FORMATS

    assert [get_format(i).id for i in FORMATS] == list(FORMATS.names())
    assert set(CATALOG) <= set(FORMATS.names())
    for format_id in ("jpeg-q1", "jpeg-q100-444", "webp-q55"):
        assert format_id in FORMATS and get_format(format_id).id == format_id


def _entry(format_id: str, kind: str, params: dict) -> FormatEntry:
    return FormatEntry(id=format_id, kind=kind, params=params, shards=(), total_bytes=0,
                       conversion_time_s=0.0)


@pytest.mark.parametrize("format_id", [*CATALOG, "jpeg-q50-444", "webp-q10"])
def test_format_from_its_manifest_entry(format_id: str) -> None:
    """What prep records (params through JSON, as manifest.json holds them) builds the
    same format back."""
    fmt = get_format(format_id)
    recorded = json.loads(json.dumps(dict(fmt.params)))
    again = Format.from_entry(_entry(format_id, fmt.kind.value, recorded))
    assert (type(again), again.id, dict(again.params)) == (type(fmt), fmt.id, dict(fmt.params))
    # Written before a parameter was recorded: the registry's value stands.
    assert Format.from_entry(_entry(format_id, fmt.kind.value, {})).id == format_id


def test_format_entry_with_other_parameters_is_refused_in_one_line() -> None:
    params = dict(get_format("jpeg-q95").params, quality=90)
    with pytest.raises(FormatMismatch, match=r"^format 'jpeg-q95': .*quality=90.* "
                                             r"has quality=95; convert it again$"):
        Format.from_entry(_entry("jpeg-q95", "files", params))
    with pytest.raises(FormatMismatch, match=r"'npy'.*parameter order2='C'.*does not have"):
        Format.from_entry(_entry("npy", "array", {"order2": "C"}))
    with pytest.raises(FormatMismatch, match=r"'png'.*kind 'array'.*is 'files'"):
        Format.from_entry(_entry("png", "array", {}))
    with pytest.raises(FormatMismatch, match="not a JpegFormat"):
        JpegFormat.from_entry(_entry("png", "files", {}))
    with pytest.raises(UnknownFormat, match="unknown format 'jpeg-q0'"):
        Format.from_entry(_entry("jpeg-q0", "files", {}))


@pytest.mark.parametrize("format_id", ARRAY_FORMATS)
def test_array_formats_declare_their_files_and_read_sorted_batches(shards,
                                                                   format_id: str) -> None:
    """An array format's ``data_files`` are exactly what its shard holds; its reader keeps
    the array-reader protocol (images and labels arrays, sorted reads into a buffer)."""
    w = shards[format_id, SHAPES[1]]
    assert sorted(p.name for p in w.dir.iterdir()) == sorted(w.fmt.data_files)
    idx = np.array([0, 2, 3, 5])
    with w.reader() as reader:
        assert isinstance(reader, ArrayShardReader)
        assert reader.images_array().shape == w.images.shape
        np.testing.assert_array_equal(reader.labels_array(), w.labels)
        out = np.zeros((len(idx), *w.images.shape[1:]), dtype=np.uint8)
        reader.images_array()  # opened: only the read below counts
        before = reader.bytes_read
        reader.read_into(idx, out)
        np.testing.assert_array_equal(out, w.images[idx])
        assert reader.bytes_read > before
        if format_id in ("npy", "hdf5"):  # uncompressed: the samples' bytes exactly
            assert reader.bytes_read - before == out.nbytes
