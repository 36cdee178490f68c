"""The study's workload at scale (issue 17): high-resolution photos to 512x512.

Generates a folder of textured high-resolution JPEGs (about 4000x3000, mixed sizes
and orientations, EXIF orientation tags), then:

* **prep**: converts it at ``--size 512`` to every catalog format through a real local
  Ray head with one CPU (``prep/convert.py --address``), at two input counts; prints
  per format the encode and upload cost and bytes per image (the job's own
  ``conversions`` rows),
  the decode-once/encode-many ratio, the peak resident memory of the Ray workers, the
  wall times, and a projection for ``--project-photos`` photos on ``--project-cores``.
* **node**: ``node-agent cache`` and ``node-agent bench`` on the converted store for
  file/jpeg, file/webp, numpy_mmap/npy, hdf5, zarr and file/npy-files: img/s and peak
  RAM over a grid of batch sizes and workers, next to each loader's host staging bound.

Definitions (docs/at-scale.md):

* decode-once ratio = ``T_all / (D + sum_f E_f)`` per image, in CPU seconds (robust to
  other load on the machine): ``T_all`` the all-formats job's Ray worker CPU per image
  on one Ray CPU (the slope between the two input counts, so worker start-up and other
  fixed costs drop out); ``D`` one decode + resize (``prep.transform.prepare_image``)
  and ``E_f`` format f's shard writes alone (``shared.shards.write_shard``, shards of
  ``--shard-samples``), measured in this process on the same photos; ``D + E_f`` is
  what a single-format job costs per image. Limit <= 1.15: every format costs one
  decode plus the encodes; one decode per format would add ``(formats - 1) x D``, and
  per-image overheads (reading, scheduling, serialising) show the same way. Also
  printed: one job per format over the all-formats job, ``sum_f (D + E_f) / T_all``.
* memory growth = larger over smaller of the workers' peak VmHWM at the two input
  counts. Limit <= 1.20: a task holds one shard, whatever the input count.
* projection: ``wall(N) = F + c * N / cores`` with ``c`` the worker CPU seconds per
  image (the slope) and ``F`` the fixed cost (the intercept of wall time against the
  input count), assuming
  Ray scales over cores (benchmarks/bench_convert.py checks 1 -> 2 CPUs);
  store size = bytes per image x N per format.

    python benchmarks/bench_scale.py [--images 200] [--counts 40,80] [--project-cores 64]
                                     [--skip-node] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from limits import (  # noqa: E402 - benchmarks/ is the script's folder
    SCALE_DECODE_ONCE_MAX,
    SCALE_WORKER_MEMORY_GROWTH_MAX,
    Check,
    finish,
)
from scale_node import bench_node  # noqa: E402
from scale_photos import make_photos, subset  # noqa: E402

DECODE_LIMIT = SCALE_DECODE_ONCE_MAX
MEMORY_LIMIT = SCALE_WORKER_MEMORY_GROWTH_MAX
STUDY_PHOTOS = 79_698
MIB = 1 << 20
_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- measures


def decode_once_ratio(all_per_image_s: float, decode_s: float,
                      encode_s: dict[str, float]) -> float:
    """``T_all / (D + sum of E_f)``, all per image."""
    return all_per_image_s / (decode_s + sum(encode_s.values()))


def one_job_per_format(all_per_image_s: float, decode_s: float,
                       encode_s: dict[str, float]) -> float:
    """What one job per format would cost over the all-formats job: ``sum (D + E_f) / T_all``."""
    return sum(decode_s + e for e in encode_s.values()) / all_per_image_s


def growth(small: float, large: float) -> float:
    """The larger of two figures over the smaller (1.0 = no growth)."""
    lo, hi = sorted((small, large))
    return hi / lo if lo > 0 else float("inf")


@dataclass(frozen=True)
class Projection:
    """Wall time and store size of a conversion of ``photos`` on ``cores``."""

    photos: int
    cores: int
    wall_s: float
    store_bytes: dict[str, float]


def per_image_core_s(counts: tuple[int, int], walls: tuple[float, float], cores: int) -> float:
    """Core seconds per image: the wall-time slope between two input counts x cores."""
    (n1, n2), (w1, w2) = counts, walls
    if n2 <= n1:
        raise ValueError(f"input counts must grow, got {n1} then {n2}")
    return max(0.0, (w2 - w1) / (n2 - n1)) * cores


def project(photos: int, cores: int, fixed_s: float, core_s_per_image: float,
            bytes_per_image: dict[str, float]) -> Projection:
    """``F + c * photos / cores``; store bytes per format = bytes per image x photos."""
    if cores < 1 or photos < 1:
        raise ValueError("photos and cores must be positive")
    return Projection(photos, cores, fixed_s + core_s_per_image * photos / cores,
                      {f: b * photos for f, b in bytes_per_image.items()})


class WorkerMemory:
    """Peak resident memory (``VmHWM``) and CPU seconds (user + system) of each Ray
    worker process (``ray::...``) in one process session (the Ray head's), polled on a
    thread while a job runs."""

    def __init__(self, session: int, interval_s: float = 0.2) -> None:
        self.session, self.interval_s = session, interval_s
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) != self.session:
                    continue
                if not Path(entry.path, "cmdline").read_bytes().startswith(b"ray::"):
                    continue
                for line in Path(entry.path, "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) * 1024
                        pid = int(entry.name)
                        self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
                        self.cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
            except (OSError, ValueError, IndexError):
                continue  # gone, or not ours to read

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())


# --------------------------------------------------------------------------- prep


def convert(head: object, src: Path, dst: Path, results: Path, size: int,
            shard_samples: int) -> tuple[float, object]:
    """One all-formats job joined to ``head``: its wall time (the whole command, so a
    re-run that converts nothing is timed alike) and its conversions rows."""
    import pandas as pd

    shutil.rmtree(results, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "prep" / "convert.py"), "--source", "image-folder",
         "--src", str(src), "--dst", str(dst), "--name", "photos", "--size", str(size),
         "--formats", "all", "--shard-samples", str(shard_samples),
         "--address", head.address, "--results", str(results)],  # type: ignore[attr-defined]
        env=head.env, capture_output=True, text=True, timeout=1800)  # type: ignore[attr-defined]
    if proc.returncode != 0:
        raise SystemExit(f"conversion of {src} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    path = results / "conversions"
    return wall, pd.read_parquet(path) if path.exists() else pd.DataFrame()


def say(text: str) -> None:
    """Progress, to stderr."""
    print(f"[bench_scale {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def local_costs(src: Path, size: int, limit: int,
                shard_samples: int) -> tuple[float, dict[str, float]]:
    """CPU seconds per image of one decode + resize and of each catalog format's shard
    writes alone (shards of ``shard_samples``, as the job writes them), in this process."""
    from prep.transform import prepare_image
    from shared.formats import CATALOG, get_format
    from shared.shards import write_shard
    from shared.storage import Store

    datas = [p.read_bytes() for p in sorted(src.rglob("*.jpg"))[:limit]]
    n = len(datas)
    prepare_image(datas[0], size)  # warm-up: codec libraries
    t0 = time.process_time()
    pixels = np.stack([prepare_image(d, size) for d in datas])
    decode = (time.process_time() - t0) / n
    labels, keys = np.zeros(n, np.int64), [f"k{i}" for i in range(n)]
    encode = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-enc-") as tmp:
        store = Store.open(tmp).sub("ds")
        for fid in CATALOG:
            fmt = get_format(fid)
            write_shard(store, fmt, "train", 0, keys[:2], pixels[:2], labels[:2])  # warm-up
            t0 = time.process_time()
            for k, i in enumerate(range(0, n, shard_samples)):
                j = i + shard_samples
                write_shard(store, fmt, "train", k + 1, keys[i:j], pixels[i:j], labels[i:j])
            encode[fid] = (time.process_time() - t0) / n
    return decode, encode


def format_rows(rows: object) -> dict[str, dict[str, float]]:
    """Per format, over splits: encode and upload seconds and bytes per image."""
    out: dict[str, dict[str, float]] = {}
    for fid, group in rows.groupby("format"):  # type: ignore[attr-defined]
        samples = float(group["samples"].sum())
        out[fid] = {"encode_s": float(group["encode_time_s"].fillna(0).sum()) / samples,
                    "upload_s": float(group["upload_time_s"].fillna(0).sum()) / samples,
                    "bytes": float(group["bytes"].sum()) / samples}
    return out


def print_formats(table: dict[str, dict[str, float]], projection: Projection) -> None:
    print(f"\n{'format':<16}{'encode ms/img':>14}{'upload ms/img':>14}{'alone CPU ms':>13}"
          f"{'KiB/img':>10}"
          f"{'store GiB @' + str(projection.photos):>20}")
    for fid, r in sorted(table.items(), key=lambda kv: -kv[1]["encode_s"]):
        print(f"{fid:<16}{r['encode_s'] * 1e3:>14.1f}{r['upload_s'] * 1e3:>14.1f}"
              f"{r.get('alone_s', float('nan')) * 1e3:>13.1f}"
              f"{r['bytes'] / 1024:>10.1f}{projection.store_bytes[fid] / (1 << 30):>20.1f}")
    total = sum(projection.store_bytes.values())
    print(f"{'all formats':<16}{'':>51}{total / (1 << 30):>20.1f}")


def run_jobs(args: argparse.Namespace, work: Path) -> dict[int, dict]:
    """The all-formats job at each input count on a 1-CPU Ray head: per count its wall
    time, conversions rows, and the workers' peak memory and CPU seconds."""
    from bench_convert import RayHead

    say(f"generating {args.images} photos (kept in --work between runs)")
    photos = make_photos(work / f"photos-{args.images}", args.images, seed=args.seed)
    say("starting a Ray head with 1 CPU")
    head = RayHead(1)
    jobs: dict[int, dict] = {}
    try:
        head.wait()
        for n in args.counts:
            src = subset(photos, work / f"photos-first-{n}", n)
            dst = work / f"store-{n}"
            shutil.rmtree(dst, ignore_errors=True)
            say(f"converting {n} photos to every format through Ray")
            with WorkerMemory(os.getsid(head.proc.pid)) as workers:
                wall, rows = convert(head, src, dst, work / "results", args.size,
                                     args.shard_samples)
            jobs[n] = {"wall": wall, "rows": rows, "peak": workers.peak, "cpu": workers.cpu_s,
                       "src": src}
    finally:
        head.stop()
    return jobs


def bench_prep(args: argparse.Namespace, work: Path) -> tuple[list[Check], Path]:
    n1, n2 = args.counts
    jobs = run_jobs(args, work)
    say("decode + resize and each format's encode alone, in this process")
    decode, alone = local_costs(jobs[n1]["src"], args.size, min(n1, 2 * args.shard_samples),
                                args.shard_samples)
    walls = (jobs[n1]["wall"], jobs[n2]["wall"])
    core_s = per_image_core_s((n1, n2), (jobs[n1]["cpu"], jobs[n2]["cpu"]), cores=1)
    wall_s = per_image_core_s((n1, n2), walls, cores=1)
    fixed = max(0.0, walls[0] - wall_s * n1)
    table = format_rows(jobs[n2]["rows"])
    for fid, r in table.items():
        r["alone_s"] = alone.get(fid, float("nan"))
    projection = project(args.project_photos, args.project_cores, fixed, core_s,
                         {f: r["bytes"] for f, r in table.items()})
    ratio = decode_once_ratio(core_s, decode, alone)
    peaks = (jobs[n1]["peak"], jobs[n2]["peak"])
    print_formats(table, projection)
    print(f"\nprep on 1 Ray CPU: {n1} photos {walls[0]:.1f} s, {n2} photos {walls[1]:.1f} s "
          f"wall ({wall_s:.2f} s/photo slope, {fixed:.1f} s fixed cost intercept); worker CPU "
          f"{core_s:.2f} s/photo (slope); alone: decode+resize {decode * 1e3:.0f} ms/photo, "
          f"encodes {sum(alone.values()) * 1e3:.0f} ms/photo (CPU); one job per format would "
          f"cost x{one_job_per_format(core_s, decode, alone):.2f}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"peak worker memory (VmHWM): {peaks[0] / MIB:.0f} MiB at {n1} photos, "
          f"{peaks[1] / MIB:.0f} MiB at {n2} photos ({args.shard_samples} per shard)")
    store_bytes = sum(projection.store_bytes.values())
    print(f"projection: {projection.photos} photos on {projection.cores} cores: "
          f"{projection.wall_s / 3600:.2f} h, store {store_bytes / (1 << 30):.0f} GiB (all "
          f"formats), written at {store_bytes / projection.wall_s / 1e6:.0f} MB/s on average")
    checks = [
        Check("decode once, encode many (Ray)", ratio, DECODE_LIMIT, "<=",
              f"{n1}->{n2} photos -> {args.size}, {len(table)} formats: worker CPU "
              f"{core_s * 1e3:.0f} ms/photo (slope) vs decode {decode * 1e3:.0f} + encodes "
              f"alone {sum(alone.values()) * 1e3:.0f} ms/photo (CPU)"),
        Check("prep worker memory vs input count", growth(*peaks), MEMORY_LIMIT, "<=",
              f"peak VmHWM {peaks[0] / MIB:.0f} MiB ({n1} photos) vs "
              f"{peaks[1] / MIB:.0f} MiB ({n2} photos)"),
    ]
    return checks, work / f"store-{n2}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="photos generated")
    p.add_argument("--counts", default=None,
                   help="N1,N2: the two input counts converted (default: a fifth and two "
                        "fifths of --images)")
    p.add_argument("--size", type=int, default=512, help="--size of the conversion")
    p.add_argument("--shard-samples", type=int, default=16, help="samples per shard")
    p.add_argument("--project-cores", type=int, default=64, help="cores of the projection")
    p.add_argument("--project-photos", type=int, default=STUDY_PHOTOS,
                   help="photos of the projection (the study's masks set)")
    p.add_argument("--node-batches", default="16,64", help="node: batch sizes")
    p.add_argument("--node-workers", default="0,2", help="node: worker counts")
    p.add_argument("--skip-node", action="store_true", help="prep only")
    p.add_argument("--work", help="keep generated photos and stores here (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        counts = ([int(c) for c in args.counts.split(",")] if args.counts
                  else [args.images // 5, 2 * args.images // 5])
    except ValueError:
        p.error(f"--counts takes N1,N2, got {args.counts!r}")
    if len(counts) != 2 or not 2 <= counts[0] < counts[1] <= args.images:
        p.error(f"--counts must be two growing counts from 2 to --images ({args.images}), "
                f"got {counts}")
    args.counts = tuple(counts)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        checks, store = bench_prep(args, work)
        if not args.skip_node:
            bench_node(store.parent / store.name, work, args)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return finish(checks)


if __name__ == "__main__":
    sys.exit(main())
