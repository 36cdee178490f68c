"""The one contract every registered loader keeps (DESIGN section 5).

Cases come from the registries: every registered loader, crossed with every registered
format id that its ``supports()`` accepts, so a loader or format registered later is
tested without editing this file (``test_a_registered_format_and_loader_join_the_contract``
shows it). CUDA loaders, and CPU loaders delivering to a CUDA device (pinned memory,
asynchronous copies), are marked ``gpu`` and skip without a GPU.

Each sample's pixels encode its global index (R: index // 16, G: index % 16, B: a
gradient that catches a transposed layout), so a decoded batch says which samples it
holds; labels are random, so a label/image mix-up shows.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from node.loaders import (
    LOADER_SPECS,
    LOADERS,
    Batch,
    Loader,
    LoaderConfig,
    LoaderSpec,
    Reads,
    ShardSlice,
)
from node.loaders.base import epoch_batches
from node.loaders.common import ShardMap
from node.loaders.numpy_mmap import NumpyMmapLoader
from node.machine import mapped_files
from shared.formats import FORMATS, FormatKind, PillowFormat, get_format
from shared.formats.base import is_url
from shared.formats.registry import register, registered_ids
from shared.shards import read_index, shard_path, write_shard
from shared.storage import Store

SHARDS, PER_SHARD = 3, 37
H, W, C = 12, 16, 3  # not square: a swapped height and width cannot pass
BATCH = 16
SEED = 7
SPLIT = "train"
NUM_CLASSES = 10

# name -> (workers, rank range per shard): the whole sequence, or one that starts and stops
# inside a shard (as a rank of a world larger than the shard count gets).
FULL = ((0, PER_SHARD), (0, PER_SHARD), (0, PER_SHARD))
MIDDLE = ((5, PER_SHARD), (0, PER_SHARD), (0, 30))
RUNS = {"w0-full": (0, FULL), "w2-mid": (2, MIDDLE)}

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# The file loader's decoders; see node/loaders/file.py.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def image_of(index: int) -> np.ndarray:
    """The pixels that identify global sample ``index``."""
    image = np.empty((H, W, C), dtype=np.uint8)
    image[..., 0] = (index // 16) * 32 + 16
    image[..., 1] = (index % 16) * 16 + 8
    image[..., 2] = 8 * np.arange(W)[None, :] + 4 * np.arange(H)[:, None]
    return image


def identity_of(image: np.ndarray) -> int:
    """The global index an (approximately) decoded image encodes."""
    r = round((float(image[..., 0].mean()) - 16) / 32)
    g = round((float(image[..., 1].mean()) - 8) / 16)
    return r * 16 + g


LABELS = np.random.default_rng(SEED).integers(0, NUM_CLASSES, SHARDS * PER_SHARD)


@dataclass(frozen=True)
class Case:
    loader: type[Loader]
    format_id: str
    run: str
    url: bool = False  # read the shards from a memory:// store URL (the --no-cache path)
    cuda: bool = False  # deliver to a CUDA device

    @property
    def id(self) -> str:
        return "-".join([self.loader.name, self.format_id, self.run]
                        + ["url"] * self.url + ["cuda"] * self.cuda)


def contract_cases() -> Iterator[Case]:
    """Every registered loader crossed with every registered format id it supports."""
    for name in LOADER_SPECS:
        loader = LOADERS[name]
        on_gpu = loader.device_kind == "cuda"
        for format_id in registered_ids():
            if not loader.supports(get_format(format_id)):
                continue
            yield from (Case(loader, format_id, run, cuda=on_gpu) for run in RUNS)
            if LOADER_SPECS[loader.name].streams:  # reads the store URL (--no-cache)
                yield Case(loader, format_id, "w2-mid", url=True, cuda=on_gpu)
            if not on_gpu:
                yield from (Case(loader, format_id, run, cuda=True) for run in RUNS)


def cases() -> Iterator[pytest.param]:
    for case in contract_cases():
        yield pytest.param(case, id=case.id, marks=GPU if case.cuda else [])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, bool], str]]:
    """Shard roots by (format id, url): written on first use, once per module."""
    local = Store.open(str(tmp_path_factory.mktemp("loader-contract")))
    memory_url = f"memory://loader-contract-{os.getpid()}"
    memory = Store.open(memory_url)

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, key: tuple[str, bool]) -> str:
            format_id, url = key
            store = memory if url else local
            fmt = get_format(format_id)
            for s in range(SHARDS):
                ids = range(s * PER_SHARD, (s + 1) * PER_SHARD)
                write_shard(store, fmt, SPLIT, s, [f"k{i}" for i in ids],
                            np.stack([image_of(i) for i in ids]), LABELS[list(ids)])
            self[key] = store.url if url else store.root
            return self[key]

    yield Lazy()
    memory.delete("", recursive=True)


def make_config(case: Case, root: str, device: torch.device) -> tuple[LoaderConfig, np.ndarray]:
    """The loader's config and, for each rank position, the global sample index."""
    slices, identities = [], []
    for s, (start, stop) in enumerate(RUNS[case.run][1]):
        rel = shard_path(case.format_id, SPLIT, s)
        location = f"{root}/{rel}"
        if case.url:
            index = read_index(Store.open(root).read_bytes(f"{rel}/index.parquet"))
        else:
            index = read_index(Path(location) / "index.parquet")
        files = tuple(index.column("file").to_pylist()) if "file" in index.column_names else None
        slices.append(ShardSlice(location=location, labels=index.column("label").to_numpy(),
                                 files=files, start=start, stop=stop,
                                 keys=tuple(index.column("key").to_pylist())))
        identities.append(np.arange(start, stop) + s * PER_SHARD)
    config = LoaderConfig(fmt=get_format(case.format_id), shards=tuple(slices),
                          batch_size=BATCH, workers=RUNS[case.run][0], seed=SEED,
                          device=device, image_shape=(H, W, C))
    return config, np.concatenate(identities)


