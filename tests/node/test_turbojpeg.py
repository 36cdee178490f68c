"""The packed loader's compiled loops: JPEG decode runs (libturbojpeg) and member reads
(copies out of memory-mapped tars), against Pillow's decode and the files' bytes, with
their errors."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from node.loaders.packed_io import LocalMembers
from shared.formats.wds import TAR_NAME
from node.loaders.turbojpeg import TurboJpeg, compiled_loop, turbojpeg_path

needs_turbo = pytest.mark.skipif(turbojpeg_path() is None,
                                 reason="no libturbojpeg on this machine")


def jpeg_run(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray, list[bytes]]:
    """``n`` noisy JPEGs in one buffer, with their starts and sizes."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(n):
        out = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        blobs.append(out.getvalue())
    sizes = np.array([len(b) for b in blobs], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return np.frombuffer(b"".join(blobs), np.uint8).copy(), starts, sizes, blobs


@needs_turbo
@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "python"])
def test_a_run_decodes_as_pillow_does(compiled: bool) -> None:
    buf, starts, sizes, blobs = jpeg_run(40)
    turbo = TurboJpeg(turbojpeg_path(), compiled=compiled)
    assert turbo.loop == ("numba-compiled loop" if compiled else "Python loop")
    out = np.zeros((40, 16, 16, 3), np.uint8)
    try:
        turbo.decode_many(buf, starts, sizes, out)
    finally:
        turbo.close()
    for k in (0, 17, 39):
        expected = np.asarray(Image.open(io.BytesIO(blobs[k])).convert("RGB"))
        np.testing.assert_array_equal(out[k], expected)


@needs_turbo
@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "python"])
def test_a_bad_member_is_named(compiled: bool) -> None:
    buf, starts, sizes, _ = jpeg_run(5)
    turbo = TurboJpeg(turbojpeg_path(), compiled=compiled)
    out = np.zeros((5, 16, 16, 3), np.uint8)
    try:
        with pytest.raises(ValueError, match=r"member 0 decoded to shape \(16, 16, 3\), the "
                           r"dataset's images are \(8, 16, 3\)"):
            turbo.decode_many(buf, starts, sizes, np.zeros((5, 8, 16, 3), np.uint8))
        broken = buf.copy()
        broken[starts[2]:starts[2] + 2] = 0  # no SOI marker
        with pytest.raises(ValueError, match="member 2: not a JPEG"):
            turbo.decode_many(broken, starts, sizes, out)
    finally:
        turbo.close()


@needs_turbo
def test_the_compiled_loop_survives_pickling_and_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    assert compiled_loop(turbojpeg_path()) is not None  # numba is a dependency
    buf, starts, sizes, _ = jpeg_run(64)
    turbo = pickle.loads(pickle.dumps(TurboJpeg(turbojpeg_path())))
    assert turbo.loop == "numba-compiled loop"
    one, two = np.zeros((2, 64, 16, 16, 3), np.uint8)
    turbo.decode_many(buf, starts, sizes, one)
    with ThreadPoolExecutor(4) as pool:  # one decompressor per thread
        list(pool.map(lambda lo: turbo.decode_many(buf, starts[lo:lo + 16], sizes[lo:lo + 16],
                                                   two[lo:lo + 16]), range(0, 64, 16)))
    turbo.close()
    np.testing.assert_array_equal(one, two)


def test_mapped_members_are_copied_out_and_a_truncated_tar_is_named(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)
    for name, content in (("a", data), ("b", data[::-1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / TAR_NAME).write_bytes(content.tobytes())

    class Shard(NamedTuple):
        location: str
        offsets: np.ndarray
        sizes: np.ndarray

    shards = [Shard(str(tmp_path / "a"), np.array([5, 9_000], np.int64),
                    np.array([10, 1_000], np.int64)),
              Shard(str(tmp_path / "b"), np.array([100], np.int64), np.array([300], np.int64))]
    members = LocalMembers(shards)
    try:
        buf, starts, sizes = members.read(np.array([0, 0, 1]), np.array([0, 1, 0]))
        assert starts.tolist() == [0, 10, 1_010] and sizes.tolist() == [10, 1_000, 300]
        np.testing.assert_array_equal(buf[:10], data[5:15])
        np.testing.assert_array_equal(buf[10:1_010], data[9_000:])
        np.testing.assert_array_equal(buf[1_010:], data[::-1][100:400])
        members.close()  # unmapped; read again, mapped again
        (tmp_path / "a" / TAR_NAME).write_bytes(data[:9_500].tobytes())
        with pytest.raises(OSError, match=r"/a/samples.tar: member ending at 10000 is past "
                                          r"the end of the tar \(9500 bytes\): truncated"):
            members.read(np.array([0]), np.array([1]))
    finally:
        members.close()


@pytest.mark.parametrize("options", [
    {"progressive": True},
    {"exif": b"Exif\x00\x00" + bytes(2_000)},  # an APP1 segment before the frame
    {"optimize": True, "subsampling": 0},
    {"quality": 50, "dpi": (300, 300), "comment": b"x" * 500},
], ids=["progressive", "exif", "optimized-444", "jfif-comment"])
def test_frame_size_walks_every_segment_pillow_writes(options: dict) -> None:
    from node.loaders.turbojpeg import frame_size

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **options)
    data = np.frombuffer(out.getvalue(), np.uint8)
    padded = np.concatenate([np.zeros(7, np.uint8), data])  # a member inside a tar
    assert frame_size(padded, 7, len(data)) == (24, 40)
    assert frame_size(padded, 7, 40) == (-1, -1)  # cut before its frame header
    assert frame_size(np.zeros(64, np.uint8), 0, 64) == (-1, -1)
    if turbojpeg_path() is not None:
        turbo = TurboJpeg(turbojpeg_path())
        got = np.zeros((1, 24, 40, 3), np.uint8)
        try:
            turbo.decode_many(padded, np.array([7]), np.array([len(data)]), got)
        finally:
            turbo.close()
        np.testing.assert_array_equal(got[0], np.asarray(Image.open(out).convert("RGB")))
