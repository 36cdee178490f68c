"""Fixtures shared by the node-agent tests: one small converted CIFAR-10 layout dataset.

The dataset is generated in the official python-archive layout (``testdata.datagen``) and
converted in-process (``--address inline``, no Ray) once per session: 500 train and
100 test images, shards of 200 samples (train: 200 + 200 + 100, so ranks can start and
stop inside a shard), in the formats the CPU loaders read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.manifest import Manifest
from shared.storage import Store

# Every conftest.py outside a package is imported as the module ``conftest``, so once
# this file is loaded ``from conftest import ...`` (tests/shared/test_storage.py) finds
# this module: re-export the root conftest's names it uses.
_spec = importlib.util.spec_from_file_location(
    "_formatlab_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _root  # its dataclasses look their module up
_spec.loader.exec_module(_root)  # type: ignore[union-attr]
S3_KEY, S3_SECRET, start_s3_server = _root.S3_KEY, _root.S3_SECRET, _root.start_s3_server

DATASET = "cifar10"
FORMATS = ("png", "jpeg-q95", "npy", "hdf5-gzip", "zarr-zstd", "npy-files")
TRAIN, TEST = 500, 100
SHARD_SAMPLES = 200
S3_FORMATS = ("npy", "png")


@dataclass(frozen=True)
class Dataset:
    """A converted dataset: its store URL, name, manifest and what converting printed."""

    store: str
    name: str
    manifest: Manifest
    output: str = ""
    storage_options: str | None = None  # JSON, for stores that need credentials

    def store_obj(self) -> Store:
        return Store.open(self.store, json.loads(self.storage_options or "{}"))


def convert(src: Path | str, dst: str, formats: tuple[str, ...], *extra: str) -> tuple[int, str]:
    """Run prep/convert.py in-process (no Ray); returns its exit code and its output."""
    from prep.convert import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["--source", "cifar10", "--src", str(src), "--dst", dst,
                     "--address", "inline", "--formats", ",".join(formats),
                     "--shard-samples", str(SHARD_SAMPLES), *extra])
    return code, out.getvalue()


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 python archive of 500 train and 100 test learnable images."""
    from testdata.datagen import make_cifar10_python

    path = tmp_path_factory.mktemp("cifar-src") / "cifar-10-python.tar.gz"
    make_cifar10_python(str(path), train_per_batch=TRAIN // 5, test=TEST)
    return path


@pytest.fixture(scope="session")
def dataset(cifar_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The archive converted to a local store in every CPU loader's formats."""
    store = tmp_path_factory.mktemp("store") / "store"
    code, output = convert(cifar_archive, str(store), FORMATS)
    assert code == 0, output
    manifest = Manifest.load(Store.open(str(store)), DATASET)
    return Dataset(str(store), DATASET, manifest, output)


@pytest.fixture(scope="session")
def s3_dataset(cifar_archive: Path, s3_server) -> Dataset:  # noqa: ANN001 - root fixture
    """The archive converted to ``s3://node-data/store`` on the loopback S3 server
    (credentials in ``--storage-options``); ``output`` is what the conversion printed."""
    bucket = s3_server.bucket("node-data")
    options = json.dumps(s3_server.storage_options)
    code, output = convert(cifar_archive, f"{bucket}/store", S3_FORMATS,
                           "--storage-options", options)
    assert code == 0, output
    manifest = Manifest.load(Store.open(f"{bucket}/store", s3_server.storage_options), DATASET)
    return Dataset(f"{bucket}/store", DATASET, manifest, output, options)


def copy_store(src: Dataset, dst: Path, formats: tuple[str, ...] | None = None) -> Dataset:
    """A private copy of a local dataset (only ``formats``' folders), safe to damage."""
    root = Path(src.store) / src.name
    target = dst / src.name
    target.mkdir(parents=True)
    shutil.copy2(root / "manifest.json", target / "manifest.json")
    for fid in formats or src.manifest.format_ids:
        shutil.copytree(root / fid, target / fid)
    return Dataset(str(dst), src.name, src.manifest)


def files_under(*roots: Path | str) -> Iterator[Path]:
    """Every regular file below ``roots``."""
    for root in roots:
        root = Path(root)
        if root.is_file():
            yield root
        elif root.exists():
            yield from (p for p in root.rglob("*") if p.is_file())


def assert_secret_nowhere(secret: str, *roots: Path | str, texts: tuple[str, ...] = ()) -> None:
    """``secret`` occurs in no file below ``roots`` and in none of ``texts``."""
    needle = secret.encode()
    hits = [str(p) for p in files_under(*roots) if needle in p.read_bytes()]
    assert not hits, f"secret found in files: {hits}"
    for i, text in enumerate(texts):
        assert secret not in text, f"secret found in output #{i}"


@pytest.fixture
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pin PyTorch to one intra-op thread, whatever a run asks for.

    A run sets ``cores - workers`` threads; on a busy shared 2-core test box OpenMP
    threads spin-wait on each other and a tiny ConvNet step gets several times slower.
    """
    import torch

    real = torch.set_num_threads
    before = torch.get_num_threads()
    real(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: real(1))
    yield
    real(before)
