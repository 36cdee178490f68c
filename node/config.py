"""What ``node-agent run``, ``bench`` and ``matrix`` were asked for: one frozen
:class:`RunConfig` of small groups, parsed from the CLI, recorded as JSON in the
``config`` column. Torch-free, so the CLI can build it before any heavy import."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from node.errors import UsageError

DEFAULT_CACHE = "./.cache/formatlab"
DEFAULT_RESULTS = "./results"
MODES = ("train", "bench")


@dataclass(frozen=True)
class DataOptions:
    """Where the converted dataset lives and how the node reaches it."""

    store: str
    dataset: str
    format_id: str
    storage_options: str | None = field(default=None, repr=False)  # may hold credentials
    cache: str = DEFAULT_CACHE
    no_cache: bool = False


@dataclass(frozen=True)
class LoaderOptions:
    """The loader and how it batches."""

    loader: str
    batch_size: int = 256
    workers: int = 2
    host_staging_mib: float | None = None  # None: $FORMATLAB_HOST_STAGING_MIB, else RAM / 2


@dataclass(frozen=True)
class TrainingOptions:
    """The model side of a run (a bench run uses only ``epochs``, ``seed``, ``max_steps``)."""

    epochs: int = 3
    model: str | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    seed: int = 0
    max_steps: int | None = None


@dataclass(frozen=True)
class MeasureOptions:
    """What is measured and where the rows go."""

    results: str = DEFAULT_RESULTS
    mode: str = "train"  # "train" or "bench"
    emulate_step_ms: float | None = None
    cold: bool = False
    repeat: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class PlacementOptions:
    """Which device and which rank of how many."""

    device: str = "auto"
    rank: int | None = None
    world_size: int | None = None

    def resolve_rank(self) -> tuple[int, int]:
        """Rank and world size: see :func:`resolve_rank`."""
        return resolve_rank(self.rank, self.world_size)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is built from, in groups."""

    data: DataOptions
    loader: LoaderOptions
    training: TrainingOptions = TrainingOptions()
    measure: MeasureOptions = MeasureOptions()
    placement: PlacementOptions = PlacementOptions()

    @classmethod
    def from_cli(cls, **kwargs: Any) -> RunConfig:
        """The config from the CLI's option values (names as the options' parameters);
        values no group takes are ignored."""
        groups = {}
        for name, group in _GROUPS.items():
            names = {f.name for f in dataclasses.fields(group)}
            groups[name] = group(**{k: v for k, v in kwargs.items() if k in names})
        return cls(**groups)

    def flat(self) -> dict[str, Any]:
        """Every option under its own name, storage options included."""
        out: dict[str, Any] = {}
        for name in _GROUPS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def public(self) -> dict[str, Any]:
        """The ``config`` column: every option but the storage options (they may hold
        credentials)."""
        flat = self.flat()
        flat.pop("storage_options")
        return flat


_GROUPS: dict[str, type] = {"data": DataOptions, "loader": LoaderOptions,
                            "training": TrainingOptions, "measure": MeasureOptions,
                            "placement": PlacementOptions}


@dataclass(frozen=True)
class MatrixConfig:
    """``node-agent matrix``: the loaders and formats to cross, and the options every
    pair's run shares (``template``, whose loader and format :meth:`pair` replaces)."""

    template: RunConfig
    loaders: str = "all"  # comma-separated names, or "all"
    formats: str = "all"
    repeat: int = 1

    @classmethod
    def from_cli(cls, *, loader_list: str, format_list: str, repeat: int, bench_mode: bool,
                 **kwargs: Any) -> MatrixConfig:
        template = RunConfig.from_cli(mode="bench" if bench_mode else "train",
                                      loader=loader_list, format_id=format_list, **kwargs)
        return cls(template, loaders=loader_list, formats=format_list, repeat=repeat)

    def pair(self, loader: str, format_id: str, repeat: int) -> RunConfig:
        """The run config of one pair, the ``repeat``-th time it runs."""
        t = self.template
        return dataclasses.replace(
            t, data=dataclasses.replace(t.data, format_id=format_id),
            loader=dataclasses.replace(t.loader, loader=loader),
            measure=dataclasses.replace(t.measure, repeat=repeat))


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size from flags, else torchrun's or Slurm's environment.

    Raises:
        UsageError: the rank is not in ``[0, world size)``.
    """
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size