def run_epoch(loader: Loader, epoch: int) -> list[Batch]:
    return list(loader.epoch(epoch))


def expected_bytes(config: LoaderConfig) -> int | None:
    """Bytes one epoch must read, where the format fixes it exactly."""
    fmt = config.fmt
    if fmt.kind is FormatKind.FILES:
        return sum(os.path.getsize(os.path.join(s.location, f))
                   for s in config.shards for f in s.files[s.start:s.stop])
    if fmt.kind is FormatKind.PACKED:  # each sample's member, once
        return sum(sum(read_index(f"{s.location}/index.parquet" if not is_url(s.location)
                                  else Store.open(s.location).read_bytes("index.parquet"))
                       .column("bytes").to_pylist()[s.start:s.stop]) for s in config.shards)
    if fmt.id in ("npy", "hdf5"):  # uncompressed, one sample per chunk or row
        return config.num_samples * H * W * C
    if fmt.family == "hdf5":  # one chunk per sample: each sample's stored chunk, once
        import h5py

        total = 0
        for s in config.shards:
            with h5py.File(os.path.join(s.location, "data.h5"), "r") as f:
                dset = f["images"].id
                total += sum(dset.get_chunk_info_by_coord((i, 0, 0, 0)).size
                             for i in range(s.start, s.stop))
        return total
    return None


def planned(loader: Loader, config: LoaderConfig, epoch: int) -> list[np.ndarray]:
    """The batches ``loader`` must deliver in ``epoch``: the rank's permutation, except
    a streamed ``packed`` epoch, which is its block order (shards shuffled, then each
    block's samples; :func:`node.loaders.packed_stream.stream_schedule`)."""
    from node.loaders.packed import PackedThreadLoader

    if isinstance(loader, PackedThreadLoader) and is_url(config.shards[0].location):
        return list(loader.stream_schedule(epoch).batches)
    return epoch_batches(config.num_samples, BATCH, SEED, epoch)


