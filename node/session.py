"""Execute a :class:`~node.plan.RunPlan`: cache, build the loaders, run the epoch loop
with the run's step strategy (train or bench), and write the results rows.

:func:`run` writes one ``runs`` row and one ``epochs`` row per epoch for every run that
got as far as a loader, failed runs included (``status = "failed"`` and the error).
Usage errors raise :class:`UsageError` (from :func:`node.plan.resolve`, or a loader that
finds it does not fit) before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from node.bench import bench_step
from node.cache_fill import CacheFill, fill_cache
from node.config import RunConfig
from node.errors import UsageError
from node.guards import print_warnings, run_warnings
from node.loaders.base import LoaderConfig, ShardSlice
from node.machine import (cpu_budget, evict_page_cache, hardware_id, hardware_info,
                          page_cache_fits, versions_info)
from node.models import unwrap
from node.nvml import gpu_name
from node.plan import RunPlan, resolve
from node.progress import EpochProgress, cache_done
from node.steps import Step
from node.telemetry import Sampler
from node.train import Trainer, TrainResult, TrainStep
from shared.results import data_access, new_id, utc_now, write_rows
from shared.storage import redact

DEFAULT_MODEL = {"cpu": "convnet", "cuda": "resnet18"}


def run(config: RunConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Resolve and execute one measured run; returns the ``runs`` row written."""
    return RunSession(resolve(config), quiet=quiet).execute()


