"""The ``packed`` loader on packed JPEG shards, against ``file``, bare decoding and itself
streamed from a loopback S3 server.

Builds a CIFAR-sized set of 32x32 JPEGs (q95, smooth images with noise, so sizes are
photo-like) written both as ``jpeg-q95`` files and as ``wds-jpeg-q95`` tars through
``shared.shards.write_shard``, and a smaller set of 512x512 JPEGs packed the same way.
Then, warm page cache, best epoch of several, all in this one run:

- packed (decode threads) vs ``file`` (DataLoader workers), 32 px, same workers;
- packed vs the bare decode rate on the same JPEG bytes (libjpeg-turbo from memory into
  a preallocated batch): at 512 px against cores x one core's rate (issue 18's limit);
  at 32 px against as many decoding processes running at once as there are cores (what
  the cores really give: two vCPUs here reach about 1.3x one, not 2x);
- packed (threads: JPEG decodes in a compiled loop that holds no GIL) vs the same
  reader in DataLoader worker processes (why threads are the default);
- the first epoch streamed from ``rclone serve s3`` on loopback (``--no-cache``: fresh
  loader, blocks fetched ahead) vs the cached copy's best epoch, interleaved.

``benchmarks/peers.py`` runs the 512 px and streaming checks too (:func:`check_512`,
:func:`streaming_check`), on its own data.

    python benchmarks/bench_packed.py [--samples 50000] [--samples-512 800] [--rounds 3]

:func:`time_loader` times any loader class on slices of a packed dataset (for
``benchmarks/peers.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cache import start_s3  # noqa: E402 - benchmarks/ is the script's folder
from limits import Check, finish  # noqa: E402
from node.loaders.base import Loader, LoaderConfig, ShardSlice  # noqa: E402
from node.loaders.file import FileLoader  # noqa: E402
from node.loaders.packed import PackedLoader, PackedProcessLoader  # noqa: E402
from node.loaders.turbojpeg import TurboJpeg, turbojpeg_path  # noqa: E402
from shared.formats import get_format  # noqa: E402
from shared.shards import ShardIndex, shard_path, write_shard  # noqa: E402
from shared.storage import Store  # noqa: E402

VS_FILE = 1.0  # packed must beat one file per sample
VS_BARE = 0.9  # issue 18: at least 0.9x cores x one core's decode rate
VS_WORKERS = 1.0  # the default for cached JPEG tars (threads) must not lose to workers
STREAM_VS_CACHED = 0.8  # issue 18: first streamed epoch vs the cached copy
SHARD_PIXEL_BYTES = 64 << 20  # prep's default shard size, in decoded pixels


def make_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus mild noise (photo-like JPEG sizes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        base, gx, gy = (rng.uniform(0, 255, 3), rng.uniform(-90, 90, 3),
                        rng.uniform(-90, 90, 3))
        img = base + x[..., None] * gx + y[..., None] * gy + rng.normal(0, 6, (size, size, 3))
        out[i] = np.clip(img, 0, 255)
    return out


def build(root: Path, format_id: str, n: int, size: int, seed: int) -> list[ShardSlice]:
    """Write ``n`` images as ``format_id`` shards of prep's default size; their slices."""
    fmt, store = get_format(format_id), Store.open(str(root))
    per_shard = max(1, SHARD_PIXEL_BYTES // (size * size * 3))
    slices = []
    for index, start in enumerate(range(0, n, per_shard)):
        count = min(per_shard, n - start)
        images = make_images(count, size, seed + index)
        labels = np.random.default_rng(index).integers(0, 10, count)
        write_shard(store, fmt, "train", index, [f"s{start + i}" for i in range(count)],
                    images, labels)
        slices.append(slice_of(root / shard_path(format_id, "train", index), count))
    return slices


def slice_of(location: Path | str, count: int | None = None) -> ShardSlice:
    """The whole-shard read slice of a written shard (local folder)."""
    index = ShardIndex.parse(Path(location) / "index.parquet")
    count = len(index.labels) if count is None else count
    return ShardSlice(location=str(location), labels=index.labels, files=index.files,
                      start=0, stop=count, keys=index.keys)


def time_loader(loader_cls: type[Loader], format_id: str, shards: Sequence[ShardSlice],
                image_shape: tuple[int, int, int], *, batch_size: int = 256, workers: int = 2,
                epochs: int = 2, seed: int = 0,
                storage_options: dict[str, Any] | None = None) -> list[float]:
    """Each epoch's rate (img/s) of one fresh ``loader_cls`` over ``shards`` (CPU device).

    The first entry is the fresh loader's first epoch (worker start, streaming fetch
    and all); the best of the rest is its steady rate.
    """
    config = LoaderConfig(fmt=get_format(format_id), shards=tuple(shards),
                          batch_size=batch_size, workers=workers, seed=seed,
                          device=torch.device("cpu"), image_shape=image_shape,
                          storage_options=storage_options or {})
    loader = loader_cls(config)
    rates = []
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            count = sum(len(b.positions) for b in loader.epoch(epoch))
            rates.append(count / (time.perf_counter() - t0))
            assert count == config.num_samples, (loader_cls.name, count)
    finally:
        loader.close()
    return rates


def decode_rate(shards: Sequence[ShardSlice], size: int, limit: int, processes: int = 1) -> float:
    """img/s of bare decoding: the shards' first ``limit`` JPEG members decoded from memory
    (libjpeg-turbo: libturbojpeg, else torchvision.io's decoder) into one preallocated
    batch, by one thread, or by ``processes`` forked copies at once (what the machine's
    cores really give right now)."""
    members = []
    for s in shards:
        index = ShardIndex.parse(Path(s.location) / "index.parquet")
        data = (Path(s.location) / "samples.tar").read_bytes()
        members += [data[o:o + n] for o, n in zip(index.offsets, index.sizes)]
    members = members[:limit]
    if processes == 1:
        t0 = time.perf_counter()
        _decode_all(members, size)
        return len(members) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:  # the child decodes its copy and leaves without cleanup
            _decode_all(members, size)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return processes * len(members) / (time.perf_counter() - t0)


def _decode_all(members: list[bytes], size: int) -> None:
    out = np.empty((256, size, size, 3), np.uint8)
    path = turbojpeg_path()
    if path:  # the packed loader's own decode call, 256 members at a time
        buf = np.frombuffer(b"".join(members), np.uint8)
        sizes = np.array([len(m) for m in members], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        turbo = TurboJpeg(path)
        for lo in range(0, len(members), 256):
            turbo.decode_many(buf, starts[lo:lo + 256], sizes[lo:lo + 256], out)
        turbo.close()
        return
    from torchvision.io import ImageReadMode, decode_jpeg

    for m in members:
        decode_jpeg(torch.frombuffer(bytearray(m), dtype=torch.uint8), mode=ImageReadMode.RGB)


def best(runs: list[list[float]], first: bool = False) -> float:
    """The best steady epoch (or the best first epoch) over rounds."""
    return max(r[0] if first else max(r[1:] or r) for r in runs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000, help="32x32 JPEGs")
    parser.add_argument("--samples-512", type=int, default=800, help="512x512 JPEGs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2,
                        help="decode threads (packed) and DataLoader workers (file)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed loader")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many each")
    parser.add_argument("--no-s3", action="store_true", help="skip the streaming check")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    cores = len(os.sched_getaffinity(0))
    timing = {"batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="bench-packed-") as tmp:
        root = Path(tmp) / "s3" / "bucket"
        t0 = time.perf_counter()
        packed = build(root, "wds-jpeg-q95", args.samples, 32, args.seed)
        files = build(root, "jpeg-q95", args.samples, 32, args.seed)
        print(f"built {args.samples} 32 px JPEGs in {time.perf_counter() - t0:.0f} s; "
              f"decoder {decoder_name()}, {cores} cores", flush=True)
        runs: dict[str, list[list[float]]] = {k: [] for k in ("packed", "file", "workers")}
        one, every = 0.0, 0.0
        for _ in range(args.rounds):  # interleaved, so drift hits every side alike
            runs["packed"].append(time_loader(PackedLoader, "wds-jpeg-q95", packed,
                                              (32, 32, 3), **timing))
            runs["file"].append(time_loader(FileLoader, "jpeg-q95", files, (32, 32, 3),
                                            **timing))
            runs["workers"].append(time_loader(PackedProcessLoader, "wds-jpeg-q95", packed,
                                               (32, 32, 3), **timing))
            one = max(one, decode_rate(packed, 32, 20_000))
            every = max(every, decode_rate(packed, 32, 20_000, cores))
        rate = {k: best(v) for k, v in runs.items()}
        checks = [
            Check("packed vs file, 32 px JPEG", rate["packed"] / rate["file"], VS_FILE, ">=",
                  f"{rate['packed']:,.0f} vs {rate['file']:,.0f} img/s, {args.workers} workers"),
            Check("packed vs bare decoders all running at once, 32 px JPEG",
                  rate["packed"] / every, VS_BARE, ">=",
                  f"{rate['packed']:,.0f} vs {every:,.0f} img/s ({cores} processes decoding "
                  f"at once; one alone: {one:,.0f}, so the cores give "
                  f"{every / (cores * one):.2f} of {cores} x that here)"),
            Check("packed default (threads) vs DataLoader workers, 32 px",
                  rate["packed"] / rate["workers"], VS_WORKERS, ">=",
                  f"{rate['packed']:,.0f} vs {rate['workers']:,.0f} img/s"),
            check_512(Path(tmp) / "big", args.samples_512, args.seed, args.rounds, timing),
        ]
        if not args.no_s3:
            checks.append(streaming_check(Path(tmp) / "s3", "bucket", packed, 32, args.rounds,
                                          timing))
    return finish(checks)


def decoder_name() -> str:
    return "libturbojpeg" if turbojpeg_path() else "torchvision.io"


def bare_check(px: int, loader_rate: float, one_core: float, all_cores: float,
               cores: int) -> Check:
    """The loader against cores x one core's bare decode rate of the same JPEGs."""
    return Check(f"packed vs bare decode, {px} px JPEG", loader_rate / (cores * one_core),
                 VS_BARE, ">=", f"{loader_rate:,.0f} vs {cores} x {one_core:,.0f} img/s "
                 f"({decoder_name()}, one core; {cores} processes at once: {all_cores:,.0f})")


def check_512(root: Path, samples: int, seed: int, rounds: int,
              timing: dict[str, int]) -> Check:
    """``samples`` 512x512 JPEGs packed under ``root``: the packed loader's best epoch
    against cores x one core's bare decode rate, interleaved over ``rounds``."""
    cores = len(os.sched_getaffinity(0))
    big = build(root, "wds-jpeg-q95", samples, 512, seed)
    runs, one, every = [], 0.0, 0.0
    for _ in range(rounds):
        runs.append(time_loader(PackedLoader, "wds-jpeg-q95", big, (512, 512, 3), **timing))
        one = max(one, decode_rate(big, 512, 200))
        every = max(every, decode_rate(big, 512, 200, cores))
    return bare_check(512, best(runs), one, every, cores)


def streaming_check(served: Path, bucket: str, packed: list[ShardSlice], size: int,
                    rounds: int, timing: dict[str, int],
                    format_id: str = "wds-jpeg-q95") -> Check:
    """First epoch of ``packed`` (local shards of ``size`` px under ``served / bucket``)
    streamed from ``rclone serve s3`` of ``served`` on loopback, a fresh loader each
    round, against the same loader's best epoch on the local copy, interleaved.

    The detail adds the CPU seconds each side costs (this process, plus the server for
    the streamed one): where the server shares the cores, their ratio is the ceiling a
    CPU-bound streamed epoch can reach, whatever the overlap."""
    import psutil

    server = start_s3(served)
    try:
        options = server.storage_options
        paths = [Path(s.location).relative_to(served / bucket).as_posix() for s in packed]
        # The node reads every index through the store before its first epoch (the fill
        # step): the S3 session exists by then, so it does here too.
        Store.open(f"s3://{bucket}", options).read_bytes(f"{paths[0]}/index.parquet")
        remote = [ShardSlice(location=f"s3://{bucket}/{path}", labels=s.labels, files=None,
                             start=s.start, stop=s.stop, keys=s.keys)
                  for path, s in zip(paths, packed, strict=True)]
        me, rclone = psutil.Process(), psutil.Process(server.proc.pid)

        def cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in (me, rclone))

        first, cached, cpu_cached, cpu_streamed = [], [], [], []
        for _ in range(rounds):
            c0 = cpu()
            cached.append(time_loader(PackedLoader, format_id, packed, (size, size, 3),
                                      **timing))
            cpu_cached.append((cpu() - c0) / len(cached[-1]))
            c0 = cpu()
            first.append(time_loader(PackedLoader, format_id, remote, (size, size, 3),
                                     storage_options=options, **{**timing, "epochs": 1}))
            cpu_streamed.append(cpu() - c0)
    finally:
        server.stop()
    stream_rate, cached_rate = best(first, first=True), best(cached)
    ceiling = min(cpu_cached) / min(cpu_streamed)
    return Check(f"packed streamed first epoch vs cached, {size} px", stream_rate / cached_rate,
                 STREAM_VS_CACHED, ">=", f"{stream_rate:,.0f} vs {cached_rate:,.0f} img/s "
                 f"(loopback rclone serve s3); CPU per epoch: cached {min(cpu_cached):.2f} s, "
                 f"streamed {min(cpu_streamed):.2f} s with the server: a CPU-bound ceiling "
                 f"of {ceiling:.2f} on these cores")

if __name__ == "__main__":
    sys.exit(main())