def check_epoch(batches: list[Batch], config: LoaderConfig, identities: np.ndarray,
                plan: list[np.ndarray], lossless: bool, follows_plan: bool = True
                ) -> np.ndarray:
    """Check one epoch against the contract; returns its positions in delivery order.

    ``follows_plan``: the loader batches the epoch's planned positions (a peer's own
    pipeline, ``webdataset``, shuffles its own way: only exactly-once is asked of it).
    """
    n = config.num_samples
    assert len(batches) == len(plan)
    for batch, planned in zip(batches, plan, strict=True):
        images, labels, positions = batch.images, batch.labels, batch.positions
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert positions.dtype == torch.int64 and positions.device.type == "cpu"
        assert images.device.type == labels.device.type == config.device.type
        assert tuple(images.shape) == (len(planned), H, W, C)
        assert tuple(labels.shape) == (len(planned),)
        # A loader may reorder samples within a batch, never across batches.
        if follows_plan:
            assert sorted(positions.tolist()) == sorted(planned.tolist())
        assert batch.bytes_read > 0
        pixels = images.cpu().numpy()
        expected = identities[positions.numpy()]
        found = [identity_of(image) for image in pixels]
        assert found == expected.tolist()
        assert labels.cpu().numpy().tolist() == LABELS[expected].tolist()
        if lossless:
            assert np.array_equal(pixels, np.stack([image_of(i) for i in expected]))
    sizes = [len(b.positions) for b in batches]
    assert sizes[:-1] == [BATCH] * (len(sizes) - 1) and sizes[-1] == n - BATCH * (len(sizes) - 1)
    order = torch.cat([b.positions for b in batches]).numpy()
    assert np.array_equal(np.sort(order), np.arange(n))  # every sample exactly once
    return order


@pytest.mark.parametrize("case", list(cases()))
def test_loader_contract(case: Case, datasets: dict[tuple[str, bool], str]) -> None:
    reason = case.loader.unavailable_reason()
    if reason:
        pytest.skip(reason)
    check_contract(case, datasets)


