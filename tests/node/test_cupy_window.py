"""The cupy loader's windowed mode on the CPU: the schedule of loads and which samples
each epoch sees (node/loaders/window.py), and the whole-or-windowed decision.

The CUDA side (loads on a thread into the two halves, gathers) is checked on a GPU by
``test_windowed_cupy_trains`` (marked ``gpu``; gpu-check runs it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from node.loaders.base import LoaderConfig, ShardSlice
from node.loaders.window import (
    CAP_ENV,
    WHOLE,
    WINDOWED,
    Residency,
    WindowSchedule,
    choose_residency,
    smallest_window,
    vram_cap,
    window_schedule,
)
from shared.formats import get_format
from shared.shards import read_index, shard_path, write_shard
from shared.storage import Store

# Uneven slices, one a handful of samples, as a rank of a larger world gets.
LENGTHS = (37, 37, 5, 37, 30, 37)
STARTS = (0, 0, 32, 0, 0, 0)
BATCH, HALF, SEED = 16, 40, 3


def schedule(epoch: int, **kw: object) -> WindowSchedule:
    args = {"half": HALF, "batch_size": BATCH, "seed": SEED, "epoch": epoch} | kw
    return window_schedule(LENGTHS, STARTS, **args)  # type: ignore[arg-type]


def replay(s: WindowSchedule) -> tuple[int, list[int]]:
    """Carry out the steps as the loader does, tracking which window rows hold which
    position; returns the most samples resident at once and the blocks in load order."""
    resident: dict[int, int] = {}  # window row -> position
    block_rows: dict[int, list[tuple[int, int]]] = {}
    half_owner: dict[int, int] = {}  # half -> block loaded in it
    done: set[int] = set()  # blocks whose last batch has run
    peak, loads = 0, []
    for kind, k in s.steps:
        if kind == "load":
            half = k % 2
            owner = half_owner.get(half)
            assert owner is None or owner in done, f"block {k} overwrites block {owner} in use"
            for row in [r for r, _ in block_rows.get(owner, [])]:
                resident.pop(row)
            pairs = [(seg.row + i, seg.position + i) for seg in s.blocks[k]
                     for i in range(seg.count)]
            assert all(half * s.half <= r < (half + 1) * s.half for r, _ in pairs)
            resident.update(pairs)
            block_rows[k], half_owner[half] = pairs, k
            loads.append(k)
            peak = max(peak, len(resident))
        else:
            lo, hi = s.spans[k]
            assert hi - lo <= 1  # at most two blocks, both loaded already
            assert lo in loads and hi in loads
            for p in s.batches[k].tolist():
                assert resident[int(s.rows[p])] == p  # the row the gather reads holds p
            if k == len(s.batches) - 1 or s.spans[k + 1][0] > lo:
                done.add(lo)
            if hi != lo and (k == len(s.batches) - 1 or s.spans[k + 1][0] > hi):
                done.add(hi)
    return peak, loads


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_every_sample_once_with_at_most_the_window_resident(epoch: int) -> None:
    s = schedule(epoch)
    n = sum(LENGTHS)
    order = np.concatenate(s.batches)
    assert np.array_equal(np.sort(order), np.arange(n))  # exactly once
    sizes = [len(b) for b in s.batches]
    assert sizes[:-1] == [BATCH] * (len(sizes) - 1) and len(sizes) == -(-n // BATCH)
    peak, loads = replay(s)
    assert peak <= 2 * HALF
    assert loads == list(range(len(s.blocks)))  # stream order, each block once
    # each block's segments are file ranges of its slices, inside the slice
    for block in s.blocks:
        assert 0 < sum(seg.count for seg in block) <= HALF
        for seg in block:
            assert STARTS[seg.shard] <= seg.index
            assert seg.index + seg.count <= STARTS[seg.shard] + LENGTHS[seg.shard]


def test_next_block_loads_while_the_current_one_trains() -> None:
    s = schedule(0)
    first_batch = {}
    for b, (lo, _) in enumerate(s.spans):
        first_batch.setdefault(lo, b)
    issued = {}
    batches_seen = 0
    for kind, k in s.steps:
        if kind == "load":
            issued[k] = batches_seen
        else:
            batches_seen += 1
    last_batch = {}
    for b, (lo, hi) in enumerate(s.spans):
        last_batch[lo] = last_batch[hi] = b
    assert issued[0] == issued[1] == 0  # block 1 right after block 0, before any batch
    for j in range(2, len(s.blocks)):
        # as soon as block j - 2's half is free, so by the end of block j - 1's first
        # batch: block j loads while block j - 1 trains
        assert issued[j] == last_batch[j - 2] + 1 <= first_batch[j - 1] + 1
    assert len(s.blocks) > 3


def test_shards_and_samples_shuffled_per_epoch_deterministically() -> None:
    a, b, again = schedule(0), schedule(1), schedule(0)
    assert all(np.array_equal(x, y) for x, y in zip(a.batches, again.batches, strict=True))
    assert [seg.shard for blk in a.blocks for seg in blk] != \
        [seg.shard for blk in b.blocks for seg in blk]
    assert not np.array_equal(np.concatenate(a.batches), np.concatenate(b.batches))
    # shuffled within a block: not the stream order
    stream = np.concatenate([np.arange(seg.position, seg.position + seg.count)
                             for blk in a.blocks for seg in blk])
    assert not np.array_equal(np.concatenate(a.batches), stream)
    # but each block's samples come out together (a batch spans at most two blocks)
    assert all(hi - lo <= 1 for lo, hi in a.spans)


def test_without_shuffle_the_order_is_the_sequence() -> None:
    s = schedule(4, shuffle=False)
    assert np.array_equal(np.concatenate(s.batches), np.arange(sum(LENGTHS)))
    assert replay(s)[0] <= 2 * HALF


def test_ranks_see_disjoint_slices_and_the_same_batch_count() -> None:
    """Two ranks, each with its own slices of the same shards (node.cache.assign's
    split): each sees its samples once, and both step the same number of batches."""
    rank_slices = [((37, 37, 20), (0, 0, 0)), ((17, 37, 37), (20, 0, 0))]
    counts = []
    for lengths, starts in rank_slices:
        s = window_schedule(lengths, starts, half=BATCH * 2, batch_size=BATCH, seed=SEED,
                            epoch=1)
        assert np.array_equal(np.sort(np.concatenate(s.batches)), np.arange(sum(lengths)))
        counts.append(len(s.batches))
        covered = {(seg.shard, seg.index + i) for blk in s.blocks for seg in blk
                   for i in range(seg.count)}
        assert covered == {(k, starts[k] + i) for k in range(3) for i in range(lengths[k])}
    assert counts[0] == counts[1]


def test_half_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold a batch"):
        window_schedule(LENGTHS, STARTS, half=BATCH - 1, batch_size=BATCH, seed=0, epoch=0)


# ----------------------------------------------------------------- whole or windowed

S = 512 * 512 * 3
GIB = 1 << 30


def test_whole_when_it_fits_windowed_when_not_refused_below_two_batches() -> None:
    n = 1000
    assert choose_residency(num_samples=n, sample_bytes=S, batch_size=64,
                            spare_bytes=n * S) == Residency(WHOLE, n * S)
    r = choose_residency(num_samples=n, sample_bytes=S, batch_size=64, spare_bytes=n * S - 1)
    assert r is not None and r.mode == WINDOWED
    assert r.vram_bytes == 2 * r.half * S <= (n * S - 1) // 2  # half of what is spare
    assert r.half >= 64
    tight = smallest_window(S, 64) * 2  # spare whose half is exactly two batches
    assert choose_residency(num_samples=n, sample_bytes=S, batch_size=64,
                            spare_bytes=tight).half == 64
    assert choose_residency(num_samples=n, sample_bytes=S, batch_size=64,
                            spare_bytes=tight - 1) is None


def test_two_loaders_share_what_is_spare() -> None:
    """Train windowed takes at most half of what is spare, so the val loader, checked
    after it against the same free memory less train's window, still gets room."""
    free, reserve = 16 * GIB, 4 * GIB
    train_n, val_n = 80_000, 10_000  # 59 GiB and 7 GiB at 512 px: neither fits whole
    train = choose_residency(num_samples=train_n, sample_bytes=S, batch_size=256,
                             spare_bytes=free - reserve)
    assert train is not None and train.mode == WINDOWED and train.vram_bytes <= 6 * GIB
    val = choose_residency(num_samples=val_n, sample_bytes=S, batch_size=256,
                           spare_bytes=free - reserve - train.vram_bytes)
    assert val is not None and val.mode == WINDOWED
    assert train.vram_bytes + val.vram_bytes + reserve <= free


