"""Convert a raw image dataset once into every storage format, as a Ray job.

    python prep/convert.py --source cifar10 --src cifar-10-python.tar.gz --dst ./store
    ray job submit --working-dir . -- python prep/convert.py --source image-folder \\
        --src s3://raw/masks --dst s3://formatlab/store --name masks --size 512

Exit 0: manifest committed. Exit 2: bad arguments or unreadable source (one line).
Exit 1: the job failed; committed shards stay, and a re-run converts only the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prep.executors import make_executor
from prep.plan import (REJECTS_DIR, ShardPlan, ShardResult, convert_shard,
                       default_shard_samples, plan_shards)
from prep.quality import measure_quality, quality_cells, quality_columns
from prep.sources import SOURCES, SourceError, get_source
from shared.formats import CATALOG, UnknownFormat, parse_format_list
from shared.killpoint import kill_point
from shared.lock import DatasetBusy, DatasetLock
from shared.manifest import (FormatEntry, Manifest, ManifestError, Reject, ShardEntry,
                             SplitEntry)
from shared.progress import stdout_console
from shared.results import new_id, table_bytes, utc_now
from shared.shards import STAGING_DIR
from shared.storage import (STORAGE_OPTIONS_ENV, BadStorageOptions, StorageError, Store,
                            has_secrets, one_line, parse_storage_options, redact,
                            redact_url)

DEFAULT_MAX_REJECTS = 1000
# Under <name>/: conversions rows a job computed, held until the results store has them.
PENDING_DIR = "_conversions"
# Set in a driver that `ray job submit` started (its entrypoint is on record).
_RAY_JOB_ENV = ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID", "RAY_SUBMISSION_ID")


class UsageError(Exception):
    """Bad arguments: exit 2 with one line."""


class JobFailed(Exception):
    """The conversion failed: exit 1 with one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"convert: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The command line of DESIGN section 6."""
    p = _Parser(
        prog="prep/convert.py",
        description="Convert a raw image dataset into every storage format (a Ray job).")
    p.add_argument("--source", required=True, choices=sorted(SOURCES),
                   help="kind of raw dataset")
    p.add_argument("--src", required=True, metavar="URL",
                   help="the raw dataset: archive or folder, any fsspec URL")
    p.add_argument("--dst", required=True, metavar="URL",
                   help="the store to write <name>/ into, any fsspec URL")
    p.add_argument("--name", help="dataset name in the store (default: the source kind)")
    p.add_argument("--size", type=_positive_int, metavar="N",
                   help="resize shorter side to N and centre-crop to NxN "
                        "(default: native size; required for image-folder)")
    p.add_argument("--formats", default="all", metavar="all|ID,ID,...",
                   help=f"formats to write; catalog: {', '.join(CATALOG)}; "
                        "also jpeg-qN, jpeg-qN-444 and webp-qN for N in 1..100")
    p.add_argument("--shard-samples", type=_positive_int, metavar="N",
                   help="samples per shard (default: about 64 MiB of decoded pixels)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F",
                   help="image-folder without split folders: share of each class's images "
                        "for val (default: %(default)s)")
    p.add_argument("--max-rejects", type=_nonneg_int, default=DEFAULT_MAX_REJECTS,
                   metavar="N", help="fail the job when more inputs than this are rejected")
    p.add_argument("--results", metavar="URL",
                   help="results store: add the figures to its conversions table")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the sample shuffle")
    p.add_argument("--limit", type=_positive_int, metavar="N",
                   help="convert at most N samples per split (a trial run)")
    p.add_argument("--storage-options", metavar="JSON|@FILE",
                   help="fsspec options for --src, --dst and --results (e.g. S3 endpoint "
                        "and keys), as JSON or @path.json; default: "
                        f"${STORAGE_OPTIONS_ENV}, else the AWS environment")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray); "
                        "'inline' runs the tasks in this process without Ray")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# --------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> Manifest:
    """Plan, convert and commit; returns the committed manifest."""
    from rich.console import Console

    console = Console(stderr=True)
    options = parse_storage_options(args.storage_options)
    _warn_recorded_secret(args.storage_options, options, console)
    formats = parse_format_list(args.formats)
    name = args.name or args.source
    source_cls = SOURCES.get(args.source)
    if source_cls.needs_size() and args.size is None:
        raise UsageError(f"--size is required for --source {args.source}")

    check_outputs(args, options)
    given = {"val_fraction": args.val_fraction}  # each source takes those it declares
    source = get_source(args.source, args.src, options,
                        **{k: v for k, v in given.items() if k in source_cls.option_names()})
    listing = source.list()
    for note in listing.notes:
        console.print(f"[dim]{note}[/dim]")
    size = args.size or listing.native_size
    if size is None:
        raise UsageError(f"--size is required: source {args.source} has no native size")
    shard_samples = args.shard_samples or default_shard_samples(size, size)
    plans = plan_shards(listing.items, args.seed, shard_samples, args.limit)
    if not plans:
        raise UsageError(f"no samples found in {redact_url(args.src)}")
    kill_point("plan")

    dst = Store.open(args.dst, options)
    with DatasetLock(dst, name):  # one job per dataset: a second one is refused
        listing_rejects = [Reject(key=k, reason=r) for k, r in listing.rejects]
        started = time.perf_counter()
        executor, task_options = make_executor(args.address, args.storage_options,
                                               options, console)
        try:
            results = _run_tasks(executor, plans, source, args, task_options, name, formats,
                                 size, max_rejects=args.max_rejects - len(listing_rejects),
                                 console=console)
            workers = executor.workers
        finally:
            executor.shutdown()
        wall = time.perf_counter() - started

        manifest = _manifest(args, name, listing, size, shard_samples, formats, results,
                             listing_rejects)
        dst.delete(f"{name}/{STAGING_DIR}", recursive=True)
        for folder in (name, f"{name}/{PENDING_DIR}",
                       *{f"{name}/{REJECTS_DIR}/{p.split}" for p in plans}):
            dst.sweep_temp(folder)  # what killed writes of earlier attempts left behind
        quality = _quality(source, plans, formats, size, results, console)
        if args.results:
            rows = _conversion_rows(manifest, results, wall, workers, formats, quality)
            _hold_conversions(dst, name, rows, console)
        manifest.save(dst)
        _report(console, manifest, results, wall, quality)
        if args.results:
            _deliver_conversions(dst, name, Store.open(args.results, options))
    return manifest


