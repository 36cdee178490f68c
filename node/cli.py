"""``node-agent``: cache a shard, train with a chosen loader, measure, compare.

Exit codes (DESIGN section 6): 0 success; 2 usage errors, unknown or incompatible
loader/format, unavailable loader, missing dataset; 1 failures during the run.
Errors are one line without a traceback unless ``--debug``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from node.config import DEFAULT_CACHE, DEFAULT_RESULTS
from node.errors import RunFailed, UsageError
from shared.storage import one_line, redact


def _loader_names() -> list[str]:
    from node.loaders import LOADER_SPECS

    return list(LOADER_SPECS)


def _streaming_loaders() -> list[str]:
    from node.loaders.registry import LOADER_SPECS

    return [name for name in LOADER_SPECS if LOADER_SPECS.get(name).streams]


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's errors into one line and the contract's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug") or kwargs.get("debug")
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except UsageError as exc:
            _fail(exc, 2, debug)
        except RunFailed as exc:
            _fail(exc, 1, debug)
        except KeyboardInterrupt:
            click.echo("node-agent: interrupted", err=True)
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - one line unless --debug
            _fail(exc, 1, debug, prefix=f"{type(exc).__name__}: ")

    return wrapper


def _fail(exc: BaseException, code: int, debug: bool, prefix: str = "") -> None:
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    text = one_line(exc)
    click.echo(f"node-agent: error: {redact(prefix + text)}", err=True)
    sys.exit(code)


class _OneLine(click.Command):
    """Click's own usage errors (bad flag values) as one line too: no usage block."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            exc.ctx = None  # without a context Click prints only "Error: <message>"
            raise


class _Group(_OneLine, click.Group):
    command_class = _OneLine


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """Measure dataset formats and loaders for PyTorch image classification."""


# ----------------------------------------------------------------------------- options
# Every option is declared once, here; a command lists the ones it takes by name
# (:func:`options`), in the order ``--help`` shows them.


def _models() -> list[str]:
    from node.choices import MODELS

    return list(MODELS)


OPTIONS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "store": click.option("--store", required=True, metavar="URL",
                          help="The store that prep/convert.py wrote (path or s3://...)."),
    "dataset": click.option("--dataset", required=True, help="Dataset name in the store."),
    "storage-options": click.option(
        "--storage-options", metavar="JSON",
        help="fsspec options for --store/--results (S3 endpoint, keys); "
             "the AWS environment is used otherwise."),
    "rank": click.option("--rank", type=click.IntRange(min=0), default=None,
                         help="This node's rank (default: RANK or SLURM_PROCID, else 0)."),
    "world-size": click.option(
        "--world-size", type=click.IntRange(min=1), default=None,
        help="Number of ranks (default: WORLD_SIZE or SLURM_NTASKS, else 1)."),
    "cache": click.option("--cache", default=DEFAULT_CACHE, show_default=True, metavar="DIR",
                          help="Local cache directory (fast local disk, e.g. NVMe)."),
    "results": click.option("--results", default=DEFAULT_RESULTS, show_default=True,
                            metavar="URL", help="Results store (path or s3://...)."),
    "epochs": click.option("--epochs", type=click.IntRange(min=1), default=3,
                           show_default=True),
    "batch-size": click.option("--batch-size", type=click.IntRange(min=1), default=256,
                               show_default=True),
    "workers": click.option("--workers", type=click.IntRange(min=0), default=2,
                            show_default=True, help="DataLoader worker processes (CPU loaders)."),
    "model": click.option("--model", type=click.Choice(_models()), default=None,
                          help="Model (default: convnet on CPU, resnet18 on CUDA)."),
    "optimizer": click.option("--optimizer", type=click.Choice(["sgd", "rmsprop"]),
                              default="sgd", show_default=True),
    "lr": click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                       help="Learning rate (default: 0.05 for sgd, 0.001 for rmsprop)."),
    "device": click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
                           default="auto", show_default=True),
    "seed": click.option("--seed", type=int, default=0, show_default=True),
    "max-steps": click.option("--max-steps", type=click.IntRange(min=1), default=None,
                              help="Stop each epoch after this many steps."),
    "host-staging-mib": click.option(
        "--host-staging-mib", type=click.FloatRange(min=0, min_open=True), default=None,
        metavar="MIB", help="Host memory a loader may stage batches in; one whose bound is "
        "over it is refused (default: FORMATLAB_HOST_STAGING_MIB, else half of RAM)."),
    "cold": click.option("--cold", is_flag=True,
                         help="Evict the cached files from the page cache before each epoch."),
    "no-cache": click.option("--no-cache", is_flag=True,
                             help="Read straight from the store, no cache (loaders: "
                             f"{', '.join(_streaming_loaders())})."),
    "format": click.option("--format", "format_id", required=True, metavar="ID",
                           help="Format id (one of the dataset's formats)."),
    "loader": click.option("--loader", required=True, metavar="NAME",
                           help=f"Loader: {', '.join(_loader_names())}; `node-agent loaders` "
                                "says which run here."),
    "emulate-step-ms": click.option(
        "--emulate-step-ms", type=click.FloatRange(min=0), default=None,
        help="Sleep this long per step, standing in for an accelerator's step "
             "(bench, or matrix --bench)."),
}