def test_the_cap_forces_a_window_and_is_read_from_the_environment() -> None:
    cap = vram_cap({CAP_ENV: "64"})
    assert cap == 64 << 20
    r = choose_residency(num_samples=200, sample_bytes=S, batch_size=16,
                         spare_bytes=100 * GIB, cap_bytes=cap)
    assert r is not None and r.mode == WINDOWED and r.vram_bytes <= cap
    assert vram_cap({}) is None
    for bad in ("x", "-1"):
        with pytest.raises(ValueError, match=CAP_ENV):
            vram_cap({CAP_ENV: bad})


# --------------------------------------------------------------------------- on a GPU

def npy_config(root: Path, device: torch.device) -> LoaderConfig:
    """Three npy shards of random 24x20 images; the rank starts and stops inside shards."""
    store, fmt = Store.open(str(root)), get_format("npy")
    rng = np.random.default_rng(1)
    slices = []
    for s, (start, stop) in enumerate(((4, 37), (0, 37), (0, 11))):
        write_shard(store, fmt, "train", s, [f"s{s}-{i}" for i in range(37)],
                    rng.integers(0, 256, (37, 24, 20, 3), dtype=np.uint8),
                    rng.integers(0, 10, 37))
        location = root / shard_path("npy", "train", s)
        labels = read_index(location / "index.parquet").column("label").to_numpy()
        slices.append(ShardSlice(location=str(location), labels=labels, files=None,
                                 start=start, stop=stop))
    return LoaderConfig(fmt=fmt, shards=tuple(slices), batch_size=8, workers=0, seed=3,
                        device=device, image_shape=(24, 20, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_windowed_cupy_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced windowed by a small cap: every epoch delivers each sample once, with the
    pixels of the npy files, and says it ran windowed."""
    from node.loaders.cupy_loader import CupyLoader

    if CupyLoader.unavailable_reason():
        pytest.skip(CupyLoader.unavailable_reason())
    config = npy_config(tmp_path, torch.device("cuda"))
    sample = int(np.prod(config.image_shape))
    monkeypatch.setenv(CAP_ENV, str(4 * config.batch_size * sample / (1 << 20)))
    expected = np.concatenate([np.load(Path(s.location) / "images.npy")[s.start:s.stop]
                               for s in config.shards])
    loader = CupyLoader(config)
    try:
        loader.check_fits()
        for epoch in (0, 1):
            seen = []
            for batch in loader.epoch(epoch):
                assert batch.images.is_cuda and batch.labels.is_cuda
                assert np.array_equal(batch.images.cpu().numpy(),
                                      expected[batch.positions.numpy()])
                assert batch.labels.cpu().tolist() == \
                    config.labels[batch.positions.numpy()].tolist()
                seen.append(batch.positions)
            assert torch.cat(seen).sort().values.tolist() == list(range(config.num_samples))
        assert loader.residency.mode == WINDOWED
        assert loader.io_evidence.startswith("windowed") and "\n" not in loader.io_evidence
        assert loader.load_bytes == 2 * config.num_samples * sample  # read again each epoch
    finally:
        loader.close()