def _warn_recorded_secret(text: str | None, options: dict, console: Any) -> None:
    """Say once that Ray has recorded a secret given on a job's command line."""
    in_ray_job = any(os.environ.get(k) for k in _RAY_JOB_ENV)
    if in_ray_job and text and not text.startswith("@") and has_secrets(options):
        console.print("convert: warning: Ray has recorded this job's entrypoint, secrets in "
                      "--storage-options included (job info, driver log); pass "
                      f"--storage-options @file.json or set {STORAGE_OPTIONS_ENV} instead")


def _quality(source: Any, plans: Sequence[ShardPlan], formats: list, size: int,
             results: list[ShardResult], console: Any) -> dict | None:
    """PSNR/SSIM of the lossy formats, measured only when this job converted shards
    (it decodes every sampled image); None when it converted nothing."""
    if not any(r.encode_time_s for r in results):
        console.print("[dim]quality: nothing converted, not measured[/dim]")
        return None
    return measure_quality(source, plans, formats, size)


def _run_tasks(executor: Any, plans: Sequence[ShardPlan], source: Any,
               args: argparse.Namespace, task_options: dict, name: str, formats: list,
               size: int, *, max_rejects: int, console: Any) -> list[ShardResult]:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    results: list[ShardResult] = []
    rejected = 0
    total_images = sum(len(p.items) for p in plans)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]convert[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("shards  {task.fields[rate]}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("shards", total=len(plans), rate="")
        images = 0
        for result in executor.map(convert_shard, plans, source=source, dst_url=args.dst,
                                   dataset=name, format_ids=[f.id for f in formats],
                                   size=size, **task_options):
            results.append(result)
            rejected += len(result.rejects)
            images += result.samples + len(result.rejects)
            progress.update(task, advance=1, rate=progress_text(
                images, total_images, time.perf_counter() - t0))
            if rejected > max_rejects:
                raise JobFailed(f"more than {args.max_rejects} inputs rejected "
                                f"(last: {result.rejects[-1].key}: {result.rejects[-1].reason}); "
                                "committed shards stay; see --max-rejects")
    return results


def progress_text(images: int, total: int, elapsed_s: float) -> str:
    """``40/120 images, 35 img/s, about 2 s left``: the estimate from the images so far."""
    from shared.progress import duration, seconds_left

    rate = images / max(elapsed_s, 1e-9)
    left = seconds_left(images, total, elapsed_s)
    return f"{images}/{total} images, {rate:,.0f} img/s, about {duration(left)} left"


def _manifest(args: argparse.Namespace, name: str, listing: Any, size: int,
              shard_samples: int, formats: list, results: list[ShardResult],
              listing_rejects: list[Reject]) -> Manifest:
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool_version = version("formatlab")
    except PackageNotFoundError:
        tool_version = "unknown"
    results = sorted(results, key=lambda r: (r.split, r.index))
    split_counts: dict[str, int] = {}
    for r in results:
        split_counts[r.split] = split_counts.get(r.split, 0) + r.samples
    format_entries = []
    for fmt in formats:
        shards: list[ShardEntry] = [r.entries[fmt.id] for r in results]
        format_entries.append(FormatEntry(
            id=fmt.id, kind=fmt.kind.value, params=dict(fmt.params), shards=tuple(shards),
            total_bytes=sum(s.bytes for s in shards),
            conversion_time_s=round(sum(r.encode_time_s.get(fmt.id, 0.0) for r in results), 3)))
    rejects = listing_rejects + [rej for r in results for rej in r.rejects]
    resize = (f"shorter side to {size}, centre crop {size}x{size}" if args.size
              else f"native {size}x{size}")
    return Manifest(
        name=name, source_kind=args.source, source_url=redact_url(args.src), height=size,
        width=size, channels=3, dtype="uint8", resize=resize,
        class_names=tuple(listing.class_names),
        splits=tuple(SplitEntry(s, n) for s, n in sorted(split_counts.items())),
        val_split=listing.val_split if listing.val_split in split_counts else None,
        seed=args.seed, shard_samples=shard_samples, formats=tuple(format_entries),
        rejects=tuple(rejects), tool_version=tool_version, created_at=utc_now().isoformat())


def check_outputs(args: argparse.Namespace, options: dict) -> None:
    """Refuse, before any work, an output location that is a file or lies inside one.

    Raises:
        UsageError: one line naming the flag.
    """
    for flag, url, what in (("--dst", args.dst, "the store to write <name>/ into"),
                            ("--results", args.results, "the results store")):
        if url is None:
            continue
        store = Store.open(url, options)
        path = store.root
        while True:
            if store.isfile() if path == store.root else os.path.isfile(path):
                shown = store.display_url if path == store.root else path
                raise UsageError(f"{flag} {shown} is a file; it must be a folder ({what})")
            parent = os.path.dirname(path.rstrip("/"))
            if not store.is_local or not parent or parent == path or os.path.isdir(path):
                break
            path = parent


def _report(console: Any, manifest: Manifest, results: list[ShardResult], wall: float,
            quality: dict | None = None) -> None:
    from rich.table import Table

    samples = sum(s.samples for s in manifest.splits)
    raw = samples * manifest.height * manifest.width * manifest.channels
    skipped = sum(r.skipped for r in results)
    table = Table(title=f"{manifest.name}: {samples:,} samples, {len(manifest.rejects)} rejects, "
                        f"{len(results)} shards ({skipped} already committed), {wall:.1f} s")
    for col in ("format", "samples", "bytes", "bytes/sample", "ratio to pixels", "encode s",
                "PSNR dB", "SSIM"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for f in manifest.formats:
        table.add_row(f.id, f"{samples:,}", f"{f.total_bytes:,}",
                      f"{f.total_bytes / max(samples, 1):,.0f}",
                      f"{f.total_bytes / max(raw, 1):.3f}", f"{f.conversion_time_s:.2f}",
                      *(quality_cells(quality.get((f.id, "train"))) if quality is not None
                        else ("-", "-")))
    stdout_console().print(table)  # the result on stdout, messages on stderr
    for reject in manifest.rejects[:20]:
        console.print(f"[yellow]rejected[/yellow] {reject.key}: {reject.reason}")
    if len(manifest.rejects) > 20:
        console.print(f"... and {len(manifest.rejects) - 20} more rejects (see manifest.json)")


def _conversion_rows(manifest: Manifest, results: list[ShardResult], wall: float,
                     workers: int, formats: list, quality: dict | None) -> list[dict]:
    """One row per format and split when this job converted any shard; none otherwise.

    Sizes are the whole split's (so the latest job describes the dataset); times count
    only the shards this job wrote: ``encode_time_s`` is encoding alone (into local
    staging), ``upload_time_s`` the upload into the store, both null where it wrote none.
    Lossy formats carry PSNR/SSIM against the decoded source (``quality``).
    """
    if not any(r.encode_time_s for r in results):
        return []
    by_id = {f.id: f for f in formats}
    converted_images = sum(r.samples for r in results if r.encode_time_s)
    rows = []
    for f in manifest.formats:
        for split in manifest.split_names:
            split_results = [r for r in results if r.split == split]
            rows.append(_conversion_row(manifest, by_id[f.id].describe(), f, split,
                                        split_results) | {
                "wall_time_s": wall, "workers": workers,
                "images_per_s": converted_images / max(wall, 1e-9)}
                | quality_columns(by_id[f.id], (quality or {}).get((f.id, split))))
    return rows


def _hold_conversions(dst: Store, name: str, rows: list[dict], console: Any) -> None:
    """Keep this job's conversions rows in the store before the manifest commits it.

    So a job killed between its manifest and its results write loses no rows: the
    re-run (which converts nothing) delivers what the killed job held.
    """
    if not rows:
        console.print("[dim]conversions: nothing converted, no rows written[/dim]")
        return
    job_id = new_id()
    rows = [row | {"job_id": job_id} for row in rows]
    dst.write_bytes(f"{name}/{PENDING_DIR}/{job_id}.parquet", table_bytes("conversions", rows))


def _deliver_conversions(dst: Store, name: str, results: Store) -> None:
    """Move every held conversions file into the results store, each exactly once."""
    for rel in dst.walk_files(f"{name}/{PENDING_DIR}"):
        if not rel.endswith(".parquet") or rel.rsplit("/", 1)[-1].startswith("."):
            continue
        target = f"conversions/{rel.rsplit('/', 1)[-1]}"
        if not results.exists(target):  # a kill after the write, before the delete
            results.write_bytes(target, dst.read_bytes(rel))
        dst.delete(rel)


def _conversion_row(manifest: Manifest, described: dict, entry: FormatEntry, split: str,
                    split_results: list[ShardResult]) -> dict:
    """The figures of one format and split; sizes are the split's, times this job's."""
    shards = entry.split_shards(split)
    samples = sum(s.samples for s in shards)
    nbytes = sum(s.bytes for s in shards)
    raw = samples * manifest.height * manifest.width * manifest.channels
    done = [r for r in split_results if r.converted(entry.id)]
    encode = sum(r.encode_time_s[entry.id] for r in done) if done else None
    return {
        "finished_at": utc_now(), "dataset": manifest.name, "format": entry.id,
        "split": split, "samples": samples,
        "rejects": sum(len(r.rejects) for r in split_results),
        "bytes": nbytes, "bytes_per_sample": nbytes / max(samples, 1),
        "ratio_to_raw": nbytes / max(raw, 1), "encode_time_s": encode,
        "encode_images_per_s": (sum(r.samples for r in done) / max(encode, 1e-9)
                                if done else None),
        "upload_time_s": sum(r.upload_time_s.get(entry.id, 0.0) for r in done) if done else None,
        "shards_converted": len(done), "shards_skipped": len(split_results) - len(done),
        "bits": described.get("bits", 8), "compression": described.get("compression"),
        "image_size": manifest.height}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
        return 0
    except (UsageError, SourceError, UnknownFormat, BadStorageOptions, DatasetBusy) as exc:
        _fail(args, exc)
        return 2
    except FileNotFoundError as exc:
        _fail(args, exc)
        return 2
    except (JobFailed, StorageError, ManifestError) as exc:
        _fail(args, exc)
        return 1
    except KeyboardInterrupt:
        print("convert: interrupted; committed shards stay, re-run to finish", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback without --debug
        _fail(args, exc, prefix=f"{type(exc).__name__}: ")
        return 1


def _fail(args: argparse.Namespace, exc: BaseException, prefix: str = "") -> None:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exception(exc)
    message = redact(prefix + one_line(exc))
    print(f"convert: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
