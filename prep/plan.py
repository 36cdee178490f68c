"""Cutting a source listing into shards, and converting one shard (the Ray task body).

The driver lists the source once, shuffles each split with the recorded seed and cuts
it into shards of ``shard_samples``. One task per shard decodes each image once and
writes the shard in every requested format; each format's shard is committed by its
index. A shard's rejects are written first, as a small sidecar, so that a re-run can
rebuild the manifest without decoding committed shards again.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from prep.sources.base import Source, SourceItem
from prep.transform import RejectError, prepare_image
from shared.formats import get_format
from shared.manifest import Reject, ShardEntry
from shared.shards import commit_shard, committed_shard, stage_shard
from shared.storage import Store, parse_storage_options, redact

SHARD_TARGET_BYTES = 64 << 20
REJECTS_DIR = "_rejects"


@dataclass(frozen=True)
class ShardPlan:
    """One unit of conversion work: the samples of one shard of one split."""

    split: str
    index: int
    items: tuple[SourceItem, ...]

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:05d}"


@dataclass
class ShardResult:
    """What a task reports back to the driver (plain data, cheap to ship)."""

    split: str
    index: int
    samples: int
    entries: dict[str, ShardEntry]
    rejects: list[Reject]
    decode_time_s: float = 0.0
    encode_time_s: dict[str, float] = field(default_factory=dict)  # per format converted
    upload_time_s: dict[str, float] = field(default_factory=dict)
    skipped: bool = False

    def converted(self, format_id: str) -> bool:
        """True when this job wrote this shard of ``format_id`` (not resumed)."""
        return format_id in self.encode_time_s


def default_shard_samples(height: int, width: int, channels: int = 3) -> int:
    """Samples per shard so a shard holds about 64 MiB of decoded pixels."""
    return max(1, SHARD_TARGET_BYTES // (height * width * channels))


def plan_shards(items: Sequence[SourceItem], seed: int, shard_samples: int,
                limit: int | None = None) -> list[ShardPlan]:
    """Shuffle each split with ``seed`` and cut it into shards, splits in sorted order.

    ``limit`` keeps the first ``limit`` samples of each split after shuffling, so a
    small trial run still mixes every class.
    """
    by_split: dict[str, list[SourceItem]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    plans = []
    for split in sorted(by_split):
        split_items = sorted(by_split[split], key=lambda it: it.key)
        rng = np.random.default_rng([seed, _stable_hash(split)])
        order = rng.permutation(len(split_items))
        if limit is not None:
            order = order[:limit]
        shuffled = [split_items[i] for i in order]
        for index, start in enumerate(range(0, len(shuffled), shard_samples)):
            plans.append(ShardPlan(split, index, tuple(shuffled[start:start + shard_samples])))
    return plans


def _stable_hash(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little")


def _rejects_rel(plan: ShardPlan) -> str:
    return posixpath.join(REJECTS_DIR, plan.split, f"shard-{plan.index:05d}.json")


def convert_shard(source: Source, plan: ShardPlan, *, dst_url: str,
                  storage_options: Mapping[str, Any], dataset: str,
                  format_ids: Sequence[str], size: int,
                  options_from: str | None = None) -> ShardResult:
    """Decode the shard's images once and commit the shard in every format.

    Formats whose shard is already committed (same samples) are skipped; when all
    are, nothing is decoded. Never fails on one bad image: it becomes a reject.
    ``options_from`` (a Ray task): where this worker reads the full storage options
    (``@path``, or ``""`` for ``FORMATLAB_STORAGE_OPTIONS``), so that secrets never
    travel as task arguments; ``storage_options`` then holds only the public ones.
    """
    full = parse_storage_options(options_from) if options_from is not None else {}
    store = Store.open(dst_url, full or storage_options).sub(dataset)
    rejects_rel = _rejects_rel(plan)
    planned_keys = [it.key for it in plan.items]
    known_rejects = _read_rejects(store, rejects_rel)
    entries: dict[str, ShardEntry] = {}
    if known_rejects is not None:
        rejected = {r.key for r in known_rejects}
        kept = [k for k in planned_keys if k not in rejected]
        for fid in format_ids:
            entry = committed_shard(store, fid, plan.split, plan.index, kept)
            if entry is not None:
                entries[fid] = entry
        if len(entries) == len(format_ids):
            return ShardResult(plan.split, plan.index, len(kept), entries, known_rejects,
                               skipped=True)

    t0 = time.perf_counter()
    keys, pixels, label_arr, rejects = _decode(source, plan, size)
    decode_time = time.perf_counter() - t0
    store.write_json(rejects_rel, [asdict(r) for r in rejects])

    encode_time: dict[str, float] = {}
    upload_time: dict[str, float] = {}
    for fid in format_ids:
        if fid in entries and known_rejects == rejects:
            continue
        # Encode (into local staging) and upload (into the store) are timed apart.
        t1 = time.perf_counter()
        staged = stage_shard(store, get_format(fid), plan.split, plan.index, keys, pixels,
                             label_arr)
        t2 = time.perf_counter()
        entries[fid] = commit_shard(store, staged)
        encode_time[fid] = t2 - t1
        upload_time[fid] = time.perf_counter() - t2
    return ShardResult(plan.split, plan.index, len(keys), entries, rejects,
                       decode_time_s=decode_time, encode_time_s=encode_time,
                       upload_time_s=upload_time)


def _decode(source: Source, plan: ShardPlan, size: int
            ) -> tuple[list[str], np.ndarray, np.ndarray, list[Reject]]:
    """The shard's images decoded and resized: keys, pixels, labels, and the rejects."""
    keys, images, labels, rejects = [], [], [], []
    for item, payload in source.load(plan.items):
        try:
            if isinstance(payload, BaseException):
                raise RejectError(f"unreadable: {redact(payload)}")
            image = prepare_image(payload, size)
        except RejectError as exc:
            rejects.append(Reject(key=item.key, reason=str(exc)))
            continue
        keys.append(item.key)
        images.append(image)
        labels.append(item.label)
    pixels = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return keys, pixels, np.asarray(labels, dtype=np.int64), rejects


def _read_rejects(store: Store, rel: str) -> list[Reject] | None:
    try:
        data = store.read_json(rel)
    except FileNotFoundError:
        return None
    except ValueError:  # a damaged sidecar: decode again
        return None
    return [Reject(**r) for r in data]
