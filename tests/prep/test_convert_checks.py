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
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "for val (default: 0.1)" in " ".join(capsys.readouterr().out.split())
