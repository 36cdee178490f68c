"""Where shard tasks run: in this process, or as Ray tasks (local or a cluster).

Ray records task arguments and may write them down, so Ray tasks never get a secret
storage option: see :func:`ray_task_options`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prep.plan import ShardPlan, ShardResult, convert_shard
from shared.killpoint import KILL_AT_ENV, KILL_STATE_ENV
from shared.storage import STORAGE_OPTIONS_ENV, has_secrets, public_options


class InlineExecutor:
    """Runs shard tasks one after another in this process (no Ray start-up cost)."""

    workers = 1
    joining = False

    def map(self, fn: Callable[..., ShardResult], plans: Sequence[ShardPlan],
            **kwargs: Any) -> Iterator[ShardResult]:
        for plan in plans:
            yield fn(plan=plan, **kwargs)

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """One Ray task per shard, retried on failure; results as they complete."""

    def __init__(self, address: str | None) -> None:
        import ray

        repo = str(Path(__file__).resolve().parents[1])
        kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
        self.joining = bool(address or os.environ.get("RAY_ADDRESS"))
        env_vars = {k: v for k, v in os.environ.items()
                    if k in (KILL_AT_ENV, KILL_STATE_ENV)}  # fault tests reach workers
        if not self.joining:
            # A local Ray started here: its workers import prep/shared from this checkout.
            env_vars["PYTHONPATH"] = repo
            kwargs["include_dashboard"] = False
        if env_vars:
            kwargs["runtime_env"] = {"env_vars": env_vars}
        ray.init(address=address, **kwargs)
        self._ray = ray
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(max_retries=3, retry_exceptions=True)(convert_shard)

    def map(self, fn: Callable[..., ShardResult], plans: Sequence[ShardPlan],
            **kwargs: Any) -> Iterator[ShardResult]:
        ray = self._ray
        shared = {k: ray.put(v) if k == "source" else v for k, v in kwargs.items()}
        pending = [self._task.remote(plan=plan, **shared) for plan in plans]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    # The task's own error, not Ray's wrapper with the remote traceback.
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, Exception) else exc) from None
                yield result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        self._ray.shutdown()


def make_executor(address: str | None, options_text: str | None, options: dict,
                  console: Any) -> tuple[InlineExecutor | RayExecutor, dict[str, Any]]:
    """The task runner for ``--address``, and the storage-option arguments its tasks get.

    ``options_text`` is ``--storage-options`` as given; ``options`` what it parsed to.
    """
    if address == "inline":
        return InlineExecutor(), {"storage_options": options}
    text = options_text or os.environ.get(STORAGE_OPTIONS_ENV, "")
    task_options = ray_task_options(text, options)
    secret_inline = not text.startswith("@") and has_secrets(options)
    if secret_inline:
        os.environ[STORAGE_OPTIONS_ENV] = text  # a local Ray started here inherits it
    executor = RayExecutor(address)
    if executor.joining and secret_inline:
        console.print("convert: note: secrets in --storage-options are not sent to Ray "
                      f"workers; they use {STORAGE_OPTIONS_ENV} or the AWS credentials of "
                      "the cluster (see README)")
    return executor, task_options


def ray_task_options(text: str, options: dict) -> dict[str, Any]:
    """Storage-option arguments for Ray tasks: never a secret.

    Ray records task arguments and may write them down (logs, spilled objects), so
    tasks get only the public options and read the full ones where the driver did:
    the ``@file`` (by path), or ``FORMATLAB_STORAGE_OPTIONS`` in their environment.
    """
    if text.startswith("@"):
        options_from = "@" + str(Path(text[1:]).expanduser().resolve())
    else:
        options_from = ""
    return {"storage_options": public_options(options), "options_from": options_from}


def cluster_cpus(address: str | None) -> int:
    """The CPUs shard tasks would run on: 1 inline; a joined cluster's (asked of Ray,
    then left); else this machine's, which a local Ray would get (none is started)."""
    if address == "inline":
        return 1
    if not (address or os.environ.get("RAY_ADDRESS")):
        return os.cpu_count() or 1
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        ray.shutdown()
