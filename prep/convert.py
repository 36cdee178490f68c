"""Convert a raw image dataset once into every storage format, as a Ray job.

    python prep/convert.py --source cifar10 --src cifar-10-python.tar.gz --dst ./store
    ray job submit --working-dir . -- python prep/convert.py --source image-folder \\
        --src s3://raw/masks --dst s3://formatlab/store --name masks --size 512

Exit 0: manifest committed. Exit 2: bad arguments or unreadable source (one line).
Exit 1: the job failed; committed shards stay, and a re-run converts only the rest.
The command line is parsed by :mod:`prep.config` into one frozen :class:`ConvertConfig`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prep.config import (DEFAULT_MAX_REJECTS, ConvertConfig, HelpShown,  # noqa: F401
                         PlanRequest, UsageError, parse_config)
from prep.conversions import (PENDING_DIR, conversion_rows, deliver_conversions,
                              hold_conversions, report)
from prep.executors import make_executor
from prep.plan import (REJECTS_DIR, ShardPlan, ShardResult, convert_shard,
                       default_shard_samples, plan_shards)
from prep.quality import measure_quality
from prep.sources import Source, SourceError, SourceListing, get_source
from shared.formats import UnknownFormat
from shared.killpoint import kill_point
from shared.lock import DatasetBusy, DatasetLock
from shared.manifest import (FormatEntry, Manifest, ManifestError, Reject, ShardEntry,
                             SplitEntry)
from shared.results import utc_now
from shared.shards import STAGING_DIR
from shared.storage import (STORAGE_OPTIONS_ENV, BadStorageOptions, StorageError, Store,
                            has_secrets, one_line, parse_storage_options, redact,
                            redact_url)

# Set in a driver that `ray job submit` started (its entrypoint is on record).
_RAY_JOB_ENV = ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID", "RAY_SUBMISSION_ID")


class JobFailed(Exception):
    """The conversion failed: exit 1 with one line."""


@dataclass(frozen=True)
class Planned:
    """The job once its source is listed: what to convert, at which size, in which shards."""

    source: Source
    listing: SourceListing
    size: int
    shard_samples: int
    plans: tuple[ShardPlan, ...]


# --------------------------------------------------------------------------- driver


def run(config: ConvertConfig) -> Manifest:
    """Plan, convert and commit; returns the committed manifest."""
    options, console, planned = _prepare(config)
    kill_point("plan")

    name, formats = config.output.name, config.conversion.formats
    dst = Store.open(config.output.dst, options)
    with DatasetLock(dst, name):  # one job per dataset: a second one is refused
        started = time.perf_counter()
        executor, task_options = make_executor(config.address, config.storage_options,
                                               options, console)
        try:
            results = _run_tasks(config, planned, executor, task_options, console)
            workers = executor.workers
        finally:
            executor.shutdown()
        wall = time.perf_counter() - started

        manifest = _manifest(config, planned, results)
        dst.delete(f"{name}/{STAGING_DIR}", recursive=True)
        for folder in (name, f"{name}/{PENDING_DIR}",
                       *{f"{name}/{REJECTS_DIR}/{p.split}" for p in planned.plans}):
            dst.sweep_temp(folder)  # what killed writes of earlier attempts left behind
        quality = _quality(planned, formats, results, console)
        if config.output.results:
            rows = conversion_rows(manifest, results, wall, workers, list(formats), quality)
            hold_conversions(dst, name, rows, console)
        manifest.save(dst)
        report(console, manifest, results, wall, quality)
        if config.output.results:
            deliver_conversions(dst, name, Store.open(config.output.results, options))
    return manifest


def show_plan(config: ConvertConfig) -> Planned:
    """``--plan``: the shard plan, the formats and the estimated cost, on stdout; the
    store is only read (never a lock, a staging folder or a reject written)."""
    from prep.estimate import measure_sample, print_estimate, project, sample_items, shard_lines
    from prep.executors import cluster_cpus
    from shared.progress import stdout_console

    request = config.plan or PlanRequest()
    _, console, planned = _prepare(config)
    out = stdout_console()
    items = [item for p in planned.plans for item in p.items]
    formats = config.conversion.formats
    out.print(f"plan: {config.source.kind} {redact_url(config.source.url)} -> "
              f"{redact_url(config.output.dst)} as {config.output.name!r}, "
              f"{planned.size}x{planned.size}, {len(items):,} samples in "
              f"{len(planned.plans)} shards of up to {planned.shard_samples}")
    for line in shard_lines(planned.plans):
        out.print(f"  {line}")
    out.print(f"formats: {', '.join(f.id for f in formats)}")
    cores = request.cores or cluster_cpus(config.address)
    cost = measure_sample(planned.source, sample_items(items, request.sample),
                          formats, planned.size)
    if not cost.accepted:
        key, reason = cost.rejects[0]
        raise UsageError(f"--plan: all {cost.inputs} sampled inputs were rejected "
                         f"(first: {key}: {reason}); nothing to estimate from")
    print_estimate(out, project(cost, inputs=len(items), shards=len(planned.plans),
                                cores=cores), cost)
    console.print("[dim]--plan: nothing converted, nothing written[/dim]")
    return planned


def _prepare(config: ConvertConfig) -> tuple[dict, Any, Planned]:
    """What converting and planning both do first: the storage options, the checks of
    flags and outputs (before any work), and the source listed into a shard plan."""
    from rich.console import Console

    console = Console(stderr=True)
    options = parse_storage_options(config.storage_options)
    _warn_recorded_secret(config.storage_options, options, console)
    if config.source.source_class.needs_size() and config.conversion.size is None:
        raise UsageError(f"--size is required for --source {config.source.kind}")
    check_outputs(config, options)
    return options, console, plan(config, options, console)


def plan(config: ConvertConfig, options: dict, console: Any) -> Planned:
    """List the source and cut its samples into shards; what the source needs is its own
    declaration (``native_size``, the options it takes), never its name.

    Raises:
        UsageError: no size (neither ``--size`` nor a native one); no samples.
        SourceError: the source is unreadable.
    """
    src, conv = config.source, config.conversion
    source = get_source(src.kind, src.url, options, **src.options())
    listing = source.list()
    for note in listing.notes:
        console.print(f"[dim]{note}[/dim]")
    size = conv.size or listing.native_size
    if size is None:
        raise UsageError(f"--size is required: source {src.kind} has no native size")
    shard_samples = conv.shard_samples or default_shard_samples(size, size)
    plans = plan_shards(listing.items, conv.seed, shard_samples, conv.limit)
    if not plans:
        raise UsageError(f"no samples found in {redact_url(src.url)}")
    return Planned(source, listing, size, shard_samples, tuple(plans))


def _warn_recorded_secret(text: str | None, options: dict, console: Any) -> None:
    """Say once that Ray has recorded a secret given on a job's command line."""
    in_ray_job = any(os.environ.get(k) for k in _RAY_JOB_ENV)
    if in_ray_job and text and not text.startswith("@") and has_secrets(options):
        console.print("convert: warning: Ray has recorded this job's entrypoint, secrets in "
                      "--storage-options included (job info, driver log); pass "
                      f"--storage-options @file.json or set {STORAGE_OPTIONS_ENV} instead")


