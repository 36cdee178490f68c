"""The results store: ``runs``, ``epochs`` and ``conversions`` Parquet tables.

Each writer call adds new files only (``<table>/<id>.parquet``), written atomically,
so many nodes can append at once and nothing is lost or half-read. Columns are added,
never renamed or retyped; every row carries ``schema_version``. Read with
``pd.read_parquet(url + "/runs")``.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.shards import parquet_table
from shared.storage import Store, redact

SCHEMA_VERSION = 3  # 2: measured cold, memory kinds, CPU budget, wait percentiles, stages;
#                      3: data_access (cached or streamed)

_TS = pa.timestamp("us", tz="UTC")

RUNS = pa.schema([
    ("run_id", pa.string()),
    ("schema_version", pa.int32()),
    ("started_at", _TS),
    ("finished_at", _TS),
    ("status", pa.string()),
    ("error", pa.string()),
    ("host", pa.string()),
    ("rank", pa.int32()),
    ("world_size", pa.int32()),
    ("dataset", pa.string()),
    ("format", pa.string()),
    ("loader", pa.string()),
    ("device", pa.string()),
    ("gpu_name", pa.string()),
    ("io_path", pa.string()),
    ("model", pa.string()),
    ("epochs", pa.int32()),
    ("batch_size", pa.int32()),
    ("workers", pa.int32()),
    ("image_size", pa.int32()),
    ("samples_per_epoch", pa.int64()),
    ("cache_time_s", pa.float64()),
    ("cache_bytes", pa.int64()),
    ("total_time_s", pa.float64()),
    ("mean_epoch_time_s", pa.float64()),
    ("mean_epoch_data_time_s", pa.float64()),
    ("data_wait_fraction", pa.float64()),
    ("accelerator_utilization", pa.float64()),
    ("throughput_img_s", pa.float64()),
    ("bytes_read", pa.int64()),
    ("disk_read_bytes", pa.int64()),
    ("peak_ram_bytes", pa.int64()),
    ("peak_vram_bytes", pa.int64()),
    ("gpu_util_mean_pct", pa.float64()),
    ("cpu_util_mean_pct", pa.float64()),
    ("val_accuracy", pa.float64()),
    ("val_precision", pa.float64()),
    ("val_recall", pa.float64()),
    ("val_f1", pa.float64()),
    ("fits_in_ram", pa.bool_()),
    ("versions", pa.string()),   # JSON
    ("config", pa.string()),     # JSON
    ("hardware", pa.string()),   # JSON
    ("repeat", pa.int32()),
    ("mode", pa.string()),       # "train" or "bench"
    ("emulated_step_ms", pa.float64()),
    ("confusion_matrix", pa.string()),  # JSON list of lists (rows: true class)
    ("model_checksum", pa.string()),  # trained weights; equal across ranks of a DDP job
    # schema 2 (measure): what each figure is and what the run could use
    ("ram_kind", pa.string()),           # "pss" or "rss"
    ("vram_kind", pa.string()),          # "process" or "device"; null without VRAM figures
    ("peak_ram_anon_bytes", pa.int64()),  # anonymous + shared memory (PSS/RSS as ram_kind)
    ("peak_ram_file_bytes", pa.int64()),  # file-backed pages (mapped dataset, libraries)
    ("cpu_budget", pa.int32()),          # cores the run may use (affinity, cgroup quota)
    ("loader_threads", pa.int32()),
    ("loader_processes", pa.int32()),
    ("io_path_evidence", pa.string()),   # why io_path has its value
    ("cold_requested", pa.bool_()),      # --cold
    ("cold_epochs", pa.int32()),         # epochs verified cold by measured reads
    ("hardware_id", pa.string()),        # short stable hash of the hardware JSON
    ("time_to_first_batch_s", pa.float64()),  # first epoch's
    ("batch_wait_p50_s", pa.float64()),  # over every step of the run
    ("batch_wait_p95_s", pa.float64()),
    ("batch_wait_p99_s", pa.float64()),
    ("batch_wait_max_s", pa.float64()),
    # schema 3: where the loader read from; older rows: derive with data_access(config)
    ("data_access", pa.string()),        # "cache" (local cache) or "stream" (--no-cache)
])

EPOCHS = pa.schema([
    ("run_id", pa.string()),
    ("schema_version", pa.int32()),
    ("epoch", pa.int32()),
    ("cold", pa.bool_()),
    ("epoch_time_s", pa.float64()),
    ("data_time_s", pa.float64()),
    ("compute_time_s", pa.float64()),
    ("samples", pa.int64()),
    ("steps", pa.int64()),
    ("throughput_img_s", pa.float64()),
    ("train_loss", pa.float64()),
    ("train_accuracy", pa.float64()),
    ("val_accuracy", pa.float64()),
    ("val_f1", pa.float64()),
    ("peak_ram_bytes", pa.int64()),
    ("peak_vram_bytes", pa.int64()),
    ("torch_peak_vram_bytes", pa.int64()),
    ("cpu_util_mean_pct", pa.float64()),
    ("gpu_util_mean_pct", pa.float64()),
    ("bytes_read", pa.int64()),
    ("disk_read_bytes", pa.int64()),
    # schema 2 (measure); `cold` is now measured: true only when reads show it, null
    # where reads cannot be measured
    ("time_to_first_batch_s", pa.float64()),
    ("batch_wait_p50_s", pa.float64()),
    ("batch_wait_p95_s", pa.float64()),
    ("batch_wait_p99_s", pa.float64()),
    ("batch_wait_max_s", pa.float64()),
    ("read_time_s", pa.float64()),       # null where a loader cannot tell stages apart
    ("decode_time_s", pa.float64()),
    ("h2d_time_s", pa.float64()),
    ("peak_ram_anon_bytes", pa.int64()),
    ("peak_ram_file_bytes", pa.int64()),
])

CONVERSIONS = pa.schema([
    ("job_id", pa.string()),
    ("schema_version", pa.int32()),
    ("finished_at", _TS),
    ("dataset", pa.string()),
    ("format", pa.string()),
    ("split", pa.string()),
    ("samples", pa.int64()),
    ("rejects", pa.int64()),
    ("bytes", pa.int64()),
    ("bytes_per_sample", pa.float64()),
    ("ratio_to_raw", pa.float64()),
    ("encode_time_s", pa.float64()),
    ("wall_time_s", pa.float64()),
    ("images_per_s", pa.float64()),
    ("workers", pa.int32()),
    ("bits", pa.int32()),
    ("compression", pa.string()),
    ("image_size", pa.int32()),
    ("psnr_db", pa.float64()),  # lossy formats: against the decoded source; null if lossless
    ("ssim", pa.float64()),  # mean SSIM (Wang et al., 11x11 Gaussian); null if lossless
    ("chroma_subsampling", pa.string()),  # "4:2:0", "4:4:4"
    ("encode_images_per_s", pa.float64()),  # this job's shards of this format: samples / encode
    ("upload_time_s", pa.float64()),   # staging -> store, apart from encode_time_s
    ("shards_converted", pa.int32()),  # shards of this format and split written by this job
    ("shards_skipped", pa.int32()),    # already committed, resumed
])

TABLES: Mapping[str, pa.Schema] = {"runs": RUNS, "epochs": EPOCHS, "conversions": CONVERSIONS}
_STRING_JSON = {"versions", "config", "hardware", "confusion_matrix"}

# ``runs.data_access``: the loader read the node's local cache, or streamed from the store.
CACHE, STREAM = "cache", "stream"
# ``runs.loader`` values that name a peer (another project's loader measured in the same
# harness, benchmarks/peers.py), not one of formatlab's own loaders.
PEER_LOADERS = ("webdataset", "litdata", "mosaic-streaming", "ffcv", "torchvision-imagefolder")


def data_access(config: Mapping[str, Any] | str | None) -> str:
    """``runs.data_access`` from a run's config (a mapping or the ``config`` column's JSON).

    ``stream`` where the run was started with ``--no-cache`` (``no_cache`` true), else
    ``cache``: rows from before the flag existed read the local cache.
    """
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            config = None
    no_cache = config.get("no_cache") if isinstance(config, Mapping) else None
    return STREAM if no_cache is True else CACHE


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    """A sortable unique id: UTC time then random hex."""
    return f"{utc_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:10]}"


def to_table(table: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a table in ``table``'s schema; unknown keys are an error, missing are null
    (but ``schema_version``: this one; a run's ``data_access``: from its ``config``).

    Raises:
        ValueError: a row has a column the schema does not define.
    """
    schema = TABLES[table]
    names = set(schema.names)
    columns: dict[str, list[Any]] = {n: [] for n in schema.names}
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"{table}: unknown columns {sorted(extra)}")
        for name in schema.names:
            value = row.get(name)
            if name == "schema_version" and value is None:
                value = SCHEMA_VERSION
            if name == "data_access" and value is None:
                value = data_access(row.get("config"))
            if name in _STRING_JSON and value is not None and not isinstance(value, str):
                value = json.dumps(value, sort_keys=True, default=str)
            if name == "error" and value is not None:
                value = redact(value)
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=schema)


