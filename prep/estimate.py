"""What a conversion will cost, from a small sample of its inputs (``convert.py --plan``).

A few inputs spread over the job's shard plan are read, decoded, resized and encoded in
every format, in this process, each step timed; the encoded shards go to a temporary
folder outside the store and are deleted. :func:`project` scales those figures to the
whole input count and spreads them over the cores: one Ray task converts one shard, so
``shards`` tasks run in ``ceil(shards / cores)`` waves and the wall time is the CPU time
times ``waves / shards``. Bytes scale per image (a container's fixed overhead per shard
is counted once per sampled image's share, which overstates tiny images slightly);
upload time is not included.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prep.plan import ShardPlan
from prep.sources.base import Source, SourceItem
from prep.transform import RejectError, prepare_image
from shared.formats.base import Format
from shared.shards import stage_shard
from shared.storage import Store, redact

DEFAULT_PLAN_SAMPLE = 16


@dataclass(frozen=True)
class SampleCost:
    """What converting a sample of inputs cost, measured in one process.

    Attributes:
        inputs: Inputs sampled.
        accepted: Of those, how many became samples (the others were rejected).
        decode_s: Read, decode and resize of all sampled inputs, seconds.
        encode_s: Per format id, encoding the accepted samples as one shard, seconds.
        bytes: Per format id, that shard's bytes (data and index).
        rejects: ``(key, reason)`` of the sampled inputs that were rejected.
    """

    inputs: int
    accepted: int
    decode_s: float
    encode_s: Mapping[str, float]
    bytes: Mapping[str, int]
    rejects: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FormatEstimate:
    """One format's projected encode cost and size for the whole job."""

    format_id: str
    seconds_per_image: float
    bytes_per_image: float
    cpu_s: float
    wall_s: float
    bytes: int


@dataclass(frozen=True)
class Estimate:
    """The whole job's projected cost (see :func:`project` for the arithmetic)."""

    inputs: int
    samples: int
    shards: int
    cores: int
    decode_cpu_s: float
    decode_wall_s: float
    formats: tuple[FormatEstimate, ...]

    @property
    def wall_s(self) -> float:
        """Decode once, then every format's encode."""
        return self.decode_wall_s + sum(f.wall_s for f in self.formats)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.formats)


