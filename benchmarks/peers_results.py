"""``peers.py``'s measurements as rows of the results store's ``runs`` and ``epochs``.

One run row per loader measured (formatlab's and the peers', the peer's name as the
loader, what it read as the format), all with the same dataset name, hardware and
settings, so ``node-agent report`` ranks them together as bench runs. The dataset name
says what was measured (``peers-50000x32px-seed0``): it is no prep dataset.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from node.machine import cpu_budget, hardware_id, hardware_info, versions_info
from shared.results import new_id, write_rows
from shared.storage import Store


# Measured for a ratio but no loader a user could pick: printed, not written.
REFERENCES = frozenset({"bare-numpy-gather"})


@dataclass
class Result:
    """One loader's timed epochs.

    Attributes:
        loader: its name in the results (``litdata``, ``ffcv``, ``file``...).
        format: what it read (``jpeg-q95``, ``ffcv-jpeg``...).
        label: the row label in the printed table.
        epoch_s: seconds of each epoch.
        samples: samples per epoch.
        started_at: when its first epoch started.
        workers: its workers where they differ from the run's ``--workers``.
    """

    loader: str
    format: str
    label: str
    epoch_s: list[float]
    samples: int
    started_at: datetime
    workers: int | None = None

    @property
    def rate(self) -> float:
        return self.samples * len(self.epoch_s) / sum(self.epoch_s)

    @property
    def best_epoch_rate(self) -> float:
        return self.samples / min(self.epoch_s)


def dataset_name(args: argparse.Namespace, size: int) -> str:
    return f"peers-{args.samples}x{size}px-seed{args.seed}"


def run_rows(results: Sequence[Result], args: argparse.Namespace, size: int,
             cache_dir: Path) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``(runs row, epochs rows)`` of each result, in the results store's schema."""
    hardware = hardware_info(cache_dir)
    common = {
        "schema_version": None, "status": "ok", "host": socket.gethostname(), "rank": 0,
        "world_size": 1, "dataset": dataset_name(args, size), "device": "cpu",
        "io_path": "host", "epochs": args.epochs, "batch_size": args.batch_size,
        "workers": args.workers, "image_size": size, "mode": "bench",
        "versions": versions_info(), "hardware": hardware, "hardware_id": hardware_id(hardware),
        "cpu_budget": cpu_budget(), "cold_requested": False, "repeat": 0,
        "config": {"benchmark": "benchmarks/peers.py", "samples": args.samples,
                   "seed": args.seed, "shuffle": True},
    }
    out = []
    for r in results:
        run_id = new_id()
        total = sum(r.epoch_s)
        row = common | {
            "run_id": run_id, "loader": r.loader, "format": r.format,
            "started_at": r.started_at, "finished_at": r.started_at + timedelta(seconds=total),
            "samples_per_epoch": r.samples, "total_time_s": total,
            "mean_epoch_time_s": total / len(r.epoch_s), "throughput_img_s": r.rate,
            "workers": args.workers if r.workers is None else r.workers,
            # The timed loop only takes batches: all of an epoch is waiting for data.
            "emulated_step_ms": 0.0, "mean_epoch_data_time_s": total / len(r.epoch_s),
            "data_wait_fraction": 1.0, "accelerator_utilization": 0.0,
        }
        epochs = [{"run_id": run_id, "epoch": e, "epoch_time_s": t, "data_time_s": t,
                   "compute_time_s": 0.0, "samples": r.samples,
                   "steps": -(-r.samples // args.batch_size), "throughput_img_s": r.samples / t}
                  for e, t in enumerate(r.epoch_s)]
        out.append((row, epochs))
    return out


def write_results(url: str, results: Sequence[Result], args: argparse.Namespace, size: int,
                  cache_dir: Path) -> int:
    """Append every loader's result (not the references) to the results store at ``url``;
    returns the runs written."""
    store = Store.open(url)
    rows = run_rows([r for r in results if r.loader not in REFERENCES], args, size, cache_dir)
    for row, epochs in rows:
        write_rows(store, "epochs", epochs, file_id=row["run_id"])
        write_rows(store, "runs", [row], file_id=row["run_id"])
    return len(rows)

