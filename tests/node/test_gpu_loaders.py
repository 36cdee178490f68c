"""The GPU loaders: refusals and pure helpers everywhere, real runs on a GPU.

Without CUDA (the dev machines, CI) every GPU loader must refuse in one line; the
read planning, header parsing, nvidia-fs parsing and the I/O-label rules are plain
Python and tested here on real files. Tests marked ``gpu`` run each GPU loader through
a short training step and skip without CUDA (the shared contract test in
``test_loader_contract.py`` covers the GPU loaders too).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from node.loaders import LOADERS, LoaderConfig, LoaderUnavailable, ShardSlice, gpu
from node.loaders.base import epoch_batches
from node.loaders.cupy_loader import CupyLoader
from node.loaders.dali import DaliGdsLoader, DaliLoader
from node.loaders import gds
from node.loaders.gds import NvfsReads, parse_nvfs_reads
from node.loaders.kvikio_loader import KvikioLoader
from node.loaders.read_plan import ALIGN, align_down, align_up, plan_reads, sample_runs
from node.loaders.nvjpeg import JpegBytesReader, NvjpegLoader
from shared.formats import CATALOG, get_format
from shared.formats.npy import npy_layout
from shared.shards import read_index, shard_path, write_shard
from shared.storage import PathEscapeError, Store

GPU_LOADERS = {"cupy": CupyLoader, "kvikio": KvikioLoader, "dali": DaliLoader,
               "dali_gds": DaliGdsLoader, "nvjpeg": NvjpegLoader}
# DESIGN section 5's table, over the catalog plus quality ids outside it.
FORMAT_IDS = (*CATALOG, "jpeg-q50", "webp-q10")
SUPPORTED = {
    "cupy": {"npy"},
    "kvikio": {"npy", "npy-files"},
    "dali": {f for f in FORMAT_IDS
             if f.split("-")[0] in ("jpeg", "png", "bmp", "tiff", "jp2", "webp")},
    "dali_gds": {"npy-files"},
    "nvjpeg": {f for f in FORMAT_IDS if f.startswith("jpeg-")},
}
NO_CUDA = not torch.cuda.is_available()

NVFS_ENABLED = """GDS Version: 1.9.0.20
NVFS statistics(ver: 4.0)
NVFS Driver(version: 2.19.7)
Mellanox PeerDirect Supported: False
IO stats: Enabled, peer IO stats: Disabled
Logging level: info

