"""How much host memory a loader stages at most, and the budget it must stay under.

A loader's host staging is the batches it holds in host memory between reading and the
training step: batches prefetched by workers, their pinned copies on the way to a GPU,
the one the trainer holds, and the workers' decode temporaries. It grows with batch
size and workers, never with the dataset. Each bound here is a count of batch buffers
times ``batch_bytes = batch_size x H x W x C`` (uint8 pixels), from the loader's own
prefetch rules; ``docs/at-scale.md`` states them.

The budget is ``node-agent --host-staging-mib`` (the loader config's ``host_staging_mib``),
else ``$FORMATLAB_HOST_STAGING_MIB`` (MiB), by default half of physical memory (or of the
cgroup's limit); a loader whose bound exceeds it is refused before it starts
(:func:`check_host_staging`, one line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from node.loaders.base import LoaderUnavailable

BUDGET_ENV = "FORMATLAB_HOST_STAGING_MIB"
BUDGET_FLAG = "--host-staging-mib"
MIB = 1 << 20
# Prefetched batches per worker are capped at about this many bytes in all (the
# DataLoader's prefetch_factor, at least 2, at most 4), so large images with many
# workers do not stage gigabytes.
PREFETCH_TARGET_BYTES = 1 << 30
MIN_PREFETCH, MAX_PREFETCH = 2, 4
# Per reading worker, decode temporaries of up to this many batches: the encoded bytes
# read and the decoded images before they are stacked into the batch.
SCRATCH_BATCHES = 2
CUPY_CHUNK_BYTES = 64 << 20


class StagingBound(NamedTuple):
    """At most ``batches`` host batch buffers (``pinned`` of them pinned) and
    ``scratch`` batches' worth of decode temporaries, of ``batch_bytes`` each; plus
    ``fixed_bytes`` that do not scale with the batch (a shuffle buffer, GETs in flight)
    and ``read_ahead`` bytes of streamed shards (sized to what the budget leaves)."""

    batches: int
    pinned: int
    scratch: int
    batch_bytes: int
    fixed_bytes: int = 0
    read_ahead: int = 0

    @property
    def total_bytes(self) -> int:
        per_batch = (self.batches + self.pinned + self.scratch) * self.batch_bytes
        return per_batch + self.fixed_bytes + self.read_ahead

    def describe(self) -> str:
        """``(12 batches + 5 pinned + 4 scratch) x 50.3 MiB``, one line."""
        parts = f"{self.batches} batches + {self.pinned} pinned + {self.scratch} scratch"
        fixed = f" + {self.fixed_bytes / MIB:.0f} MiB" if self.fixed_bytes else ""
        ahead = f" + {self.read_ahead / MIB:.0f} MiB read-ahead" if self.read_ahead else ""
        return f"({parts}) x {self.batch_bytes / MIB:.1f} MiB{fixed}{ahead}"


def batch_bytes(batch_size: int, image_shape: tuple[int, ...]) -> int:
    n = batch_size
    for d in image_shape:
        n *= d
    return n


def prefetch_factor(batch_bytes: int, workers: int) -> int:
    """Batches each DataLoader worker prefetches: the target split over the workers."""
    fit = PREFETCH_TARGET_BYTES // max(1, workers * batch_bytes)
    return max(MIN_PREFETCH, min(MAX_PREFETCH, fit))


def worker_bound(batch_bytes: int, workers: int, pinned: bool,
                 prefetch: int | None = None) -> StagingBound:
    """DataLoader-based loaders (``file``, ``hdf5``, ``zarr``, ``nvjpeg``).

    With ``w`` workers prefetching ``p`` batches each, at most ``w x p`` batches are
    dispatched and not yet delivered; add the one the trainer holds and the one before
    it (still referenced until the next arrives); with pinning each delivered-but-held
    batch also has a pinned copy (``w x p + 1``); each worker filling a batch holds
    decode temporaries. Without workers the main process reads one batch at a time.
    ``prefetch`` is ``p`` where the DataLoader is not given :func:`prefetch_factor`'s.
    """
    if workers <= 0:
        return StagingBound(2, int(pinned), SCRATCH_BATCHES, batch_bytes)
    p = prefetch_factor(batch_bytes, workers) if prefetch is None else prefetch
    return StagingBound(workers * p + 2, (workers * p + 1) if pinned else 0,
                        SCRATCH_BATCHES * workers, batch_bytes)


def mmap_bound(batch_bytes: int, workers: int, pinned: bool) -> StagingBound:
    """``numpy_mmap``: gathers into host buffers, ``workers + 1`` batches ahead.

    On the CPU: up to ``workers + 1`` pending gathers, the batch just delivered and the
    one before it (``workers + 3``; 2 without workers). On CUDA a fixed ring of
    ``workers + 2`` pinned buffers (2 without workers), the batches then live on the GPU.
    No decode temporaries: the gather writes into the batch buffer.
    """
    if pinned:
        return StagingBound(0, workers + 2 if workers > 0 else 2, 0, batch_bytes)
    return StagingBound(workers + 3 if workers > 0 else 2, 0, 0, batch_bytes)


def thread_bound(batch_bytes: int, pooled: bool, pinned: bool) -> StagingBound:
    """``packed`` in threads: with a pool two batches ahead, else one at a time.

    With a pool at most three batches are submitted and not yet delivered, plus the one
    the trainer holds (4; 2 without a pool), on CUDA a ring of as many pinned buffers
    (the batches then live on the GPU); one batch's encoded member bytes are read at a
    time, split over the threads (compressed codecs: at most a batch of pixels).
    """
    n = 4 if pooled else 2
    return StagingBound(0, n, 1, batch_bytes) if pinned else StagingBound(n, 0, 1, batch_bytes)


def with_read_ahead(bound: StagingBound, ceiling: int, budget: int) -> StagingBound:
    """``bound`` plus a streaming read-ahead: what ``budget`` leaves, at most ``ceiling``
    (none when nothing is left: members are then fetched batch by batch)."""
    return bound._replace(read_ahead=max(0, min(ceiling, budget - bound.total_bytes)))


def cupy_bound(data_bytes: int) -> StagingBound:
    """``cupy``: two pinned chunks of at most 64 MiB, whatever the batch."""
    return StagingBound(0, 0, 0, 0, 2 * min(CUPY_CHUNK_BYTES, max(1, data_bytes)))


def physical_memory(cgroup_max: str = "/sys/fs/cgroup/memory.max") -> int:
    """Physical memory, or the cgroup's (v2) memory limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open(cgroup_max) as f:
            limit = f.read().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def host_budget(environ: Mapping[str, str] | None = None, mib: float | None = None) -> int:
    """The host staging budget in bytes: ``mib`` (``--host-staging-mib``), else
    ``$FORMATLAB_HOST_STAGING_MIB``, else half of physical memory."""
    if mib is not None:
        if not mib > 0:
            raise ValueError(f"{BUDGET_FLAG} {mib:g} must be positive")
        return int(mib * MIB)
    raw = (os.environ if environ is None else environ).get(BUDGET_ENV, "").strip()
    if not raw:
        return physical_memory() // 2
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r} is not a number of MiB") from None
    if mib <= 0:
        raise ValueError(f"{BUDGET_ENV}={raw!r} must be positive")
    return int(mib * MIB)