STORE = ("store", "dataset", "storage-options")
RANK = ("rank", "world-size")
RUN = (*STORE, *RANK, "cache", "results", "epochs", "batch-size", "workers", "model",
       "optimizer", "lr", "device", "seed", "max-steps", "cold", "no-cache",
       "host-staging-mib")
PAIR = ("format", "loader")


def options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Apply the named :data:`OPTIONS`, listed in ``--help`` in this order."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            fn = OPTIONS[name](fn)
        return fn

    return decorate


# ----------------------------------------------------------------------------- commands
# Each command calls one body; the bodies import torch (if at all) after the usage
# checks that need none.

@cli.command("loaders")
@click.option("--check", is_flag=True,
              help="Import each loader and run its full check (CUDA, imports, CUDA builds).")
@_handle_errors
def loaders_cmd(check: bool) -> None:
    """Table of loaders: formats, device, whether available here and why not."""
    from node.loader_table import print_loaders

    print_loaders(check)


@cli.command("cache")
@options(*STORE, *RANK, "format", "cache")
@_handle_errors
def cache_cmd(**kwargs: Any) -> None:
    """Fetch this rank's shards of one format (and the val split) to the cache."""
    from node.cache_fill import cache_for_rank

    cache_for_rank(**kwargs)


@cli.command("run")
@options(*RUN, *PAIR)
@_handle_errors
def run_cmd(**kwargs: Any) -> None:
    """Cache, train with one loader, measure, and append the results."""
    from node.config import RunConfig
    from node.measure import measure

    measure(RunConfig.from_cli(mode="train", **kwargs))


@cli.command("bench")
@options(*RUN, *PAIR, "emulate-step-ms")
@_handle_errors
def bench_cmd(**kwargs: Any) -> None:
    """Loader throughput alone (no model), every step timed; optional emulated step."""
    from node.config import RunConfig
    from node.measure import measure

    measure(RunConfig.from_cli(mode="bench", **kwargs))


@cli.command("matrix")
@options(*RUN)
@click.option("--loaders", "loader_list", default="all", show_default=True,
              help="Comma-separated loaders to try.")
@click.option("--formats", "format_list", default="all", show_default=True,
              help="Comma-separated formats to try (from the dataset's manifest).")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run every pair this many times.")
@click.option("--bench", "bench_mode", is_flag=True,
              help="Measure loader throughput alone (no model), like `bench`.")
@options("emulate-step-ms")
@_handle_errors
def matrix_cmd(**kwargs: Any) -> None:
    """Run every loader x format pair that fits and can run here."""
    from node.config import MatrixConfig
    from node.measure import matrix

    matrix(MatrixConfig.from_cli(**kwargs))


@cli.command("report")
@options("results")
@click.option("--out", default="./report", show_default=True, metavar="DIR",
              help="Where to write Markdown, CSV and PNG charts.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None,
              help="Disk budget for the budget recommendation (bytes).")
@click.option("--storage-options", metavar="JSON", help="fsspec options for --results.")
@_handle_errors
def report_cmd(**kwargs: Any) -> None:
    """Comparison tables, charts and a recommendation from the results store."""
    from node.report import report

    report(**kwargs)


def main() -> None:
    """Console entry point."""
    cli(prog_name="node-agent")


if __name__ == "__main__":
    main()