Active Shadow-Buffer (MiB): 0
Active Process: 0
Reads\t\t\t\t: n=66496 ok=66496 err=0 readMiB=1040 io_state_err=0
Reads\t\t\t\t: Bandwidth(MiB/s)=0 Avg-Latency(usec)=0
Sparse Reads\t\t\t: n=6 io=0 holes=0 pages=0
Writes\t\t\t\t: n=0 ok=0 err=0 writeMiB=0 io_state_err=0 pg-cache=0 pg-cache-fail=0 pg-cache-eio=0
Ops\t\t\t\t: Read=0 Write=0 BatchIO=0
"""
NVFS_DISABLED = """NVFS statistics(ver: 4.0)
IO stats: Disabled, peer IO stats: Disabled
Reads\t\t\t\t: err=0 io_state_err=0
Writes\t\t\t\t: err=0 io_state_err=0
"""


# --------------------------------------------------------------------------- registry, refusals

def test_gpu_loaders_are_registered_as_cuda() -> None:
    for name, cls in GPU_LOADERS.items():
        assert LOADERS[name] is cls
        assert cls.device_kind == "cuda" and cls.formats_help


@pytest.mark.parametrize("name", sorted(GPU_LOADERS))
def test_supports_matches_the_design_table(name: str) -> None:
    cls = GPU_LOADERS[name]
    accepted = {f for f in FORMAT_IDS if cls.supports(get_format(f))}
    assert accepted == SUPPORTED[name]


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", sorted(GPU_LOADERS))
def test_refuses_in_one_line_without_cuda(name: str) -> None:
    reason = GPU_LOADERS[name].unavailable_reason()
    assert reason == f"{name}: needs an NVIDIA GPU; torch.cuda.is_available() is False"
    assert "\n" not in reason


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_reason_names_the_check() -> None:
    assert gpu.cuda_reason() == "needs an NVIDIA GPU; torch.cuda.is_available() is False"


def test_package_reason_names_the_pip_package() -> None:
    assert gpu.package_reason("formatlab_no_such_module", "formatlab-nope-cu13") == \
        "package formatlab-nope-cu13 not installed"
    assert gpu.package_reason("nvidia_formatlab_missing.dali", "x") == "package x not installed"
    assert gpu.package_reason("json", "json") is None


@pytest.mark.parametrize(("cuda", "expected"), [
    ("12.4", {"kvikio": "kvikio-cu12", "cupy": "cupy-cuda12x",
              "nvidia.dali": "nvidia-dali-cuda120"}),
    ("13.0", {"kvikio": "kvikio-cu13", "cupy": "cupy-cuda13x",
              "nvidia.dali": "nvidia-dali-cuda130"}),
    (None, {"kvikio": "kvikio-cu12 or kvikio-cu13"}),
])
def test_pip_names_follow_torchs_cuda_major(monkeypatch: pytest.MonkeyPatch, cuda: str | None,
                                            expected: dict[str, str]) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda)
    for module, pip in expected.items():
        assert gpu.pip_name(module) == pip


def test_cuda_major_mismatch_reason() -> None:
    assert gpu.cuda_mismatch_reason("CuPy", 12, 13, "cupy") == (
        "CuPy is built for CUDA 12 but torch uses CUDA 13; install cupy-cuda13x")
    assert gpu.cuda_mismatch_reason("DALI", 13, 13, "nvidia.dali") is None
    assert gpu.cuda_mismatch_reason("DALI", None, 13, "nvidia.dali") is None


def test_requirements_reason_order_and_wording(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the CUDA check: a missing package, then a CUDA major mismatch, each one line."""
    monkeypatch.setattr(gpu, "cuda_reason", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert gpu.requirements_reason("kvikio", ("formatlab_absent_module",)) == \
        "kvikio: package formatlab_absent_module not installed"
    monkeypatch.setattr(gpu, "package_reason", lambda module: None)
    monkeypatch.setattr(gpu, "cupy_cuda_major", lambda: 12)
    monkeypatch.setattr(gpu, "installed_cuda_major", lambda module: 13)
    assert gpu.requirements_reason("cupy", ("cupy",)) == (
        "cupy: CuPy is built for CUDA 12 but torch uses CUDA 13; install cupy-cuda13x")
    assert gpu.requirements_reason("kvikio", ("kvikio",)) is None
    monkeypatch.setattr(gpu, "dali_cuda_major", lambda: 12)
    assert gpu.requirements_reason("dali", ("nvidia.dali",)) == (
        "dali: DALI is built for CUDA 12 but torch uses CUDA 13; install nvidia-dali-cuda130")


@pytest.mark.parametrize(("value", "major"), [(130, 13), (128, 12), ("12.8", 12), (1180, 11),
                                              (102, 10), (92, 9), (None, None), ("", None)])
def test_parse_dali_cuda_version(value: object, major: int | None) -> None:
    assert gpu.parse_dali_cuda_version(value) == major


def test_vram_reason_says_need_and_free() -> None:
    assert gpu.vram_reason("cupy", int(12.3 * gpu.GIB), int(4.1 * gpu.GIB)) == \
        "cupy: needs 12.3 GiB, 4.1 GiB free"
    assert gpu.vram_reason("cupy", 10, 10) is None
    assert gpu.vram_reason("cupy", 2 * gpu.GIB, gpu.GIB, "3 images").endswith("free (3 images)")


def test_gpu_loaders_refuse_a_cpu_device(tmp_path: Path) -> None:
    config = make_config(tmp_path, "npy", device=torch.device("cpu"))
    for cls in (CupyLoader, KvikioLoader):
        with pytest.raises(LoaderUnavailable, match=f"^{cls.name}: needs --device cuda"):
            cls(config)


# --------------------------------------------------------------------------- nvidia-fs, io_path

def test_parse_nvfs_reads() -> None:
    reads = parse_nvfs_reads(NVFS_ENABLED)
    assert reads == NvfsReads(ops=66496, mib=1040)
    assert reads.bytes == 1040 * gds.MIB
    assert parse_nvfs_reads(NVFS_DISABLED) is None  # stats off: no counters to compare
    assert parse_nvfs_reads("") is None


def test_nvfs_counters_from_a_file(tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    stats.write_text(NVFS_ENABLED)
    assert gds.nvfs_read_counters(stats) == NvfsReads(66496, 1040)
    assert gds.nvfs_read_bytes(stats) == 1040 * gds.MIB
    assert gds.nvfs_read_bytes(tmp_path / "missing") is None


# --------------------------------------------------------------------------- .npy layout, reads

@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_npy_layout_uses_numpys_header(tmp_path: Path, version: tuple[int, int]) -> None:
    array = np.arange(5 * 4 * 6 * 3, dtype=np.uint8).reshape(5, 4, 6, 3)
    path = tmp_path / "a.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=version)
    layout = npy_layout(path)
    assert layout.shape == (5, 4, 6, 3) and layout.dtype == np.uint8 and not layout.fortran_order
    assert layout.data_offset == path.stat().st_size - array.nbytes
    raw = path.read_bytes()[layout.data_offset:]
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(array.shape), array)


def test_npy_layout_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    path.write_bytes(b"not numpy at all")
    with pytest.raises(ValueError):
        npy_layout(path)


def test_alignment_math() -> None:
    assert align_down(0) == 0 and align_down(4095) == 0 and align_down(4096) == 4096
    assert align_up(0) == 0 and align_up(1) == 4096 and align_up(4096) == 4096
    assert align_up(4097) == 8192 and align_down(10, 8) == 8 and align_up(10, 8) == 16


def test_sample_runs() -> None:
    assert sample_runs(np.array([], dtype=np.int64)) == []
    assert sample_runs(np.array([3])) == [(3, 1)]
    assert sample_runs(np.array([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 1), (7, 2)]


def emulate(plan_ranges: list, runs: list, path: Path, nbytes: int,
            sample_bytes: int) -> np.ndarray:
    """Carry out a read plan with plain file reads, as the GPU path does with kvikio."""
    staging = np.zeros(max(nbytes, 1), dtype=np.uint8)
    with open(path, "rb") as f:
        for r in plan_ranges:
            f.seek(r.file_offset)
            data = f.read(r.size)
            assert len(data) == r.size
            staging[r.buffer_offset:r.buffer_offset + r.size] = np.frombuffer(data, np.uint8)
    return np.concatenate([staging[off:off + count * sample_bytes] for _, count, off in runs])


@pytest.mark.parametrize("shape", [(32, 32, 3), (64, 64, 3), (7, 5, 3)])
def test_plan_reads_covers_the_samples_with_aligned_reads(tmp_path: Path,
                                                          shape: tuple[int, ...]) -> None:
    n = 300
    array = np.random.default_rng(1).integers(0, 256, (n, *shape), dtype=np.uint8)
    path = tmp_path / "images.npy"
    np.save(path, array)
    layout = npy_layout(path)
    size = path.stat().st_size
    S = int(np.prod(shape))
    rng = np.random.default_rng(2)
    cases = [np.arange(n), np.array([0]), np.array([n - 1]), np.array([0, n - 1]),
             np.sort(rng.choice(n, 40, replace=False)),
             np.unique(np.concatenate([np.arange(10, 30), rng.choice(n, 20)]))]
    for idx in cases:
        plan = plan_reads(idx, data_offset=layout.data_offset, sample_bytes=S, file_size=size,
                          buffer_base=2 * ALIGN)
        previous_end = -1
        for r in plan.ranges:
            assert r.file_offset % ALIGN == 0 and r.buffer_offset % ALIGN == 0
            assert r.size > 0 and r.file_offset + r.size <= size
            assert r.size % ALIGN == 0 or r.file_offset + r.size == size
            assert r.file_offset > previous_end  # merged: no two reads overlap or touch
            previous_end = r.file_offset + r.size
        assert plan.ranges[0].buffer_offset == 2 * ALIGN
        assert sum(count for _, count, _ in plan.runs) == len(idx)
        got = emulate(list(plan.ranges), list(plan.runs), path, 2 * ALIGN + plan.nbytes, S)
        assert np.array_equal(got.reshape(len(idx), *shape), array[idx])
        # Rounding out to 4 KiB costs at most two pages per run; merging only unites.
        assert plan.read_bytes <= len(idx) * S + 2 * ALIGN * len(plan.runs)
        assert plan.nbytes >= plan.read_bytes
    whole = plan_reads(np.arange(n), data_offset=layout.data_offset, sample_bytes=S,
                       file_size=size)
    assert len(whole.ranges) == 1 and whole.ranges[0].file_offset == 0


def test_plan_reads_refuses_samples_past_the_end() -> None:
    with pytest.raises(ValueError, match="past the file"):
        plan_reads(np.array([9]), data_offset=128, sample_bytes=100, file_size=1000)


# --------------------------------------------------------------------------- shards on disk

H, W, C = 24, 20, 3
PER_SHARD = 25


def smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Colour gradients with mild noise: JPEG decoders agree on these within a level or two."""
    y, x = np.mgrid[0:H, 0:W]
    out = [rng.uniform(40, 215, C) + x[..., None] * rng.uniform(-3, 3, C)
           + y[..., None] * rng.uniform(-3, 3, C) + rng.normal(0, 2, (H, W, C)) for _ in range(n)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def make_config(root: Path, format_id: str, *, device: torch.device, batch_size: int = 8,
                ranges: tuple[tuple[int, int], ...] = ((3, PER_SHARD), (0, 20)),
                workers: int = 0) -> LoaderConfig:
    """Two real shards of ``format_id`` under ``root`` and a config over ``ranges``."""
    store = Store.open(str(root))
    fmt = get_format(format_id)
    rng = np.random.default_rng(5)
    slices = []
    for s, (start, stop) in enumerate(ranges):
        rel = shard_path(format_id, "train", s)
        if not (root / rel / "index.parquet").exists():
            images = smooth_images(rng, PER_SHARD)
            write_shard(store, fmt, "train", s, [f"s{s}-{i}" for i in range(PER_SHARD)],
                        images, rng.integers(0, 10, PER_SHARD))
        index = read_index(root / rel / "index.parquet")
        files = tuple(index.column("file").to_pylist()) if "file" in index.column_names else None
        slices.append(ShardSlice(location=str(root / rel), labels=index.column("label").to_numpy(),
                                 files=files, start=start, stop=stop))
    return LoaderConfig(fmt=fmt, shards=tuple(slices), batch_size=batch_size, workers=workers,
                        seed=3, device=device, image_shape=(H, W, C))


def test_rank_files_in_sequence_order(tmp_path: Path) -> None:
    config = make_config(tmp_path, "npy-files", device=torch.device("cpu"))
    paths = gpu.rank_files(config.shards)
    assert len(paths) == config.num_samples
    first = config.shards[0]
    assert paths[0] == os.path.join(os.path.abspath(first.location), first.files[first.start])
    assert all(os.path.isfile(p) for p in paths)


def test_rank_files_refuses_escaping_names(tmp_path: Path) -> None:
    bad = ShardSlice(location=str(tmp_path), labels=np.zeros(1, np.int64),
                     files=("../outside.npy",), start=0, stop=1)
    with pytest.raises(PathEscapeError):
        gpu.rank_files([bad])


def test_npy_files_share_one_header_length(tmp_path: Path) -> None:
    config = make_config(tmp_path, "npy-files", device=torch.device("cpu"))
    offsets = {npy_layout(p).data_offset for p in gpu.rank_files(config.shards)}
    assert len(offsets) == 1  # what the kvikio loader relies on (one parse per shard)
    assert offsets.pop() + H * W * C == os.path.getsize(gpu.rank_files(config.shards)[0])


def test_nvjpeg_workers_hand_over_the_files_bytes(tmp_path: Path) -> None:
    config = make_config(tmp_path, "jpeg-q95", device=torch.device("cpu"))
    reader = JpegBytesReader(config)
    positions = np.array([7, 0, 30, 12], dtype=np.int64)
    batch = reader.read(positions)
    paths = gpu.rank_files(config.shards)
    bounds = batch.offsets.tolist()
    assert batch.positions.tolist() == positions.tolist()
    assert batch.labels.tolist() == config.labels[positions].tolist()
    for k, p in enumerate(positions.tolist()):
        assert bytes(batch.data[bounds[k]:bounds[k + 1]].numpy()) == Path(paths[p]).read_bytes()
    assert batch.bytes_read == bounds[-1] == sum(os.path.getsize(paths[p]) for p in positions)


# --------------------------------------------------------------------------- on a GPU

GPU_CASES = [("cupy", "npy"), ("kvikio", "npy"), ("kvikio", "npy-files"),
             ("dali", "jpeg-q95"), ("dali", "png"), ("dali_gds", "npy-files"),
             ("nvjpeg", "jpeg-q95")]


def source_images(config: LoaderConfig) -> np.ndarray:
    """The rank's images in sequence order, decoded on the CPU."""
    fmt = config.fmt
    out = []
    for s in config.shards:
        reader = fmt.open_reader(s.location, s.files)
        out.append(np.stack([np.asarray(reader.read(i)) for i in range(s.start, s.stop)]))
        reader.close()
    return np.concatenate(out)


@pytest.mark.parametrize(("name", "format_id"), GPU_CASES, ids=[f"{n}-{f}" for n, f in GPU_CASES])
@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_gpu_loader_trains(tmp_path: Path, name: str, format_id: str) -> None:
    cls = GPU_LOADERS[name]
    reason = cls.unavailable_reason()
    if reason:
        pytest.skip(reason)
    device = torch.device("cuda")
    config = make_config(tmp_path, format_id, device=device, workers=2)
    expected = source_images(config)
    model = torch.nn.Sequential(torch.nn.Conv2d(C, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = cls(config)
    try:
        loader.check_fits()
        for epoch in (0, 1):
            seen = []
            plan = epoch_batches(config.num_samples, config.batch_size, config.seed, epoch)
            for batch, planned in zip(loader.epoch(epoch), plan, strict=True):
                assert batch.images.is_cuda and batch.labels.is_cuda
                assert batch.images.dtype == torch.uint8 and batch.labels.dtype == torch.int64
                assert sorted(batch.positions.tolist()) == sorted(planned.tolist())
                pixels = batch.images.cpu().numpy()
                want = expected[batch.positions.numpy()]
                if config.fmt.lossless:
                    assert np.array_equal(pixels, want)
                else:  # nvJPEG's IDCT and upsampling may differ from libjpeg-turbo's
                    assert np.abs(pixels.astype(int) - want).mean() < 3.0
                labels = config.labels[batch.positions.numpy()]
                assert batch.labels.cpu().tolist() == labels.tolist()
                x = batch.images.permute(0, 3, 1, 2).float().div_(255)
                loss = torch.nn.functional.cross_entropy(model(x), batch.labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen.append(batch.positions)
            assert torch.cat(seen).sort().values.tolist() == list(range(config.num_samples))
        assert loader.io_path in ("gds", "compat", "host")
        assert loader.io_evidence and "\n" not in loader.io_evidence
        assert torch.isfinite(loss)
    finally:
        loader.close()


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_cupy_refuses_what_does_not_fit(tmp_path: Path) -> None:
    if CupyLoader.unavailable_reason():
        pytest.skip(CupyLoader.unavailable_reason())
    config = make_config(tmp_path, "npy", device=torch.device("cuda"))
    free, _ = gpu.free_vram(config.device)
    huge = (int(free ** 0.5) + 1, int(free ** 0.5) + 1, 3)  # one image larger than free VRAM
    big = LoaderConfig(fmt=config.fmt, shards=config.shards, batch_size=8, workers=0, seed=0,
                       device=config.device, image_shape=huge)
    with pytest.raises(LoaderUnavailable, match=r"^cupy: needs [\d.]+ GiB, [\d.]+ GiB free"):
        CupyLoader(big).check_fits()


def test_module_imports_no_optional_package() -> None:
    """Importing the loaders must not import CuPy, kvikio or DALI (they may be absent)."""
    import subprocess
    import sys

    code = ("import sys, node.loaders; "
            "print(sorted(m for m in ('cupy', 'kvikio', 'nvidia.dali') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"

