"""benchmarks/bench_scale.py's pure pieces: the ratio, the projection, the limits, the
photo generator and the worker-memory sampler (a real run takes minutes; `make bench`)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_scale  # noqa: E402
from limits import Check  # noqa: E402
from scale_photos import CLASSES, make_photos, photo_bytes, subset  # noqa: E402


def test_decode_once_ratio_and_growth() -> None:
    assert bench_scale.decode_once_ratio(1.1, 0.1, {"a": 0.5, "b": 0.4}) == pytest.approx(1.1)
    assert bench_scale.decode_once_ratio(2.0, 0.2, {"a": 0.8}) == pytest.approx(2.0)
    assert bench_scale.one_job_per_format(1.0, 0.1, {"a": 0.5, "b": 0.4}) == \
        pytest.approx(1.1)  # (0.1 + 0.5) + (0.1 + 0.4)
    assert bench_scale.growth(100, 110) == bench_scale.growth(110, 100) == pytest.approx(1.1)
    assert bench_scale.growth(0, 5) == float("inf")


def test_slope_and_projection() -> None:
    # 40 photos in 100 s, 80 in 180 s: 2 s per photo on one core, 20 s fixed
    core_s = bench_scale.per_image_core_s((40, 80), (100.0, 180.0), cores=1)
    assert core_s == pytest.approx(2.0)
    p = bench_scale.project(79_698, 64, 20.0, core_s, {"npy": 786_560.0, "png": 400_000.0})
    assert p.wall_s == pytest.approx(20.0 + 2.0 * 79_698 / 64)
    assert p.store_bytes == {"npy": pytest.approx(786_560.0 * 79_698),
                             "png": pytest.approx(400_000.0 * 79_698)}
    assert bench_scale.per_image_core_s((40, 80), (100.0, 90.0), cores=1) == 0.0
    with pytest.raises(ValueError, match="must grow"):
        bench_scale.per_image_core_s((80, 40), (1.0, 2.0), cores=1)
    with pytest.raises(ValueError):
        bench_scale.project(10, 0, 0.0, 1.0, {})


def test_limits_as_the_issue_sets_them() -> None:
    assert bench_scale.DECODE_LIMIT == 1.15 and bench_scale.MEMORY_LIMIT == 1.20
    ok = Check("m", bench_scale.growth(300, 350), bench_scale.MEMORY_LIMIT, "<=")
    missed = Check("m", bench_scale.growth(300, 400), bench_scale.MEMORY_LIMIT, "<=")
    assert ok.ok and not missed.ok


def test_counts_are_checked_in_one_line() -> None:
    args = bench_scale.parse_args(["--images", "40"])
    assert args.counts == (8, 16)
    assert bench_scale.parse_args(["--images", "40", "--counts", "8,30"]).counts == (8, 30)
    for bad in ("30,8", "8", "8,41", "x,y"):
        out = subprocess.run([sys.executable, str(BENCH / "bench_scale.py"), "--images", "40",
                              "--counts", bad], capture_output=True, text=True)
        assert out.returncode == 2 and "--counts" in out.stderr.splitlines()[-1]
        assert "Traceback" not in out.stderr


def test_photos_are_large_textured_rotated_jpegs(tmp_path: Path) -> None:
    data = photo_bytes(1, 400, 300, 6, np.random.default_rng(0))
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (400, 300)
    assert image.getexif()[0x0112] == 6
    pixels = np.asarray(image.convert("RGB"), np.float32)
    # texture at every scale: neighbouring pixels and distant blocks both differ
    assert np.abs(np.diff(pixels, axis=1)).mean() > 2
    blocks = pixels[:280, :400].reshape(7, 40, 10, 40, 3).mean(axis=(1, 3))
    assert blocks.std() > 5
    root = make_photos(tmp_path / "p", 5, seed=1)
    files = sorted(root.rglob("IMG_*.jpg"))
    assert len(files) == 5 and {f.parent.name for f in files} <= set(CLASSES)
    sizes = {Image.open(f).size for f in files}
    assert all(min(s) >= 2448 and max(s) >= 4000 for s in sizes)
    mtime = files[0].stat().st_mtime_ns
    make_photos(tmp_path / "p", 5, seed=1)  # same spec: kept
    assert files[0].stat().st_mtime_ns == mtime
    part = subset(root, tmp_path / "s", 3)
    assert len(list(part.rglob("*.jpg"))) == 3


def test_worker_memory_reads_peaks_of_its_session_only() -> None:
    """A child in a session of its own, named like a Ray worker, is found; its VmHWM
    covers the 64 MiB it touched, and its CPU seconds are read."""
    code = ("import sys, time; b = bytearray(64 << 20); sys.stdout.write('ok\\n'); "
            "sys.stdout.flush(); time.sleep(30)")
    proc = subprocess.Popen(["bash", "-c", f'exec -a "ray::probe" {sys.executable} -c "{code}"'],
                            stdout=subprocess.PIPE, start_new_session=True, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ok\n"
        memory = bench_scale.WorkerMemory(proc.pid)
        memory.sample()
        assert set(memory.peaks) == {proc.pid}
        assert memory.peak >= 64 << 20
        assert 0 < memory.cpu_s < 30  # its start-up and the 64 MiB it wrote
        other = bench_scale.WorkerMemory(1)  # init's session: none of ours
        other.sample()
        assert proc.pid not in other.peaks
    finally:
        proc.kill()
        proc.wait()
