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

* single-format cost of format f = ``D + E_f`` per image: ``D`` one decode + resize of
  an input (``prep.transform.prepare_image``, measured in this process on the same
  photos) and ``E_f`` the format's encode + upload per image (``encode_time_s +
  upload_time_s`` over ``samples`` in the job's rows).
* decode-once ratio = ``T_all / (D + sum_f E_f)``: ``T_all`` the all-formats job's
  marginal wall time per image on one Ray CPU (the slope between the two input counts,
  so fixed costs such as joining Ray, worker start-up, listing, quality sampling and
  the manifest drop out). Limit <= 1.15: converting to every format costs one decode
  plus the encodes, with little else per image; one decode per format would add
  ``(formats - 1) x D``. Also printed: the saving against one job per format,
  ``sum_f (D + E_f) / T_all``.
* memory growth = larger over smaller of the workers' peak VmHWM at the two input
  counts. Limit <= 1.20: a task holds one shard, whatever the input count.
* projection: ``wall(N) = F + c * N / cores`` with ``c`` the measured per-image core
  seconds (the slope) and ``F`` the fixed cost (the line's intercept), assuming
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
    """Peak resident memory (``VmHWM``) of each Ray worker process (``ray::...``) in one
    process session (the Ray head's), polled on a thread while a job runs."""

    def __init__(self, session: int, interval_s: float = 0.2) -> None:
        self.session, self.interval_s = session, interval_s
        self.peaks: dict[int, int] = {}
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
                stat = Path(entry.path, "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[3]) != self.session:
                    continue
                if not Path(entry.path, "cmdline").read_bytes().startswith(b"ray::"):
                    continue
                for line in Path(entry.path, "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) * 1024
                        pid = int(entry.name)
                        self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
            except (OSError, ValueError, IndexError):
                continue  # gone, or not ours to read

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)


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


def decode_cost(src: Path, size: int, limit: int, rounds: int = 2) -> float:
    """Seconds per image of one decode + resize (best of ``rounds``)."""
    from prep.transform import prepare_image

    datas = [p.read_bytes() for p in sorted(src.rglob("*.jpg"))[:limit]]
    prepare_image(datas[0], size)  # warm-up: codec libraries
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for data in datas:
            prepare_image(data, size)
        best = min(best, (time.perf_counter() - t0) / len(datas))
    return best


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
    print(f"\n{'format':<16}{'encode ms/img':>14}{'upload ms/img':>14}{'KiB/img':>10}"
          f"{'store GiB @' + str(projection.photos):>20}")
    for fid, r in sorted(table.items(), key=lambda kv: -kv[1]["encode_s"]):
        print(f"{fid:<16}{r['encode_s'] * 1e3:>14.1f}{r['upload_s'] * 1e3:>14.1f}"
              f"{r['bytes'] / 1024:>10.1f}{projection.store_bytes[fid] / (1 << 30):>20.1f}")
    total = sum(projection.store_bytes.values())
    print(f"{'all formats':<16}{'':>38}{total / (1 << 30):>20.1f}")


def bench_prep(args: argparse.Namespace, work: Path) -> tuple[list[Check], Path]:
    from bench_convert import RayHead

    n1, n2 = args.counts
    say(f"generating {args.images} photos (kept in --work between runs)")
    photos = make_photos(work / f"photos-{args.images}", args.images, seed=args.seed)
    sources = {n: subset(photos, work / f"photos-first-{n}", n) for n in (n1, n2)}
    say("starting a Ray head with 1 CPU")
    head = RayHead(1)
    walls, peaks, rows = {}, {}, {}
    try:
        head.wait()
        for n in (n1, n2):
            dst = work / f"store-{n}"
            shutil.rmtree(dst, ignore_errors=True)
            say(f"converting {n} photos to every format through Ray")
            with WorkerMemory(os.getsid(head.proc.pid)) as memory:
                walls[n], rows[n] = convert(head, sources[n], dst, work / "results", args.size,
                                            args.shard_samples)
            peaks[n] = memory.peak
    finally:
        head.stop()
    say("decode + resize alone, in this process")
    decode = decode_cost(sources[n1], args.size, min(n1, 16))
    core_s = per_image_core_s((n1, n2), (walls[n1], walls[n2]), cores=1)
    fixed = max(0.0, walls[n1] - core_s * n1)
    table = format_rows(rows[n2])
    encodes = {f: r["encode_s"] + r["upload_s"] for f, r in table.items()}
    projection = project(args.project_photos, args.project_cores, fixed, core_s,
                         {f: r["bytes"] for f, r in table.items()})
    ratio = decode_once_ratio(core_s, decode, encodes)
    print_formats(table, projection)
    print(f"\nprep on 1 Ray CPU: {n1} photos {walls[n1]:.1f} s, {n2} photos {walls[n2]:.1f} s: "
          f"{core_s:.2f} core s/photo (slope), fixed cost {fixed:.1f} s (intercept); "
          f"decode+resize {decode * 1e3:.0f} ms/photo, encodes + uploads "
          f"{sum(encodes.values()) * 1e3:.0f} ms/photo; one job per format would cost "
          f"x{one_job_per_format(core_s, decode, encodes):.2f}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"peak worker memory (VmHWM): {peaks[n1] / MIB:.0f} MiB at {n1} photos, "
          f"{peaks[n2] / MIB:.0f} MiB at {n2} photos ({args.shard_samples} per shard)")
    store_bytes = sum(projection.store_bytes.values())
    print(f"projection: {projection.photos} photos on {projection.cores} cores: "
          f"{projection.wall_s / 3600:.2f} h, store {store_bytes / (1 << 30):.0f} GiB (all "
          f"formats), written at {store_bytes / projection.wall_s / 1e6:.0f} MB/s on average")
    checks = [
        Check("decode once, encode many (Ray)", ratio, DECODE_LIMIT, "<=",
              f"{n1}->{n2} photos -> {args.size}, {len(table)} formats: job "
              f"{core_s * 1e3:.0f} ms/photo (slope) vs decode {decode * 1e3:.0f} + encodes and "
              f"uploads {sum(encodes.values()) * 1e3:.0f} ms/photo"),
        Check("prep worker memory vs input count", growth(peaks[n1], peaks[n2]), MEMORY_LIMIT,
              "<=", f"peak VmHWM {peaks[n1] / MIB:.0f} MiB ({n1} photos) vs "
              f"{peaks[n2] / MIB:.0f} MiB ({n2} photos)"),
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