def check_contract(case: Case, datasets: dict[tuple[str, bool], str]) -> None:
    """One case of the contract: two epochs, release, reopen, same-seed order, bytes."""
    device = torch.device("cuda" if case.cuda else "cpu")
    config, identities = make_config(case, datasets[case.format_id, case.url], device)
    lossless = config.fmt.lossless
    follows = getattr(case.loader, "follows_plan", True)
    children = set(multiprocessing.active_children())
    first, second = case.loader(config), case.loader(config)
    try:
        assert len(first) == -(-config.num_samples // BATCH)
        epoch0 = run_epoch(first, 0)
        order0 = check_epoch(epoch0, config, identities, planned(first, config, 0), lossless,
                             follows)
        for loader in (first, second):  # what --cold does: nothing of the shards stays mapped
            loader.release()
        shard_files = {os.path.realpath(p) for s in config.shards if not case.url
                       for p in Path(s.location).rglob("*")}
        assert not shard_files & mapped_files(), "release() left shard files mapped"
        resources = first.resources()
        assert set(resources) == {"threads", "processes"}
        assert resources["threads"] + resources["processes"] >= 1
        epoch1 = run_epoch(first, 1)  # reopened lazily
        order1 = check_epoch(epoch1, config, identities, planned(first, config, 1), lossless,
                             follows)
        assert not np.array_equal(order0, order1), "epochs 0 and 1 came in the same order"
        again = check_epoch(run_epoch(second, 0), config, identities,
                            planned(second, config, 0), lossless, follows)
        assert np.array_equal(order0, again), "the same seed gave a different order"

        exact = expected_bytes(config)
        for batches in (epoch0, epoch1):
            total = sum(b.bytes_read for b in batches)
            if exact is not None:
                assert total == exact
            else:  # chunked containers: at most the chunks of the shards a batch touches
                chunks = chunk_bytes(config)
                for b in batches:
                    touched = np.unique(ShardMap(config.shards).locate(b.positions.numpy())[0])
                    assert 0 < b.bytes_read <= sum(chunks[k] for k in touched.tolist())
                assert total >= sum(chunks)  # every shard's chunk read at least once
    finally:
        first.close()
        second.close()
    left = set(multiprocessing.active_children()) - children
    assert not left, f"close() left worker processes running: {left}"


class PpmFormat(PillowFormat):
    """``ppm``: a new format is one class like this and one ``register`` line."""

    def __init__(self) -> None:
        super().__init__("ppm", "ppm", True, extension="ppm", compression="none",
                         pillow_format="PPM", save_options={})


class MmapCopyLoader(NumpyMmapLoader):
    """A new loader: one class and one ``LOADER_SPECS.register`` line."""

    name = "mmap_copy"


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The format and loader registries, as they were, after the test."""
    for registry in (FORMATS, LOADER_SPECS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(FORMATS, "catalog", list(FORMATS.catalog))


def test_a_registered_format_and_loader_join_the_contract(
        registries: None, datasets: dict[tuple[str, bool], str]) -> None:
    before = {c.id for c in contract_cases()}
    register(PpmFormat)
    LOADER_SPECS.register(LoaderSpec("mmap_copy", f"{__name__}:MmapCopyLoader", "cpu",
                                     Reads(families=("npy",)), "numpy_mmap, renamed"))
    added = {c.id: c for c in contract_cases() if c.id not in before}
    # The file loader reads every file format, DALI's decoder only the families it knows.
    assert {"file-ppm-w0-full", "file-ppm-w2-mid", "mmap_copy-npy-w0-full"} <= set(added)
    assert not any(i.startswith("dali-ppm") for i in added)
    assert "ppm" in LOADER_SPECS["file"].formats_help
    assert LOADERS["mmap_copy"].formats_help == "npy"
    for case_id in ("file-ppm-w0-full", "mmap_copy-npy-w0-full"):
        check_contract(added[case_id], datasets)


def chunk_bytes(config: LoaderConfig) -> list[int]:
    """Stored bytes of each shard's image chunks (Zarr: files under ``data.zarr/images/c``)."""
    out = []
    for s in config.shards:
        store = Store.open(s.location)
        out.append(sum(store.size(rel) for rel in store.walk_files("data.zarr/images/c")))
    return out


@pytest.mark.parametrize("format_id", ["hdf5-gzip", "zarr-zstd"])
def test_new_generation_reopens_handles(format_id: str,
                                        datasets: dict[tuple[str, bool], str]) -> None:
    """What ``release()`` makes a persistent worker do: at the first item of the next
    generation its reader closes the files it holds (and HDF5's chunk cache with them)
    and opens them afresh."""
    loader_cls = LOADERS["hdf5" if format_id.startswith("hdf5") else "zarr"]
    case = Case(loader_cls, format_id, "w0-full")
    config, _ = make_config(case, datasets[format_id, False], torch.device("cpu"))
    reader = loader_cls(config).make_reader()
    positions = np.arange(4)

    def handle() -> object:
        shard = reader.shards[0]
        return shard._file if format_id.startswith("hdf5") else shard._group

    first = reader[(0, positions)]
    held = handle()
    assert held is not None
    reader[(0, positions)]
    assert handle() is held  # same generation: kept open
    again = reader[(1, positions)]
    assert handle() is not None and handle() is not held
    if format_id.startswith("hdf5"):
        assert not held.id.valid  # the old file was closed
    assert torch.equal(first.images, again.images)
    reader.close()


def test_loader_registry_is_the_one_declaration() -> None:
    """Names, the unknown-name error, and which formats each loader reads all come from
    ``LOADER_SPECS``; the formats column is derived from the format registry."""
    from node.loaders import UnknownLoader, get_loader, get_spec

    assert list(LOADERS) == list(LOADER_SPECS.names())
    for bad in (get_spec, get_loader):
        with pytest.raises(UnknownLoader, match=r"^unknown loader 'nope'; valid loaders: "
                                                r"file, numpy_mmap, .*nvjpeg, packed, webdataset$"):
            bad("nope")
    assert "nope" not in LOADERS and "file" in LOADERS
    assert LOADER_SPECS["file"].formats_help == \
        "bmp, png, tiff*, jpeg-*, jp2-*, webp-*, npy-files"
    assert LOADER_SPECS["hdf5"].formats_help == "hdf5*"
    assert LOADER_SPECS["packed"].formats_help == "wds-*"
    for name, spec in LOADER_SPECS.items():
        cls = LOADERS[name]
        assert cls.formats_help == spec.formats_help
        assert [f for f in registered_ids() if cls.supports(get_format(f))] == \
            [f for f in registered_ids() if spec.supports(get_format(f))], name
