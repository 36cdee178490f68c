"""The command line of prep/convert.py (DESIGN section 6), parsed into one frozen config.

Click, as ``node-agent``; the choices and help of ``--source`` and ``--formats`` come
from their registries. :func:`parse_config` turns argv into a :class:`ConvertConfig`
or raises :class:`UsageError` with one line (exit 2); the driver gets only the config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from prep.estimate import DEFAULT_PLAN_SAMPLE
from prep.sources import SOURCES, Source
from shared.formats import Format, UnknownFormat, format_id_help, parse_format_list
from shared.storage import STORAGE_OPTIONS_ENV

DEFAULT_MAX_REJECTS = 1000
DEFAULT_VAL_FRACTION = 0.1
PROG = "prep/convert.py"


class UsageError(Exception):
    """Bad arguments: exit 2 with one line."""


class HelpShown(Exception):
    """``--help`` printed the help: exit 0, nothing to run."""


@dataclass(frozen=True)
class SourceConfig:
    """What to read: the source kind, its URL, and the options sources may take.

    Attributes:
        kind: A name registered in :data:`prep.sources.SOURCES`.
        url: The raw dataset, any fsspec URL.
        val_fraction: image-folder without split folders: share of each class for val.
    """

    kind: str
    url: str
    val_fraction: float = DEFAULT_VAL_FRACTION

    @property
    def source_class(self) -> type[Source]:
        return SOURCES.get(self.kind)

    def options(self) -> dict[str, Any]:
        """The source options this kind takes (the flags of other kinds do not apply)."""
        given = {"val_fraction": self.val_fraction}
        return {k: v for k, v in given.items() if k in self.source_class.option_names()}


@dataclass(frozen=True)
class OutputConfig:
    """Where the dataset goes: the store, its name there, and the results store."""

    dst: str
    name: str
    results: str | None = None


@dataclass(frozen=True)
class ConversionConfig:
    """How to convert: the formats, the image side, the shards and their limits.

    Attributes:
        formats: The formats to write, in the order given.
        size: Side of the square output (None: the source's native size).
        shard_samples: Samples per shard (None: about 64 MiB of decoded pixels).
        seed: Seed of the sample shuffle.
        limit: At most this many samples per split (a trial run).
        max_rejects: The job fails when more inputs than this are rejected.
    """

    formats: tuple[Format, ...]
    size: int | None = None
    shard_samples: int | None = None
    seed: int = 0
    limit: int | None = None
    max_rejects: int = DEFAULT_MAX_REJECTS


@dataclass(frozen=True)
class PlanRequest:
    """``--plan``: print the shard plan and an estimate of its cost; convert nothing.

    Attributes:
        sample: Inputs to read, decode, resize and encode for the estimate.
        cores: Cores to project the wall time to (None: the Ray cluster's CPUs).
    """

    sample: int = DEFAULT_PLAN_SAMPLE
    cores: int | None = None

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> PlanRequest | None:
        """The request of ``--plan`` (None without it); its flags alone are refused.

        Raises:
            UsageError: ``--plan-sample`` or ``--plan-cores`` without ``--plan``.
        """
        if not p["plan"]:
            for flag in ("plan_sample", "plan_cores"):
                if p[flag] is not None:
                    raise UsageError(f"--{flag.replace('_', '-')} goes with --plan "
                                     "(see --help)")
            return None
        return cls(p["plan_sample"] or DEFAULT_PLAN_SAMPLE, p["plan_cores"])


@dataclass(frozen=True)
class ConvertConfig:
    """One conversion job, as the command line asked for it.

    Attributes:
        storage_options: ``--storage-options`` as given (JSON, ``@file`` or None); parsed
            by the driver, which also hands the text to Ray tasks without its secrets.
        address: Ray cluster to join; ``inline`` runs the tasks in this process.
        debug: Show tracebacks.
        plan: ``--plan``: estimate only, write nothing (None: convert).
    """

    source: SourceConfig
    output: OutputConfig
    conversion: ConversionConfig
    storage_options: str | None = None
    address: str | None = None
    debug: bool = False
    plan: PlanRequest | None = None

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> ConvertConfig:
        """The config of click's parsed parameters (named as the flags)."""
        return cls(
            source=SourceConfig(p["source"], p["src"], p["val_fraction"]),
            output=OutputConfig(p["dst"], p["name"] or p["source"], p["results"]),
            conversion=ConversionConfig(p["formats"], p["size"], p["shard_samples"], p["seed"],
                                        p["limit"], p["max_rejects"]),
            storage_options=p["storage_options"], address=p["address"], debug=p["debug"],
            plan=PlanRequest.from_params(p))


class _Fraction(click.ParamType):
    """A number in [0, 1)."""

    name = "F"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            self.fail(f"not a number: {value!r}", param, ctx)
        if not 0.0 <= fraction < 1.0:  # NaN fails too
            self.fail(f"must be in [0, 1), got {value}", param, ctx)
        return fraction


def _formats(ctx: click.Context, param: click.Parameter, value: str) -> tuple[Format, ...]:
    try:
        return tuple(parse_format_list(value))
    except UnknownFormat as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


_POSITIVE, _NONNEG = click.IntRange(min=1), click.IntRange(min=0)


@click.command(name=PROG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--source", required=True, type=click.Choice(sorted(SOURCES.names())),
              help="kind of raw dataset (the registered sources)")
@click.option("--src", required=True, metavar="URL",
              help="the raw dataset: archive or folder, any fsspec URL")
@click.option("--dst", required=True, metavar="URL",
              help="the store to write <name>/ into, any fsspec URL")
@click.option("--name", help="dataset name in the store (default: the source kind)")
@click.option("--size", type=_POSITIVE, metavar="N",
              help="resize shorter side to N and centre-crop to NxN (default: native size; "
                   "required for sources without one: "
                   f"{', '.join(n for n, c in SOURCES.items() if c.needs_size())})")
@click.option("--formats", default="all", metavar="all|ID,ID,...", callback=_formats,
              help=f"formats to write: {format_id_help()}")
@click.option("--shard-samples", type=_POSITIVE, metavar="N",
              help="samples per shard (default: about 64 MiB of decoded pixels)")
@click.option("--val-fraction", type=_Fraction(), default=DEFAULT_VAL_FRACTION,
              help="image-folder without split folders: share of each class's images "
                   f"for val (default: {DEFAULT_VAL_FRACTION})")
@click.option("--max-rejects", type=_NONNEG, default=DEFAULT_MAX_REJECTS, metavar="N",
              help="fail the job when more inputs than this are rejected")
@click.option("--results", metavar="URL",
              help="results store: add the figures to its conversions table")
@click.option("--seed", type=_NONNEG, default=0, metavar="N", help="seed of the sample shuffle")
@click.option("--limit", type=_POSITIVE, metavar="N",
              help="convert at most N samples per split (a trial run)")
@click.option("--storage-options", metavar="JSON|@FILE",
              help="fsspec options for --src, --dst and --results (e.g. S3 endpoint and "
                   "keys), as JSON or @path.json; default: "
                   f"${STORAGE_OPTIONS_ENV}, else the AWS environment")
@click.option("--address", metavar="RAY_ADDRESS",
              help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray); "
                   "'inline' runs the tasks in this process without Ray")
@click.option("--plan", is_flag=True,
              help="print the shard plan, the formats and an estimate of wall time and "
                   "bytes from a sample of inputs, then exit; writes nothing")
@click.option("--plan-sample", type=_POSITIVE, metavar="N",
              help=f"--plan: inputs to convert for the estimate (default: {DEFAULT_PLAN_SAMPLE})")
@click.option("--plan-cores", type=_POSITIVE, metavar="N",
              help="--plan: cores to project the wall time to (default: the Ray "
                   "cluster's CPUs; 1 with --address inline)")
@click.option("--debug", is_flag=True, help="show tracebacks")
def command(**params: Any) -> ConvertConfig:
    """Convert a raw image dataset into every storage format (a Ray job)."""
    return ConvertConfig.from_params(params)


def parse_config(argv: Sequence[str] | None = None) -> ConvertConfig:
    """Parse the command line (default: ``sys.argv[1:]``).

    Raises:
        UsageError: a bad flag or value, as one line naming it.
        HelpShown: ``--help`` was given (and printed).
    """
    try:
        result = command.main(args=None if argv is None else list(argv), prog_name=PROG,
                              standalone_mode=False)
    except click.ClickException as exc:  # usage errors and bad values
        raise UsageError(f"{' '.join(exc.format_message().split())} (see --help)") from None
    if not isinstance(result, ConvertConfig):
        raise HelpShown()
    return result
