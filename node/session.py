"""The body of one measured run, from cache to results rows."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from node.errors import UsageError
from node.guards import print_warnings, run_warnings
from node.progress import cache_done
from node.runner import RunConfig, build_loader, fill_cache, host_name
from node.machine import (cpu_budget, evict_page_cache, hardware_id, hardware_info,
                          page_cache_fits, versions_info)
from node.nvml import gpu_name
from node.telemetry import Sampler
from shared.formats import Format
from shared.manifest import Manifest
from shared.results import new_id, utc_now, write_rows
from shared.storage import Store, redact

DEFAULT_MODEL = {"cpu": "convnet", "cuda": "resnet18"}


@dataclass
class RunSession:
    """One run: everything resolved, nothing measured yet."""

    config: RunConfig
    store: Store
    manifest: Manifest
    fmt: Format
    loader_cls: type
    device: torch.device
    rank: int
    world_size: int
    results: Store
    quiet: bool = False
    run_id: str = field(default_factory=new_id)
    model_checksum: str | None = field(default=None, init=False)  # set by a training run
    _train_bytes: int | None = field(default=None, init=False, repr=False)

    def execute(self) -> dict[str, Any]:
        """Cache, load, train or bench, and write the rows; returns the ``runs`` row."""
        cfg = self.config
        started = utc_now()
        ddp = self._init_distributed()
        row: dict[str, Any] = self._base_row(started)
        epochs: list[dict[str, Any]] = []
        loaders: list[Any] = []
        if self.device.type == "cpu":
            # Leave cores to the DataLoader workers: on a small machine intra-op threads
            # competing with them slow every step down (recorded in the config column).
            torch.set_num_threads(max(1, row["cpu_budget"] - cfg.workers))
            row["config"]["torch_threads"] = torch.get_num_threads()
        try:
            fill = self._cache()
            row.update(cache_time_s=fill.stats.seconds, cache_bytes=fill.stats.bytes_total,
                       fits_in_ram=page_cache_fits(fill.stats.bytes_total))
            row["config"]["warnings"] = run_warnings(fill, cfg.batch_size, cfg.max_steps,
                                                     self.manifest.class_names,
                                                     validate=cfg.mode == "train")
            print_warnings(row["config"]["warnings"])
            if not self.quiet:
                cache_done(f"{self.manifest.name}/{self.fmt.id}", fill)
            train = build_loader(self.loader_cls, self.fmt, fill.train, self.manifest, cfg,
                                 self.device, shuffle=True, options=self.store.storage_options)
            loaders.append(train)
            val = None
            if fill.val and cfg.mode == "train":
                val = build_loader(self.loader_cls, self.fmt, fill.val, self.manifest, cfg,
                                   self.device, shuffle=False,
                                   options=self.store.storage_options)
                loaders.append(val)
            before_epoch = _evictor(loaders, fill.stats.paths) if cfg.cold else None
            self._train_bytes = _local_bytes(fill.train)
            with Sampler(gpu=self.device.type == "cuda") as sampler:
                result = self._fit(train, val, sampler, before_epoch, ddp)
            epochs = result.epochs
            row.update(result.run_columns())
            row.update(self._loader_columns(train, sampler))
            row["model_checksum"] = self.model_checksum
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

    # ------------------------------------------------------------------ steps

    def _base_row(self, started: Any) -> dict[str, Any]:
        cfg = self.config
        model = cfg.model or DEFAULT_MODEL[self.device.type]
        hardware = hardware_info(Path(cfg.cache))
        return {
            "run_id": self.run_id, "started_at": started, "status": "failed",
            "host": host_name(), "rank": self.rank, "world_size": self.world_size,
            "dataset": self.manifest.name, "format": self.fmt.id, "loader": cfg.loader,
            "device": str(self.device), "gpu_name": gpu_name() if self.device.type == "cuda"
            else None,
            "io_path": getattr(self.loader_cls, "io_path", "host"),
            "model": model if cfg.mode == "train" else (
                f"emulated-{cfg.emulate_step_ms:g}ms" if cfg.emulate_step_ms else "none"),
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "workers": cfg.workers,
            "image_size": self.manifest.height, "versions": versions_info(),
            "config": cfg.public() | {"model": model, "rank": self.rank,
                                      "world_size": self.world_size},
            "hardware": hardware, "hardware_id": hardware_id(hardware), "repeat": cfg.repeat,
            "mode": cfg.mode, "emulated_step_ms": cfg.emulate_step_ms,
            "cpu_budget": cpu_budget(), "cold_requested": cfg.cold,
        }

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
        if self.world_size <= 1 or "MASTER_ADDR" not in os.environ:
            return False
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)
        # One run id for the whole job, one row per rank.
        shared = [self.run_id]
        dist.broadcast_object_list(shared, src=0)
        self.run_id = f"{shared[0]}-r{self.rank}"
        return True

    def _cache(self) -> Any:
        cfg = self.config
        return fill_cache(self.store, self.manifest, self.fmt.id, cfg.cache, self.rank,
                          self.world_size, no_cache=cfg.no_cache, progress=not self.quiet)

    def _fit(self, train: Any, val: Any, sampler: Sampler, before_epoch: Any,
             ddp: bool) -> Any:
        from node.train import Trainer

        cfg = self.config
        step = self._step(ddp)
        trainer = Trainer(step, device=self.device, sampler=sampler, max_steps=cfg.max_steps,
                          cold=cfg.cold)
        trainer.data_bytes = self._train_bytes
        result = trainer.fit(train, cfg.epochs, val_loader=val, before_epoch=before_epoch,
                             after_epoch=self._progress())
        if step.trains:
            self.model_checksum = weights_checksum(step.model)
        return result

    def _step(self, ddp: bool) -> Any:
        """The step strategy: a training step, or bench's loader-only (emulated) step."""
        cfg = self.config
        if cfg.mode == "bench":
            from node.bench import bench_step

            return bench_step(cfg.emulate_step_ms)
        from node.train import TrainStep

        return TrainStep.build(
            model=cfg.model or DEFAULT_MODEL[self.device.type],
            num_classes=len(self.manifest.class_names), image_size=self.manifest.height,
            device=self.device, seed=cfg.seed, optimizer=cfg.optimizer, lr=cfg.lr, ddp=ddp,
            rank=self.rank)

    def _progress(self) -> Any:
        from node.progress import EpochProgress

        label = f"{self.manifest.name}/{self.fmt.id}/{self.config.loader}"
        return None if self.quiet else EpochProgress(label, self.config.epochs)

    def _write(self, row: dict[str, Any], epochs: list[dict[str, Any]]) -> None:
        if epochs:
            write_rows(self.results, "epochs",
                       [{"run_id": self.run_id, **e} for e in epochs], file_id=self.run_id)
        write_rows(self.results, "runs", [row], file_id=self.run_id)


def weights_checksum(model: torch.nn.Module) -> str:
    """A checksum of the trained parameters: equal on every rank of one DDP job.

    Buffers (BatchNorm running statistics) are left out: DDP broadcasts them from rank 0
    at each forward, so after the last step each rank holds its own.
    """
    from node.models import unwrap

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
