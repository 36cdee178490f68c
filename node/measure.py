"""The bodies of ``node-agent run``, ``bench`` and ``matrix``: measure one loader x
format pair, or every pair that fits and can run here.

The usage checks that need no torch come first (:func:`node.checks.preflight`); torch
and the loaders are imported only after them.
"""

from __future__ import annotations

import sys
from typing import Any

from node.cache import dataset_format
from node.checks import loader_spec, open_dataset, preflight
from node.config import MatrixConfig, RunConfig
from node.errors import RunFailed, UsageError


def measure(config: RunConfig) -> dict[str, Any]:
    """Run one pair (``run`` or ``bench``); returns its ``runs`` row.

    Raises:
        RunFailed: the run was recorded as failed (its error in the message).
    """
    preflight(config.data, config.loader.loader)  # usage mistakes answered before torch
    from node.session import run

    record = run(config)
    if record.get("status") != "ok":
        command = "bench" if config.measure.mode == "bench" else "run"
        raise RunFailed(record.get("error") or f"{command} failed")
    return record


def matrix(config: MatrixConfig) -> None:
    """Run every loader x format pair that fits and can run here, one after another."""
    from node.plan import open_results
    from node.progress import MatrixProgress
    from node.session import run

    data = config.template.data
    store, manifest = open_dataset(data.store, data.dataset, data.storage_options)
    open_results(config.template.measure.results, store.storage_options)  # not one pair's
    pairs = matrix_pairs(config.loaders, config.formats, manifest)
    progress = MatrixProgress(len(pairs) * config.repeat)
    for rep in range(config.repeat):
        for name, fid in pairs:
            progress.starting(name, fid, rep)
            try:
                progress.finished(name, fid, run(config.pair(name, fid, rep), quiet=True))
            except UsageError as exc:
                progress.finished(name, fid, None, skipped=str(exc))
    progress.summary()
    failures = sum(r.get("status") != "ok" for r in progress.records)
    if failures:
        raise RunFailed(f"{failures} of {progress.total} runs failed (rows with status "
                        "'failed' are in the results store)")


def matrix_pairs(loader_list: str, format_list: str, manifest: Any) -> list[tuple[str, str]]:
    """The (loader, format) pairs to run; prints the loaders left out and why.

    Raises:
        UsageError: an unknown name, or nothing to run (naming why).
    """
    from node.loaders import LOADERS

    loaders = list(LOADERS) if loader_list == "all" else _split(loader_list)
    formats = list(manifest.format_ids) if format_list == "all" else _split(format_list)
    for name in loaders:
        loader_spec(name)
    dataset_formats = {fid: dataset_format(manifest, fid) for fid in formats}
    pairs, skipped = [], []
    for name in loaders:
        cls = LOADERS[name]
        reason = cls.unavailable_reason()
        fitting = [f for f in formats if cls.supports(dataset_formats[f])]
        if reason:
            skipped.append(f"{name}: {reason}")
        elif not fitting:
            skipped.append(f"{name}: none of the formats {', '.join(formats)} fits it")
        else:
            pairs += [(name, f) for f in fitting]
    if not pairs:
        raise UsageError(f"matrix: nothing to run here; {'; '.join(skipped)}")
    for line in skipped:
        print(f"skip {line}", file=sys.stderr)
    return pairs


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
