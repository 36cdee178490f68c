"""The ``dali_packed`` loader: DALI index files from the shard index, reader arguments,
source-info positions and the refusal on the CPU; a real run on a GPU.

The index files are parsed back the way DALI's ``webdataset_loader.cc`` does
(``ParseIndexFile``: ``<version> <count>`` first; ``ParseSampleDesc``: per sample
``<ext> <offset> <size> <filename>`` repeated, offsets on the 512-byte tar grid) and
every component is read from the tar at its offset, as DALI's ``ReadSample`` does.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from node.loaders import LOADER_SPECS, LoaderConfig, LoaderUnavailable, ShardSlice
from node.loaders.base import epoch_batches
from node.loaders.dali_packed import (INDEX_VERSION, DaliPackedLoader, TarSample, cls_labels,
                                      epoch_order, index_text, reader_arguments,
                                      shard_samples, source_positions, write_epoch_indexes)
from shared.formats import get_format
from shared.shards import read_index, shard_path, write_shard
from shared.storage import Store

FORMAT_ID = "wds-jpeg-q95"
H, W, C = 24, 20, 3
PER_SHARD = 25
NO_CUDA = not torch.cuda.is_available()
Component = tuple[str, int, int, str]  # ext, offset, size, member name


def parse_like_dali(text: str) -> list[list[Component]]:
    """An index file read as DALI's ParseIndexFile/ParseSampleDesc read it."""
    lines = text.split("\n")
    version, count = lines[0].split()
    assert version == INDEX_VERSION and int(count) > 0
    samples = []
    for line in lines[1:1 + int(count)]:
        fields = line.split()
        assert fields and len(fields) % 4 == 0  # every component has all four fields
        components = [(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                      for i in range(0, len(fields), 4)]
        assert all(offset % 512 == 0 for _, offset, _, _ in components)
        samples.append(components)
    assert lines[1 + int(count):] == [""]
    return samples


def tar_listing(tar_path: Path) -> list[list[Component]]:
    """What wds2idx would list: regular members grouped by basename, in tar order."""
    grouped: list[list[Component]] = []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            base, ext = m.name.split(".", 1)
            if not grouped or grouped[-1][0][3].split(".", 1)[0] != base:
                grouped.append([])
            grouped[-1].append((ext, m.offset_data, m.size, m.name))
    return grouped


def make_config(root: Path, ranges: tuple[tuple[int, int], ...] = ((3, PER_SHARD), (0, 20)),
                device: torch.device = torch.device("cpu"), batch_size: int = 8) -> LoaderConfig:
    """Two real ``wds-jpeg-q95`` shards under ``root`` (labels up to four digits, so the
    ``.cls`` members differ in size) and a config over ``ranges``."""
    store, fmt = Store.open(str(root)), get_format(FORMAT_ID)
    rng = np.random.default_rng(5)
    slices = []
    for s, (start, stop) in enumerate(ranges):
        rel = shard_path(FORMAT_ID, "train", s)
        if not (root / rel / "index.parquet").exists():
            y, x = np.mgrid[0:H, 0:W]
            images = np.stack([np.clip(rng.uniform(40, 215, C) + x[..., None] * rng.uniform(
                -3, 3, C) + y[..., None] * rng.uniform(-3, 3, C), 0, 255).astype(np.uint8)
                for _ in range(PER_SHARD)])
            write_shard(store, fmt, "train", s, [f"s{s}-{i}" for i in range(PER_SHARD)],
                        images, rng.integers(0, 2000, PER_SHARD))
        index = read_index(root / rel / "index.parquet")
        slices.append(ShardSlice(location=str(root / rel), labels=index.column("label").to_numpy(),
                                 files=None, start=start, stop=stop))
    return LoaderConfig(fmt=fmt, shards=tuple(slices), batch_size=batch_size, workers=2, seed=3,
                        device=device, image_shape=(H, W, C))


def read_span(tar_path: str, offset: int, size: int) -> bytes:
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return f.read(size)


# --------------------------------------------------------------------------- index files

def test_index_of_a_whole_shard_is_what_a_tar_scan_lists(tmp_path: Path) -> None:
    config = make_config(tmp_path, ranges=((0, PER_SHARD),))
    shard = config.shards[0]
    tar_path = Path(shard.location) / "samples.tar"
    parsed = parse_like_dali(index_text(shard_samples(shard)))
    assert parsed == tar_listing(tar_path)
    assert [c[0] for c in parsed[0]] == ["jpg", "cls"]


def test_index_components_read_the_members_bytes(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    for shard in config.shards:
        tar_path = str(Path(shard.location) / "samples.tar")
        samples = shard_samples(shard)
        assert len(samples) == len(shard)
        order = np.random.default_rng(1).permutation(len(samples)).tolist()
        parsed = parse_like_dali(index_text([samples[i] for i in order]))
        with tarfile.open(tar_path) as tar:
            for i, (image, label) in zip(order, parsed, strict=True):
                assert image[3] == samples[i].member
                for _, offset, size, name in (image, label):
                    assert read_span(tar_path, offset, size) == tar.extractfile(name).read()
                assert int(read_span(tar_path, label[1], label[2])) == \
                    shard.labels[shard.start + i]


def test_index_refuses_what_dali_would_reject() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        index_text([])
    with pytest.raises(ValueError, match="000001.jpg: not a packed tar member"):
        index_text([TarSample("000001.jpg", 700, 10, 3)])


def test_epoch_indexes_list_every_sample_once(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    tars = [str(Path(s.location) / "samples.tar") for s in config.shards]
    samples = [shard_samples(s) for s in config.shards]
    folder = tmp_path / "idx"
    folder.mkdir()
    orders = []
    for epoch in (0, 1):
        epoch_tars, paths = write_epoch_indexes(str(folder), tars, samples, 3, epoch)
        assert sorted(epoch_tars) == sorted(tars)
        listed = [(tar, c[0][1]) for tar, p in zip(epoch_tars, paths, strict=True)
                  for c in parse_like_dali(Path(p).read_text())]
        want = [(t, s.offset) for t, shard in zip(tars, samples) for s in shard]
        assert sorted(listed) == sorted(want) and len(set(listed)) == len(want)
        orders.append(listed)
    assert orders[0] != orders[1]
    texts = [Path(p).read_text() for p in paths]
    assert write_epoch_indexes(str(folder), tars, samples, 3, 1) == (epoch_tars, paths)
    assert [Path(p).read_text() for p in paths] == texts  # the same seed, the same files


def test_epoch_order_is_seeded() -> None:
    shards, orders = epoch_order([5, 7], seed=3, epoch=0)
    again = epoch_order([5, 7], seed=3, epoch=0)
    assert shards == again[0] and all(np.array_equal(a, b) for a, b in zip(orders, again[1]))
    assert sorted(shards) == [0, 1]
    assert [sorted(o.tolist()) for o in orders] == [list(range(5)), list(range(7))]
    plain = epoch_order([5, 7], seed=3, epoch=0, shuffle=False)
    assert plain[0] == [0, 1] and [o.tolist() for o in plain[1]] == [list(range(5)),
                                                                    list(range(7))]
    other = [epoch_order([50], seed=3, epoch=e)[1][0].tolist() for e in (1, 2)]
    assert other[0] != other[1]
    assert len({tuple(epoch_order([1] * 6, seed=3, epoch=e)[0]) for e in range(4)}) > 1


# --------------------------------------------------------------------------- reader outputs

def padded(rows: list[bytes]) -> np.ndarray:
    """Rows as DALI's fn.pad(fill_value=0) hands them over: one zero-padded uint8 row each."""
    width = max(len(r) for r in rows)
    return np.stack([np.frombuffer(r.ljust(width, b"\0"), dtype=np.uint8) for r in rows])


def test_source_info_gives_positions() -> None:
    position_of = {("/c/a:b/samples.tar", 512): 0, ("/c/a:b/samples.tar", 2048): 1,
                   ("/c/x/samples.tar", 512): 2}
    # webdataset_loader.cc, ReadSample: make_string_delim(':', path, offset, filename)
    info = padded([b"/c/x/samples.tar:512:000000.jpg", b"/c/a:b/samples.tar:2048:000001.jpg",
                   b"/c/a:b/samples.tar:512:000000.jpg"])
    assert source_positions(info, position_of).tolist() == [2, 1, 0]
    with pytest.raises(RuntimeError, match=r"^dali_packed: DALI returned '/c/x/samples.tar:"
                                           r"1024:000001.jpg', which"):
        source_positions(padded([b"/c/x/samples.tar:1024:000001.jpg"]), position_of)


def test_cls_members_give_labels() -> None:
    assert cls_labels(padded([b"7", b"1999", b"0"])).tolist() == [7, 1999, 0]


def test_reader_arguments() -> None:
    args = reader_arguments(["/c/1/samples.tar", "/c/0/samples.tar"], ["/t/1.idx", "/t/0.idx"],
                            "jpg", seed=2**40 + 5)
    assert args["paths"] == ["/c/1/samples.tar", "/c/0/samples.tar"]
    assert args["index_paths"] == ["/t/1.idx", "/t/0.idx"]
    assert args["ext"] == ["jpg", "cls"] and args["name"] == "Reader"
    assert (args["random_shuffle"], args["shard_id"], args["num_shards"]) == (False, 0, 1)
    assert args["pad_last_batch"] and args["seed"] == 5
    with pytest.raises(ValueError, match="^dali_packed: 1 tars, 2 index files$"):
        reader_arguments(["/c/0/samples.tar"], ["/t/0.idx", "/t/1.idx"], "jpg", seed=0)


# --------------------------------------------------------------------------- registry, refusal

def test_registered_for_packed_formats() -> None:
    spec = LOADER_SPECS["dali_packed"]
    assert spec.load() is DaliPackedLoader and spec.device_kind == "cuda"
    assert spec.supports(get_format(FORMAT_ID)) and spec.supports(get_format("wds-png"))
    assert not spec.supports(get_format("jpeg-q95"))
    assert DaliPackedLoader.follows_plan is False


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_refuses_in_one_line_without_cuda(tmp_path: Path) -> None:
    reason = DaliPackedLoader.unavailable_reason()
    assert reason == "dali_packed: needs an NVIDIA GPU; torch.cuda.is_available() is False"
    with pytest.raises(LoaderUnavailable, match="^dali_packed: needs --device cuda, got cpu$"):
        DaliPackedLoader(make_config(tmp_path))


# --------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_epochs_on_the_gpu(tmp_path: Path) -> None:
    if DaliPackedLoader.unavailable_reason():
        pytest.skip(DaliPackedLoader.unavailable_reason())
    config = make_config(tmp_path, device=torch.device("cuda"))
    fmt = config.fmt
    expected = np.concatenate([np.stack([fmt.open_reader(s.location).read(i)
                                         for i in range(s.start, s.stop)])
                               for s in config.shards])
    loader = DaliPackedLoader(config)
    try:
        orders = []
        for epoch in (0, 1):
            batches = list(loader.epoch(epoch))
            assert len(batches) == len(epoch_batches(config.num_samples, config.batch_size,
                                                     config.seed, epoch))
            positions = torch.cat([b.positions for b in batches]).numpy()
            assert sorted(positions.tolist()) == list(range(config.num_samples))
            for b in batches:
                assert b.images.is_cuda and b.images.dtype == torch.uint8
                assert b.labels.cpu().tolist() == config.labels[b.positions.numpy()].tolist()
                want = expected[b.positions.numpy()]
                assert np.abs(b.images.cpu().numpy().astype(int) - want).mean() < 3.0
            orders.append(positions.tolist())
        assert orders[0] != orders[1]
    finally:
        loader.close()