def sample_items(items: Sequence[SourceItem], n: int) -> list[SourceItem]:
    """``n`` items evenly spread over ``items`` (the middle of each of ``n`` equal runs);
    all of them when there are no more than ``n``."""
    if n >= len(items):
        return list(items)
    return [items[(2 * i + 1) * len(items) // (2 * n)] for i in range(n)]


def measure_sample(source: Source, items: Sequence[SourceItem], formats: Sequence[Format],
                   size: int) -> SampleCost:
    """Read, decode and resize ``items``, then encode them as one shard of each format in
    a temporary folder (outside any store, deleted after); every step timed, each
    format after one untimed warm-up image."""
    t0 = time.perf_counter()
    keys, images, labels, rejects = [], [], [], []
    for item, payload in source.load(items):
        try:
            if isinstance(payload, BaseException):
                raise RejectError(f"unreadable: {redact(payload)}")
            images.append(prepare_image(payload, size))
        except RejectError as exc:
            rejects.append((item.key, exc.reason))
            continue
        keys.append(item.key)
        labels.append(item.label)
    decode_s = time.perf_counter() - t0
    encode_s: dict[str, float] = {}
    nbytes: dict[str, int] = {}
    if images:
        pixels, label_arr = np.stack(images), np.asarray(labels, dtype=np.int64)
        split = items[0].split
        with tempfile.TemporaryDirectory(prefix="formatlab-plan-") as tmp:
            scratch = Store.open(tmp)
            for fmt in formats:
                # One image first, untimed: the codec's imports and set-up are paid once
                # per job, not per image.
                stage_shard(scratch, fmt, split, 1, keys[:1], pixels[:1], label_arr[:1],
                            staging_dir=tmp)
                t1 = time.perf_counter()
                staged = stage_shard(scratch, fmt, split, 0, keys, pixels, label_arr,
                                     staging_dir=tmp)
                encode_s[fmt.id] = time.perf_counter() - t1
                nbytes[fmt.id] = staged.entry.bytes
    return SampleCost(len(items), len(keys), decode_s, encode_s, nbytes, tuple(rejects))


def project(cost: SampleCost, *, inputs: int, shards: int, cores: int) -> Estimate:
    """Scale a measured sample to ``inputs`` inputs cut into ``shards`` shards on ``cores``.

    Samples are the inputs times the sample's acceptance rate; decode CPU time scales
    per input, encode time and bytes per accepted sample; wall time is CPU time times
    ``ceil(shards / cores) / shards`` (one task per shard, run in waves).

    Raises:
        ValueError: nothing in the sample was accepted (no per-image figures), or a
            count below 1.
    """
    if cost.accepted < 1 or cost.inputs < 1:
        raise ValueError("no sampled input became a sample: nothing to project from")
    if inputs < 1 or shards < 1 or cores < 1:
        raise ValueError(f"inputs, shards and cores must be >= 1, got {inputs}, {shards}, {cores}")
    samples = round(inputs * cost.accepted / cost.inputs)
    spread = math.ceil(shards / cores) / shards
    decode_cpu = cost.decode_s / cost.inputs * inputs
    formats = []
    for fid, seconds in cost.encode_s.items():
        per_image, per_image_bytes = seconds / cost.accepted, cost.bytes[fid] / cost.accepted
        formats.append(FormatEstimate(fid, per_image, per_image_bytes, per_image * samples,
                                      per_image * samples * spread,
                                      round(per_image_bytes * samples)))
    return Estimate(inputs, samples, shards, cores, decode_cpu, decode_cpu * spread,
                    tuple(formats))


# --------------------------------------------------------------------------- the printout


def shard_lines(plans: Sequence[ShardPlan]) -> list[str]:
    """Per split: ``train: 200 samples in 4 shards (3 x 64, 1 x 8)``."""
    by_split: dict[str, list[int]] = {}
    for p in plans:
        by_split.setdefault(p.split, []).append(len(p.items))
    lines = []
    for split, sizes in by_split.items():
        runs = ", ".join(f"{sizes.count(n)} x {n}" for n in sorted(set(sizes), reverse=True))
        lines.append(f"{split}: {sum(sizes):,} samples in {len(sizes)} "
                     f"shard{'s' if len(sizes) != 1 else ''} ({runs})")
    return lines


def print_estimate(console: Any, estimate: Estimate, cost: SampleCost) -> None:
    """The estimate as a table, its method in one line above it."""
    from rich.table import Table

    from shared.progress import duration

    cores = f"{estimate.cores} core{'s' if estimate.cores != 1 else ''}"
    console.print(f"estimate from {cost.inputs} sampled inputs, {cores} "
                  "(read, decode, resize and encode timed in this process; upload not "
                  "included)")
    if cost.rejects:
        key, reason = cost.rejects[0]
        console.print(f"{len(cost.rejects)} of {cost.inputs} sampled inputs rejected "
                      f"(first: {key}: {reason}); projected samples: {estimate.samples:,}")
    table = Table(title=f"{estimate.inputs:,} inputs, {estimate.shards} shards")
    for col in ("step", "ms/image", "bytes/image", "CPU s", "wall s", "bytes"):
        table.add_column(col, justify="left" if col == "step" else "right")
    table.add_row("decode+resize (once)", f"{1e3 * estimate.decode_cpu_s / estimate.inputs:.2f}",
                  "-", f"{estimate.decode_cpu_s:,.1f}", f"{estimate.decode_wall_s:,.1f}", "-")
    for f in estimate.formats:
        table.add_row(f.format_id, f"{1e3 * f.seconds_per_image:.2f}", f"{f.bytes_per_image:,.0f}",
                      f"{f.cpu_s:,.1f}", f"{f.wall_s:,.1f}", f"{f.bytes:,}")
    cpu = estimate.decode_cpu_s + sum(f.cpu_s for f in estimate.formats)
    table.add_row("total", "", "", f"{cpu:,.1f}", f"{estimate.wall_s:,.1f}",
                  f"{estimate.bytes:,}")
    console.print(table)
    console.print(f"total: about {duration(estimate.wall_s)} on {cores}, "
                  f"{estimate.bytes:,} bytes in the store")
