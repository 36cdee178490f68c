"""prep/convert.py checks every output location before any work: exit 2, one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from prep.convert import main


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    (tmp_path / "src" / "cat").mkdir(parents=True)
    return tmp_path / "src"


@pytest.mark.parametrize("flag, where, what", [
    ("--dst", "file", "the store to write <name>/ into"),
    ("--dst", "inside", "the store to write <name>/ into"),
    ("--results", "file", "the results store"),
])
def test_an_output_that_is_a_file_is_refused_before_work(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, where: str,
        what: str) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    target = a_file if where == "file" else a_file / "store"
    urls = {"--dst": str(tmp_path / "store"), "--results": None, flag: str(target)}
    argv = ["--source", "image-folder", "--src", str(src), "--size", "32",
            "--address", "inline", "--formats", "png"]
    for name, url in urls.items():
        argv += [name, url] if url else []
    # An empty source would fail with "holds no files": the output check comes first.
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"convert: error: {flag} {a_file} is a file; it must be a folder ({what})"]
    assert a_file.read_text() == "not a folder" and not (tmp_path / "store").exists()


def test_val_fraction_default_shows_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "for val (default: 0.1)" in " ".join(capsys.readouterr().out.split())


def test_progress_text_estimates_from_the_images_so_far() -> None:
    from prep.convert import progress_text

    assert progress_text(40, 120, 2.0) == "40/120 images, 20 img/s, about 4 s left"


def test_result_table_goes_to_stdout_with_names_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (40 * i, 90, 10)).save(tmp_path / "src" / cls / f"{i}.png")
    argv = ["--source", "image-folder", "--src", str(tmp_path / "src"), "--dst",
            str(tmp_path / "store"), "--size", "16", "--address", "inline", "--formats",
            "webp-lossless,tiff-lzw"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "webp-lossless" in out and "tiff-lzw" in out and "…" not in out
    assert "webp-lossless" not in err.replace("--formats", "")


def test_conversions_record_quality_of_lossy_formats(tmp_path: Path) -> None:
    """psnr_db/ssim per lossy format and split, equal to what its shard files decode to
    against the npy shard (the decoded source); null for lossless; chroma subsampling."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from shared.formats import get_format
    from shared.quality import measure

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(8):
            y, x = np.mgrid[0:30, 0:40]  # smooth colours and mild noise, as in photos
            pixels = np.clip(rng.uniform(0, 255, 3) + x[..., None] * rng.uniform(-3, 3, 3)
                             + y[..., None] * rng.uniform(-3, 3, 3)
                             + rng.normal(0, 4, (30, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "src" / cls / f"{i}.png")
    store = tmp_path / "store"
    assert main(["--source", "image-folder", "--src", str(tmp_path / "src"), "--dst",
                 str(store), "--size", "24", "--address", "inline", "--results",
                 str(tmp_path / "results"), "--formats", "npy,jpeg-q95,jpeg-q95-444,png",
                 "--val-fraction", "0.25"]) == 0
    rows = pd.read_parquet(tmp_path / "results" / "conversions").set_index(["format", "split"])
    assert rows.loc[("png", "train"), ["psnr_db", "ssim"]].isna().all()
    assert rows.loc[("png", "train"), "chroma_subsampling"] == "4:4:4"
    assert rows.loc[("jpeg-q95", "val"), "chroma_subsampling"] == "4:2:0"
    assert rows.loc[("jpeg-q95-444", "val"), "chroma_subsampling"] == "4:4:4"
    for split in ("train", "val"):
        shard = store / "image-folder" / "npy" / split / "shard-00000"
        source = np.load(shard / "images.npy")
        for fid in ("jpeg-q95", "jpeg-q95-444"):
            folder = store / "image-folder" / fid / split / "shard-00000"
            files = pd.read_parquet(folder / "index.parquet")["file"]
            fmt = get_format(fid)
            decoded = [fmt.decode((folder / f).read_bytes()) for f in files]
            expected = measure(list(source), decoded)
            assert rows.loc[(fid, split), "psnr_db"] == pytest.approx(expected.psnr_db)
            assert rows.loc[(fid, split), "ssim"] == pytest.approx(expected.ssim)
            assert 0 < expected.ssim < 1 and 30 < expected.psnr_db < 60
    assert rows.loc[("jpeg-q95-444", "train"), "psnr_db"] > rows.loc[("jpeg-q95", "train"),
                                                                      "psnr_db"]


def test_command_line_parses_into_one_frozen_config() -> None:
    import dataclasses

    from prep.config import ConvertConfig, parse_config

    config = parse_config(["--source", "image-folder", "--src", "s3://raw/masks", "--dst", "out",
                           "--size", "64", "--formats", "png,jpeg-q80", "--val-fraction", "0.25",
                           "--address", "inline"])
    assert isinstance(config, ConvertConfig)
    assert (config.source.kind, config.source.url) == ("image-folder", "s3://raw/masks")
    assert config.output.name == "image-folder"  # --name defaults to the source kind
    assert [f.id for f in config.conversion.formats] == ["png", "jpeg-q80"]
    assert (config.conversion.size, config.conversion.seed, config.address) == (64, 0, "inline")
    # Each source gets the options it declares, whatever flags were given.
    assert config.source.options() == {"val_fraction": 0.25}
    assert dataclasses.replace(config.source, kind="cifar10").options() == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.output.dst = "elsewhere"  # type: ignore[misc]


def test_choices_and_help_come_from_the_registries(capsys: pytest.CaptureFixture[str]) -> None:
    from prep.config import UsageError, parse_config
    from prep.sources import SOURCES
    from shared.formats import format_id_help

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    # click wraps lines at spaces and after hyphens ("wds-" / "jpeg-q95"): compare unwrapped
    assert "".join(format_id_help().split()) in "".join(out.split())
    assert all(name in text for name in SOURCES.names())
    with pytest.raises(UsageError) as err:
        parse_config(["--source", "nope", "--src", "x", "--dst", "y"])
    assert all(repr(name) in str(err.value) for name in SOURCES.names())
