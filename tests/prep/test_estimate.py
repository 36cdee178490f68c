"""``prep/convert.py --plan``: the projection's arithmetic, the sample, and the promise that
planning writes nothing to the store (local or S3), for every source."""

from __future__ import annotations

from pathlib import Path

import pytest

from prep.convert import main
from prep.estimate import SampleCost, project, sample_items
from prep.sources import SourceItem
from shared.manifest import Manifest
from shared.storage import Store
from testdata.cifar import make_cifar10_python
from testdata.folders import make_image_folder
from testdata.samples import SAMPLES

METHOD = "sampled inputs,"


def plan_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([*argv, "--address", "inline"])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> list[tuple[str, int, int]] | None:
    """Every path under ``root`` with its size and mtime; None when ``root`` is absent."""
    if not root.exists():
        return None
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


def table_bytes(out: str) -> dict[str, int]:
    """The bytes column of the estimate table, per format row."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 6 and cells[5].replace(",", "").isdigit():
            rows[cells[0]] = int(cells[5].replace(",", ""))
    return rows


# --------------------------------------------------------------------------- arithmetic


def test_projection_scales_the_sample_to_the_job() -> None:
    cost = SampleCost(inputs=16, accepted=12, decode_s=3.2, encode_s={"png": 1.2, "npy": 0.12},
                      bytes={"png": 12_000, "npy": 36_000})
    est = project(cost, inputs=1000, shards=10, cores=4)
    assert est.samples == 750  # three in four inputs accepted, as in the sample
    # 10 shards on 4 cores run in 3 waves: wall = CPU * 3 / 10.
    assert est.decode_cpu_s == pytest.approx(200.0)  # 0.2 s per input
    assert est.decode_wall_s == pytest.approx(60.0)
    png, npy = est.formats
    assert (png.format_id, npy.format_id) == ("png", "npy")
    assert png.seconds_per_image == pytest.approx(0.1)
    assert png.cpu_s == pytest.approx(75.0) and png.wall_s == pytest.approx(22.5)
    assert npy.cpu_s == pytest.approx(7.5) and npy.wall_s == pytest.approx(2.25)
    assert (png.bytes, npy.bytes) == (750_000, 2_250_000)
    assert est.bytes == 3_000_000
    assert est.wall_s == pytest.approx(60.0 + 22.5 + 2.25)


@pytest.mark.parametrize("shards, cores", [(10, 1), (10, 16), (7, 3), (1, 8)])
def test_wall_time_runs_one_task_per_shard_in_waves(shards: int, cores: int) -> None:
    cost = SampleCost(inputs=4, accepted=4, decode_s=0.4, encode_s={"png": 2.0}, bytes={"png": 40})
    est = project(cost, inputs=100, shards=shards, cores=cores)
    waves = -(-shards // cores)
    assert est.decode_wall_s == pytest.approx(10.0 * waves / shards)
    assert est.formats[0].wall_s == pytest.approx(50.0 * waves / shards)
    # More cores than shards never help; one core is all the CPU time.
    assert est.wall_s >= (10.0 + 50.0) / shards - 1e-9
    if cores == 1:
        assert est.wall_s == pytest.approx(60.0)


def test_a_sample_with_nothing_accepted_is_not_projected() -> None:
    cost = SampleCost(inputs=3, accepted=0, decode_s=0.1, encode_s={}, bytes={},
                      rejects=(("a.jpg", "empty file"),) * 3)
    with pytest.raises(ValueError, match="nothing to project"):
        project(cost, inputs=10, shards=1, cores=1)


def test_the_sample_is_spread_over_the_listing() -> None:
    items = [SourceItem(f"k{i:03d}", "train" if i < 80 else "val", 0) for i in range(100)]
    picked = sample_items(items, 10)
    assert [it.key for it in picked] == [f"k{i:03d}" for i in range(5, 100, 10)]
    assert {it.split for it in picked} == {"train", "val"}
    assert sample_items(items[:7], 16) == items[:7]
    assert len({it.key for it in sample_items(items, 99)}) == 99


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("source", sorted(SAMPLES))
def test_every_source_plans_without_writing(source: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = SAMPLES[source](tmp_path / "raw")
    dst, results = tmp_path / "store", tmp_path / "results"
    size = ["--size", "24"] if source == "image-folder" else []
    code, out, err = plan_cli(["--source", source, "--src", src, "--dst", str(dst), *size,
                               "--formats", "png,npy", "--results", str(results), "--plan",
                               "--plan-sample", "5", "--plan-cores", "3"], capsys)
    assert code == 0, err
    assert "from 5 sampled inputs, 3 cores" in out
    assert "formats: png, npy" in out
    assert set(table_bytes(out)) == {"png", "npy", "total"}
    assert " shard" in out and "samples in" in out
    assert not dst.exists() and not results.exists()


def test_full_sample_predicts_the_bytes_a_conversion_writes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_image_folder(tmp_path / "raw", classes=2, per_class=4, size=(60, 50),
                            odd_files=False, seed=4)["root"]
    args = ["--source", "image-folder", "--src", str(src), "--dst", str(tmp_path / "store"),
            "--size", "24", "--val-fraction", "0", "--shard-samples", "8",
            "--formats", "png,webp-lossless,npy,hdf5"]
    code, out, err = plan_cli([*args, "--plan", "--plan-sample", "8"], capsys)
    assert code == 0, err
    predicted = table_bytes(out)
    assert main([*args, "--address", "inline"]) == 0
    capsys.readouterr()
    manifest = Manifest.load(Store.open(str(tmp_path / "store")), "image-folder")
    # One shard, all of it sampled: the estimate is exactly what the conversion wrote.
    assert {f.id: f.total_bytes for f in manifest.formats} == {
        k: v for k, v in predicted.items() if k != "total"}
    assert predicted["total"] == sum(f.total_bytes for f in manifest.formats)


def test_plan_over_an_existing_dataset_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = make_cifar10_python(tmp_path / "c.tar.gz", train_per_batch=6, test=6, seed=2)
    store = tmp_path / "store"
    base = ["--source", "cifar10", "--src", str(gen.path), "--dst", str(store),
            "--shard-samples", "8"]
    assert main([*base, "--formats", "png", "--address", "inline"]) == 0
    before = snapshot(store)
    code, out, err = plan_cli([*base, "--formats", "png,npy,zarr", "--plan"], capsys)
    assert code == 0, err
    assert "from 16 sampled inputs, 1 core " in out  # inline: one core
    assert "test: 6 samples in 1 shard (1 x 6)" in out
    assert "train: 30 samples in 4 shards (3 x 8, 1 x 6)" in out
    assert snapshot(store) == before


def test_image_folder_at_512_with_limit(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = make_image_folder(tmp_path / "raw", classes=2, per_class=5, size=(900, 640),
                            splits=True, odd_files=False, seed=5)["root"]
    dst = tmp_path / "store"
    code, out, err = plan_cli(["--source", "image-folder", "--src", str(src), "--dst", str(dst),
                               "--size", "512", "--limit", "3", "--formats", "png,jpeg-q95,npy",
                               "--plan", "--plan-sample", "4", "--plan-cores", "2"], capsys)
    assert code == 0, err
    assert "512x512, 7 samples in 3 shards" in out  # train 3, val 2, test 2
    assert "train: 3 samples in 1 shard (1 x 3)" in out
    assert "from 4 sampled inputs, 2 cores" in out
    npy = table_bytes(out)["npy"]
    assert npy >= 7 * 512 * 512 * 3  # decoded pixels, whatever the container adds
    assert not dst.exists()


def test_plan_writes_nothing_on_s3(s3_server, s3_bucket: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import json

    gen = make_cifar10_python(tmp_path / "c.tar.gz", train_per_batch=4, test=4, seed=6)
    bucket_dir = s3_server.root / s3_bucket.removeprefix("s3://")
    base = ["--source", "cifar10", "--src", str(gen.path), "--dst", f"{s3_bucket}/store",
            "--storage-options", json.dumps(s3_server.storage_options), "--shard-samples", "8"]
    assert main([*base, "--formats", "png", "--address", "inline"]) == 0
    capsys.readouterr()
    before = snapshot(bucket_dir)
    code, out, err = plan_cli([*base, "--formats", "png,hdf5", "--results",
                               f"{s3_bucket}/results", "--name", "other", "--plan"], capsys)
    assert code == 0, err
    assert METHOD in out and s3_server.secret not in out + err
    assert snapshot(bucket_dir) == before
    code, out, err = plan_cli([*base, "--formats", "png,hdf5", "--plan"], capsys)
    assert code == 0, err
    assert snapshot(bucket_dir) == before


@pytest.mark.parametrize("flags, named", [
    (["--plan-sample", "4"], "--plan-sample goes with --plan"),
    (["--plan-cores", "4"], "--plan-cores goes with --plan"),
    (["--plan", "--plan-sample", "0"], "--plan-sample"),
    (["--plan", "--plan-cores", "x"], "--plan-cores"),
])
def test_plan_flags_without_plan_or_bad_are_one_line(
        flags: list[str], named: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = SAMPLES["image-folder"](tmp_path / "raw")
    code, out, err = plan_cli(["--source", "image-folder", "--src", src, "--dst",
                               str(tmp_path / "store"), "--size", "24", *flags], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert: error:") and named in lines[0], err
    assert not (tmp_path / "store").exists()
    assert out == ""  # no plan printed