def write_rows(results: Store, table: str, rows: Iterable[Mapping[str, Any]],
               file_id: str | None = None) -> str:
    """Append rows to ``table`` as one new Parquet file; returns its store path.

    The file name is unique (``file_id`` or a fresh id), and the write is atomic,
    so concurrent writers never collide and readers never see half a file.
    """
    data = table_bytes(table, rows)
    rel = f"{table}/{file_id or new_id()}.parquet"
    if results.exists(rel):
        rel = f"{table}/{file_id or 'x'}-{uuid.uuid4().hex[:8]}.parquet"
    results.write_bytes(rel, data)
    return rel


def table_bytes(table: str, rows: Iterable[Mapping[str, Any]]) -> bytes:
    """Rows in ``table``'s schema as the bytes of one Parquet file (what write_rows writes)."""
    buf = io.BytesIO()
    pq.write_table(to_table(table, rows), buf, compression="zstd")
    return buf.getvalue()


def read_table(results: Store, table: str) -> "Any":
    """Every row of ``table`` as a pandas DataFrame (empty, with columns, if none)."""
    import pandas as pd

    files = [f for f in results.walk_files(table) if f.endswith(".parquet")
             and not f.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        return TABLES[table].empty_table().to_pandas()
    frames = []
    for rel in files:
        with results.open_file(rel, "rb") as f:
            frames.append(parquet_table(f.read()).to_pandas())
    return pd.concat(frames, ignore_index=True)