def staging_reason(loader: str, bound: StagingBound, budget: int,
                   source: str = f"${BUDGET_ENV}") -> str | None:
    """One line when ``bound`` exceeds ``budget`` (set by ``source``), else None."""
    if bound.total_bytes <= budget:
        return None
    return (f"{loader}: host staging needs up to {_mib(bound.total_bytes)} MiB "
            f"{bound.describe()}, over the budget of {_mib(budget)} MiB "
            f"({source}); use a smaller --batch-size or fewer --workers")


def _mib(n: int) -> str:
    """MiB, whole from 10 MiB up, else to two significant digits."""
    return f"{n / MIB:.0f}" if n >= 10 * MIB else f"{n / MIB:.2g}"


def budget_of(loader: str, mib: float | None = None,
              environ: Mapping[str, str] | None = None) -> int:
    """:func:`host_budget`, a bad value raised as :class:`LoaderUnavailable` (one line)."""
    try:
        return host_budget(environ, mib)
    except ValueError as exc:
        raise LoaderUnavailable(f"{loader}: {exc}") from None


def check_host_staging(loader: str, bound: StagingBound, mib: float | None = None,
                       environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`~node.loaders.base.LoaderUnavailable` (one line) over the budget:
    ``mib`` (``--host-staging-mib``) where given, else the environment's."""
    source = BUDGET_FLAG if mib is not None else f"${BUDGET_ENV}"
    reason = staging_reason(loader, bound, budget_of(loader, mib, environ), source)
    if reason:
        raise LoaderUnavailable(reason)