@dataclass
class RunSession:
    """Executes one plan; holds what the run learns on the way (its id, the weights)."""

    plan: RunPlan
    quiet: bool = False
    run_id: str = field(default_factory=new_id)
    model_checksum: str | None = field(default=None, init=False)  # set by a training run

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    def execute(self) -> dict[str, Any]:
        """Cache, load, train or bench, and write the rows; returns the ``runs`` row."""
        started = utc_now()
        ddp = self._init_distributed()
        row: dict[str, Any] = self._base_row(started)
        epochs: list[dict[str, Any]] = []
        loaders: list[Any] = []
        if self.plan.device.type == "cpu":
            # Leave cores to the DataLoader workers: on a small machine intra-op threads
            # competing with them slow every step down (recorded in the config column).
            torch.set_num_threads(max(1, row["cpu_budget"] - self.config.loader.workers))
            row["config"]["torch_threads"] = torch.get_num_threads()
        try:
            self._measure(row, loaders, epochs, ddp)
            row["status"] = "ok"
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded as a failed run
            row["status"] = "failed"
            row["error"] = redact(f"{type(exc).__name__}: {exc}")
        finally:
            for loader in loaders:
                _close_quietly(loader)
            row["finished_at"] = utc_now()
            if ddp:
                torch.distributed.destroy_process_group()
        self._write(row, epochs)
        if not self.quiet:
            print_summary(row, epochs)
        return row

    def _measure(self, row: dict[str, Any], loaders: list[Any],
                 epochs: list[dict[str, Any]], ddp: bool) -> None:
        """Fill the cache, open the loaders (appended to ``loaders`` for closing), run
        the epochs (their rows appended to ``epochs``); fills in ``row``."""
        plan, cfg = self.plan, self.config
        fill = self._cache(row)
        train = self._loader(fill.train, shuffle=True)
        loaders.append(train)
        val = None
        if fill.val and cfg.measure.mode == "train":
            val = self._loader(fill.val, shuffle=False)
            loaders.append(val)
        before_epoch = _evictor(loaders, fill.stats.paths) if cfg.measure.cold else None
        data_bytes = _local_bytes(fill.train)
        with Sampler(gpu=plan.device.type == "cuda") as sampler:
            result = self._fit(train, val, sampler, before_epoch, ddp, data_bytes)
        epochs.extend(result.epochs)
        row.update(result.run_columns())
        row.update(self._loader_columns(train, sampler))
        row["model_checksum"] = self.model_checksum

    # ------------------------------------------------------------------ steps

    def _base_row(self, started: Any) -> dict[str, Any]:
        plan, cfg = self.plan, self.config
        measure, device = cfg.measure, plan.device
        model = cfg.training.model or DEFAULT_MODEL[device.type]
        hardware = hardware_info(Path(cfg.data.cache))
        emulated = f"emulated-{measure.emulate_step_ms:g}ms" if measure.emulate_step_ms \
            else "none"
        return {
            "run_id": self.run_id, "started_at": started, "status": "failed",
            "host": socket.gethostname(), "rank": plan.rank, "world_size": plan.world_size,
            "dataset": plan.manifest.name, "format": plan.fmt.id, "loader": cfg.loader.loader,
            "device": str(device),
            "gpu_name": gpu_name() if device.type == "cuda" else None,
            "io_path": getattr(plan.loader_cls, "io_path", "host"),
            "model": model if measure.mode == "train" else emulated,
            "epochs": cfg.training.epochs, "batch_size": cfg.loader.batch_size,
            "workers": cfg.loader.workers, "image_size": plan.manifest.height,
            "versions": versions_info(),
            "config": cfg.public() | {"model": model, "rank": plan.rank,
                                      "world_size": plan.world_size},
            "hardware": hardware, "hardware_id": hardware_id(hardware),
            "repeat": measure.repeat, "mode": measure.mode,
            "emulated_step_ms": measure.emulate_step_ms,
            "cpu_budget": cpu_budget(), "cold_requested": measure.cold,
            "data_access": data_access(cfg.public()),
        }

    def _cache(self, row: dict[str, Any]) -> CacheFill:
        """Fill the cache; its figures and the guards' warnings go into ``row``."""
        plan, cfg = self.plan, self.config
        fill = fill_cache(plan.store, plan.manifest, plan.shards, cfg.data.cache,
                          no_cache=cfg.data.no_cache, progress=not self.quiet)
        row.update(cache_time_s=fill.stats.seconds, cache_bytes=fill.stats.bytes_total,
                   fits_in_ram=page_cache_fits(fill.stats.bytes_total))
        row["config"]["warnings"] = run_warnings(fill, cfg.loader.batch_size,
                                                 cfg.training.max_steps,
                                                 plan.manifest.class_names,
                                                 validate=cfg.measure.mode == "train")
        print_warnings(row["config"]["warnings"])
        if not self.quiet:
            cache_done(f"{plan.manifest.name}/{plan.fmt.id}", fill)
        return fill

    def _loader(self, slices: list[ShardSlice], *, shuffle: bool) -> Any:
        plan, cfg = self.plan, self.config
        return build_loader(plan.loader_cls, LoaderConfig(
            fmt=plan.fmt, shards=tuple(slices), batch_size=cfg.loader.batch_size,
            workers=cfg.loader.workers, seed=cfg.training.seed, device=plan.device,
            image_shape=(plan.manifest.height, plan.manifest.width, plan.manifest.channels),
            shuffle=shuffle, storage_options=dict(plan.store.storage_options),
            host_staging_mib=cfg.loader.host_staging_mib))

    @staticmethod
    def _loader_columns(train: Any, sampler: Sampler) -> dict[str, Any]:
        """What the loader says about its data path and resources, and the memory kinds."""
        resources = train.resources()
        return {"io_path": getattr(train, "io_path", "host"),
                "io_path_evidence": getattr(train, "io_evidence", "") or None,
                "loader_threads": resources.get("threads"),
                "loader_processes": resources.get("processes"),
                "ram_kind": sampler.memory_kind,
                "vram_kind": sampler.vram_kind}

    def _init_distributed(self) -> bool:
        plan = self.plan
        if plan.world_size <= 1 or "MASTER_ADDR" not in os.environ:
            return False
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if plan.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=plan.rank, world_size=plan.world_size)
        # One run id for the whole job, one row per rank.
        shared = [self.run_id]
        dist.broadcast_object_list(shared, src=0)
        self.run_id = f"{shared[0]}-r{plan.rank}"
        return True

    def _fit(self, train: Any, val: Any, sampler: Sampler, before_epoch: Any, ddp: bool,
             data_bytes: int | None) -> TrainResult:
        cfg = self.config
        step = self._step(ddp)
        trainer = Trainer(step, device=self.plan.device, sampler=sampler,
                          max_steps=cfg.training.max_steps, cold=cfg.measure.cold)
        trainer.data_bytes = data_bytes
        result = trainer.fit(train, cfg.training.epochs, val_loader=val,
                             before_epoch=before_epoch, after_epoch=self._progress())
        if isinstance(step, TrainStep):
            self.model_checksum = weights_checksum(step.model)
        return result

    def _step(self, ddp: bool) -> Step:
        """The step strategy: a training step, or bench's loader-only (emulated) step."""
        plan, cfg = self.plan, self.config
        if cfg.measure.mode == "bench":
            return bench_step(cfg.measure.emulate_step_ms)
        training = cfg.training
        return TrainStep.build(
            model=training.model or DEFAULT_MODEL[plan.device.type],
            num_classes=len(plan.manifest.class_names), image_size=plan.manifest.height,
            device=plan.device, seed=training.seed, optimizer=training.optimizer,
            lr=training.lr, ddp=ddp, rank=plan.rank)

    def _progress(self) -> EpochProgress | None:
        plan = self.plan
        label = f"{plan.manifest.name}/{plan.fmt.id}/{self.config.loader.loader}"
        return None if self.quiet else EpochProgress(label, self.config.training.epochs)

    def _write(self, row: dict[str, Any], epochs: list[dict[str, Any]]) -> None:
        if epochs:
            write_rows(self.plan.results, "epochs",
                       [{"run_id": self.run_id, **e} for e in epochs], file_id=self.run_id)
        write_rows(self.plan.results, "runs", [row], file_id=self.run_id)