def _quality(planned: Planned, formats: Sequence[Any], results: list[ShardResult],
             console: Any) -> dict | None:
    """PSNR/SSIM of the lossy formats, measured only when this job converted shards
    (it decodes every sampled image); None when it converted nothing."""
    if not any(r.encode_time_s for r in results):
        console.print("[dim]quality: nothing converted, not measured[/dim]")
        return None
    return measure_quality(planned.source, planned.plans, list(formats), planned.size)


def _run_tasks(config: ConvertConfig, planned: Planned, executor: Any, task_options: dict,
               console: Any) -> list[ShardResult]:
    """Convert every planned shard; fails once more inputs than allowed are rejected."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    max_rejects = config.conversion.max_rejects
    budget = max_rejects - len(planned.listing.rejects)  # listing rejects count too
    results: list[ShardResult] = []
    rejected = images = 0
    total_images = sum(len(p.items) for p in planned.plans)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]convert[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("shards  {task.fields[rate]}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("shards", total=len(planned.plans), rate="")
        for result in executor.map(convert_shard, planned.plans, source=planned.source,
                                   dst_url=config.output.dst, dataset=config.output.name,
                                   format_ids=[f.id for f in config.conversion.formats],
                                   size=planned.size, **task_options):
            results.append(result)
            rejected += len(result.rejects)
            images += result.samples + len(result.rejects)
            progress.update(task, advance=1, rate=progress_text(
                images, total_images, time.perf_counter() - t0))
            if rejected > budget:
                raise JobFailed(f"more than {max_rejects} inputs rejected "
                                f"(last: {result.rejects[-1].key}: {result.rejects[-1].reason}); "
                                "committed shards stay; see --max-rejects")
    return results


def progress_text(images: int, total: int, elapsed_s: float) -> str:
    """``40/120 images, 35 img/s, about 2 s left``: the estimate from the images so far."""
    from shared.progress import duration, seconds_left

    rate = images / max(elapsed_s, 1e-9)
    left = seconds_left(images, total, elapsed_s)
    return f"{images}/{total} images, {rate:,.0f} img/s, about {duration(left)} left"


def _manifest(config: ConvertConfig, planned: Planned, results: list[ShardResult]) -> Manifest:
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
    for fmt in config.conversion.formats:
        shards: list[ShardEntry] = [r.entries[fmt.id] for r in results]
        format_entries.append(FormatEntry(
            id=fmt.id, kind=fmt.kind.value, params=dict(fmt.params), shards=tuple(shards),
            total_bytes=sum(s.bytes for s in shards),
            conversion_time_s=round(sum(r.encode_time_s.get(fmt.id, 0.0) for r in results), 3)))
    listing, size = planned.listing, planned.size
    rejects = [Reject(key=k, reason=r) for k, r in listing.rejects]
    rejects += [rej for r in results for rej in r.rejects]
    resize = (f"shorter side to {size}, centre crop {size}x{size}" if config.conversion.size
              else f"native {size}x{size}")
    return Manifest(
        name=config.output.name, source_kind=config.source.kind,
        source_url=redact_url(config.source.url), height=size, width=size, channels=3,
        dtype="uint8", resize=resize, class_names=tuple(listing.class_names),
        splits=tuple(SplitEntry(s, n) for s, n in sorted(split_counts.items())),
        val_split=listing.val_split if listing.val_split in split_counts else None,
        seed=config.conversion.seed, shard_samples=planned.shard_samples,
        formats=tuple(format_entries), rejects=tuple(rejects), tool_version=tool_version,
        created_at=utc_now().isoformat())


def check_outputs(config: ConvertConfig, options: dict) -> None:
    """Refuse, before any work, an output location that is a file or lies inside one.

    Raises:
        UsageError: one line naming the flag.
    """
    for flag, url, what in (("--dst", config.output.dst, "the store to write <name>/ into"),
                            ("--results", config.output.results, "the results store")):
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


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    try:
        config = parse_config(argv)
    except HelpShown:
        return 0
    except UsageError as exc:
        _fail(False, exc)
        return 2
    try:
        if config.plan is not None:
            show_plan(config)
        else:
            run(config)
        return 0
    except (UsageError, SourceError, UnknownFormat, BadStorageOptions, DatasetBusy,
            FileNotFoundError) as exc:
        _fail(config.debug, exc)
        return 2
    except (JobFailed, StorageError, ManifestError) as exc:
        _fail(config.debug, exc)
        return 1
    except KeyboardInterrupt:
        print("convert: interrupted; committed shards stay, re-run to finish", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback without --debug
        _fail(config.debug, exc, prefix=f"{type(exc).__name__}: ")
        return 1


def _fail(debug: bool, exc: BaseException, prefix: str = "") -> None:
    if debug:
        import traceback

        traceback.print_exception(exc)
    message = redact(prefix + one_line(exc))
    print(f"convert: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
