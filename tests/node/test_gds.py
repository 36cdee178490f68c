"""The GPU paths' decisions without a GPU: the GDS label, probes, VRAM arithmetic, .npy layout.

The GDS decision is a pure function of what a run observed; each case below is a
state kvikio 26.10 or cuFile can really be in (see :mod:`node.loaders.gds`).
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from node.loaders import gds, gpu
from node.loaders.cupy_loader import TRAINING_RESERVE_BYTES, vram_budget
from node.loaders.gds import GdsObservation, NvfsReads, decide_io_path
from node.loaders.kvikio_loader import io_threads
from node.loaders.read_plan import ALIGN, aligned_start
from shared.formats import get_format
from shared.formats.npy import DATA_OFFSET, npy_layout, write_npy

MIB = gds.MIB
# kvikio, compat mode OFF requested and not preferred, nvidia-fs loaded, cuFile may fall back.
KVIKIO_OFF = GdsObservation("kvikio", "OFF", False, True, True)
AUTO = GdsObservation("kvikio", "AUTO", False, True, True)


def observe(base: GdsObservation, **changes: object) -> GdsObservation:
    return GdsObservation(**{**base.__dict__, **changes})


@pytest.mark.parametrize(("obs", "path", "why"), [
    # counters unreadable: never gds while a fallback is possible
    (AUTO, "compat", "counters unreadable and a fallback was possible"),
    (KVIKIO_OFF, "compat", "allow_compat_mode true"),
    (observe(KVIKIO_OFF, allow_compat=None), "compat", "allow_compat_mode unknown"),
    (observe(KVIKIO_OFF, allow_compat=False), "gds", "forced"),
    (observe(AUTO, allow_compat=False), "compat", "compat AUTO"),
    # compat preferred, or unknown
    (observe(AUTO, compat_preferred=True, before=NvfsReads(1, 1), after=NvfsReads(9, 99)),
     "compat", "prefers compat mode"),
    (observe(AUTO, compat_preferred=None), "compat", "could not be read"),
    # nvidia-fs not loaded (P2PDMA is not what is_gds_available checks)
    (observe(AUTO, nvfs_loaded=False), "compat", "P2PDMA is not detected"),
    (observe(AUTO, nvfs_loaded=None), "compat", "not loaded"),
    # per-file fallback in AUTO mode
    (observe(AUTO, fallback_files=3, before=NvfsReads(1, 1), after=NvfsReads(9, 99)),
     "compat", "3 files could not be opened with O_DIRECT"),
    (observe(AUTO, cufile_bytes=0), "compat", "gds_threshold"),
    # real deltas
    (observe(AUTO, before=NvfsReads(5, 7), after=NvfsReads(5, 7), cufile_bytes=8 * MIB),
     "compat", "did not move"),
    (observe(AUTO, before=NvfsReads(5, 7), after=NvfsReads(6, 8), cufile_bytes=64 * MIB),
     "compat", "less than half"),
    (observe(AUTO, before=NvfsReads(5, 7), after=NvfsReads(105, 71), cufile_bytes=64 * MIB),
     "gds", "100 reads, 64 MiB during the run (system-wide"),
    (observe(GdsObservation("DALI", "OFF", False, True, True), before=NvfsReads(0, 0),
             after=NvfsReads(4, 2)), "gds", "4 reads, 2 MiB"),
])
def test_gds_label_needs_evidence(obs: GdsObservation, path: str, why: str) -> None:
    got, evidence = decide_io_path(obs)
    assert got == path
    assert why in evidence and "\n" not in evidence


def test_this_machine_is_never_gds() -> None:
    # No nvidia-fs, no kvikio here: whatever the counters, the label is compat.
    for obs in (gds.kvikio_observation(before=None, after=None, cufile_bytes=1 << 30,
                                       fallback_files=0),
                gds.dali_observation(before=NvfsReads(0, 0), after=NvfsReads(9, 9))):
        assert decide_io_path(obs)[0] == "compat"


def test_cufile_config_allow_compat(tmp_path: Path) -> None:
    config = tmp_path / "cufile.json"
    config.write_text('{\n  // comment lines as NVIDIA ships them\n'
                      '  "properties": {"allow_compat_mode": false}\n}\n')
    assert gds.cufile_allow_compat({"CUFILE_ENV_PATH_JSON": str(config)}) is False
    config.write_text('{"properties": {"allow_compat_mode": true}}')
    assert gds.cufile_allow_compat({"CUFILE_ENV_PATH_JSON": str(config)}) is True
    config.write_text('{"properties": {}}')  # cuFile's default allows compat mode
    assert gds.cufile_allow_compat({"CUFILE_ENV_PATH_JSON": str(config)}) is True
    missing = {"CUFILE_ENV_PATH_JSON": str(tmp_path / "none.json")}
    assert gds.cufile_allow_compat(missing) is True
    assert gds.parse_cufile_allow_compat("not json") is None


# --------------------------------------------------------------------------- probes

def test_o_direct_probe_refuses_in_one_line_naming_the_file_system() -> None:
    reason = gds.o_direct_reason("/proc/self/status")  # procfs refuses O_DIRECT
    assert reason is not None and "\n" not in reason
    assert "O_DIRECT on a proc file system" in reason


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_o_direct_probe_on_tmpfs(tmp_path: Path) -> None:
    # tmpfs refuses O_DIRECT before Linux 6.6 and accepts it after: the probe must say
    # what the kernel does, and name tmpfs when it refuses.
    assert gds.file_system("/dev/shm") == "tmpfs"
    path = Path("/dev/shm") / f"formatlab-probe-{os.getpid()}.npy"
    path.write_bytes(b"\0" * 8192)
    try:
        reason = gds.o_direct_reason(path)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
            kernel_accepts = True
        except OSError:
            kernel_accepts = False
    finally:
        path.unlink()
    if kernel_accepts:
        assert reason is None
    else:
        assert reason is not None and "tmpfs" in reason
    local = tmp_path / "ok.npy"  # the test's own folder (ext4 here) accepts it
    local.write_bytes(b"\0" * 8192)
    if gds.file_system(local) in ("ext4", "xfs"):
        assert gds.o_direct_reason(local) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_nvjpeg_probe_refuses_in_one_line() -> None:
    # The op is registered (it always is), so only the decode shows it cannot run.
    assert hasattr(torch.ops.image, "decode_jpegs_cuda")
    gpu.torchvision_nvjpeg_reason.cache_clear()
    reason = gpu.torchvision_nvjpeg_reason()
    assert reason is not None and reason.startswith("torchvision cannot decode JPEG on the GPU")
    assert "\n" not in reason


def test_probe_jpeg_is_a_real_jpeg() -> None:
    from torchvision.io import decode_jpeg

    data = torch.frombuffer(bytearray(gpu._TINY_JPEG), dtype=torch.uint8)
    assert tuple(decode_jpeg(data).shape) == (3, 8, 8)


# --------------------------------------------------------------------------- arithmetic

def test_vram_budget_counts_both_loaders_and_the_model() -> None:
    train, val = 6 << 30, 2 << 30
    assert vram_budget(train, []) == train + TRAINING_RESERVE_BYTES
    assert vram_budget(val, [train]) == train + val + TRAINING_RESERVE_BYTES
    free = 11 << 30  # each fits alone with the reserve; together they do not
    assert vram_budget(train, []) <= free and vram_budget(val, []) <= free
    assert vram_budget(val, [train]) > free
    assert gpu.vram_reason("cupy", vram_budget(val, [train]), free) == \
        "cupy: needs 12.0 GiB, 11.0 GiB free"


def test_staging_alignment_and_thread_bound() -> None:
    for ptr in (0, 512, 4096 - 512, 123 * 4096 + 7, 2**40 + 512):
        skip = aligned_start(ptr)
        assert 0 <= skip < ALIGN and (ptr + skip) % ALIGN == 0
    assert [io_threads(w) for w in (0, 1, 4, 64)] == [1, 1, 4, 16]


# --------------------------------------------------------------------------- .npy at 4096

def dali_header(raw: bytes) -> tuple[int, str]:
    """DALI's numpy reader's header rules (dali/util/numpy.cc), re-stated in Python."""
    assert raw[:6] == b"\x93NUMPY" and raw[6] == 1  # CheckNpyVersion wants version 1
    (header_len,) = struct.unpack("<H", raw[8:10])
    assert (header_len + 10) % 16 == 0  # GetHeaderLen
    text = raw[10:10 + header_len].decode("latin1")
    # ParseHeaderContents: the keys in this order, shape last.
    assert text.index("'descr'") < text.index("'fortran_order'") < text.index("'shape'")
    return 10 + header_len, text


@pytest.mark.parametrize("shape", [(32, 32, 3), (5, 4, 6, 3), (7,)])
def test_npy_data_starts_at_4096(shape: tuple[int, ...]) -> None:
    array = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    buf = io.BytesIO()
    write_npy(buf, array)
    raw = buf.getvalue()
    offset, _ = dali_header(raw)
    assert offset == DATA_OFFSET and len(raw) == DATA_OFFSET + array.nbytes
    assert np.array_equal(np.load(io.BytesIO(raw), allow_pickle=False), array)
    assert raw[DATA_OFFSET:] == array.tobytes()


def test_npy_formats_write_and_record_the_offset(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    npy = get_format("npy")
    npy.write_shard(tmp_path, images, np.arange(3))
    assert npy_layout(tmp_path / "images.npy").data_offset == DATA_OFFSET
    assert npy.params["data_offset"] == DATA_OFFSET
    files = get_format("npy-files")
    raw = files.encode(images[0])
    assert dali_header(raw)[0] == DATA_OFFSET and files.params["data_offset"] == DATA_OFFSET
    assert np.array_equal(files.decode(raw), images[0])


def test_write_npy_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        write_npy(io.BytesIO(), np.zeros(3, np.uint8), data_offset=32)


def test_direct_io_fallback_is_read_from_the_handle() -> None:
    from node.loaders.kvikio_loader import without_direct_io

    class Handle:  # kvikio 26.x CuFile's one per-file signal (python/kvikio/kvikio/cufile.py)
        def __init__(self, direct: bool) -> None:
            self.direct = direct

        def is_direct_io_supported(self) -> bool:
            return self.direct

    assert without_direct_io(Handle(False)) and not without_direct_io(Handle(True))
    assert not without_direct_io(object())  # older kvikio: unknown, not claimed either way