def build_loader(loader_cls: type, config: LoaderConfig) -> Any:
    """A loader instance; its fit check (e.g. free VRAM) failing is a usage error."""
    from node.loaders import LoaderUnavailable

    try:
        loader = loader_cls(config)
    except LoaderUnavailable as exc:
        raise UsageError(f"loader {loader_cls.name!r}: {exc}") from None
    try:
        loader.check_fits()
    except LoaderUnavailable as exc:
        loader.close()
        raise UsageError(f"loader {loader_cls.name!r}: {exc}") from None
    return loader


def weights_checksum(model: torch.nn.Module) -> str:
    """A checksum of the trained parameters: equal on every rank of one DDP job.

    Buffers (BatchNorm running statistics) are left out: DDP broadcasts them from rank 0
    at each forward, so after the last step each rank holds its own.
    """
    h = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(unwrap(model).named_parameters()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _local_bytes(slices: list[Any]) -> int | None:
    """Bytes of the files in the slices' local shard folders; None for store URLs."""
    total = 0
    for location in {s.location for s in slices}:
        if not os.path.isdir(location):
            return None
        for dirpath, _, names in os.walk(location):
            total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    return total


def _evictor(loaders: list[Any], paths: list[str]) -> Callable[[int], None]:
    """``--cold``'s step before each epoch: close the loaders' maps and files, then
    flush and drop the cached files' pages (DESIGN section 8).

    Whether it worked is judged after the epoch from its measured reads; a file still
    mapped here is said at once on stderr.
    """

    def before_epoch(epoch: int) -> None:
        for loader in loaders:
            loader.release()
        report = evict_page_cache(paths)
        if report.mapped or report.failed:
            print(f"epoch {epoch}: --cold could not evict {len(report.mapped)} mapped and "
                  f"{report.failed} unadvisable cached files", file=sys.stderr)

    return before_epoch


def _close_quietly(loader: Any) -> None:
    try:
        loader.close()
    except Exception:  # noqa: BLE001 - closing must not hide the run's outcome
        pass


def print_summary(row: dict[str, Any], epochs: list[dict[str, Any]]) -> None:
    """One screen: the run's figures and a line per epoch."""
    from rich.table import Table

    from shared.progress import stdout_console

    console = stdout_console()
    title = (f"{row['dataset']} / {row['format']} / {row['loader']} on {row['device']} "
             f"({row['model']}): {row['status']}")
    table = Table(title=title)
    for col in ("epoch", "cold", "time s", "data s", "compute s", "img/s", "loss", "train acc",
                "val acc", "peak RAM MiB", "CPU %"):
        table.add_column(col, justify="right")
    for e in epochs:
        cold = {True: "yes", False: "", None: "?"}[e["cold"]]  # ?: reads not measurable
        table.add_row(str(e["epoch"]), cold, _f(e["epoch_time_s"], 2),
                      _f(e["data_time_s"], 2), _f(e["compute_time_s"], 2),
                      _f(e["throughput_img_s"], 0), _f(e.get("train_loss"), 3),
                      _f(e.get("train_accuracy"), 3), _f(e.get("val_accuracy"), 3),
                      _f((e.get("peak_ram_bytes") or 0) / 2**20, 0),
                      _f(e.get("cpu_util_mean_pct"), 0))
    console.print(table)
    if row["status"] != "ok":
        console.print(f"[red]failed:[/red] {row.get('error')}")
        return
    vram = row.get("peak_vram_bytes")
    console.print(
        f"total {_f(row.get('total_time_s'), 2)} s, cache {_f(row.get('cache_time_s'), 2)} s, "
        f"throughput {_f(row.get('throughput_img_s'), 0)} img/s, data wait "
        f"{_f(100 * (row.get('data_wait_fraction') or 0), 1)}%, accelerator utilisation "
        f"{_f(100 * (row.get('accelerator_utilization') or 0), 1)}%, io_path {row.get('io_path')}, "
        f"bytes read {row.get('bytes_read') or 0:,}"
        + (f", peak VRAM {vram / 2**30:.2f} GiB" if vram else "")
        + (f", val accuracy {row['val_accuracy']:.3f} (F1 {row['val_f1']:.3f})"
           if row.get("val_accuracy") is not None else ""))
    console.print(f"run_id {row['run_id']}")


def _f(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"
