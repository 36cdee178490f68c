"""What a conversion reports: the size table, and its rows of the conversions table.

Rows are held in the store under ``<name>/_conversions/`` before the manifest commits
them (:func:`hold_conversions`), then moved into the results store, each exactly once
(:func:`deliver_conversions`): a job killed in between loses no rows.
"""

from __future__ import annotations

from typing import Any

from prep.plan import ShardResult
from prep.quality import quality_cells, quality_columns
from shared.manifest import FormatEntry, Manifest
from shared.progress import stdout_console
from shared.results import new_id, table_bytes, utc_now
from shared.storage import Store

# Under <name>/: conversions rows a job computed, held until the results store has them.
PENDING_DIR = "_conversions"


def report(console: Any, manifest: Manifest, results: list[ShardResult], wall: float,
            quality: dict | None = None) -> None:
    from rich.table import Table

    samples = sum(s.samples for s in manifest.splits)
    raw = samples * manifest.height * manifest.width * manifest.channels
    skipped = sum(r.skipped for r in results)
    table = Table(title=f"{manifest.name}: {samples:,} samples, {len(manifest.rejects)} rejects, "
                        f"{len(results)} shards ({skipped} already committed), {wall:.1f} s")
    for col in ("format", "samples", "bytes", "bytes/sample", "ratio to pixels", "encode s",
                "PSNR dB", "SSIM"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for f in manifest.formats:
        table.add_row(f.id, f"{samples:,}", f"{f.total_bytes:,}",
                      f"{f.total_bytes / max(samples, 1):,.0f}",
                      f"{f.total_bytes / max(raw, 1):.3f}", f"{f.conversion_time_s:.2f}",
                      *(quality_cells(quality.get((f.id, "train"))) if quality is not None
                        else ("-", "-")))
    stdout_console().print(table)  # the result on stdout, messages on stderr
    for reject in manifest.rejects[:20]:
        console.print(f"[yellow]rejected[/yellow] {reject.key}: {reject.reason}")
    if len(manifest.rejects) > 20:
        console.print(f"... and {len(manifest.rejects) - 20} more rejects (see manifest.json)")


def conversion_rows(manifest: Manifest, results: list[ShardResult], wall: float,
                     workers: int, formats: list, quality: dict | None) -> list[dict]:
    """One row per format and split when this job converted any shard; none otherwise.

    Sizes are the whole split's (so the latest job describes the dataset); times count
    only the shards this job wrote: ``encode_time_s`` is encoding alone (into local
    staging), ``upload_time_s`` the upload into the store, both null where it wrote none.
    Lossy formats carry PSNR/SSIM against the decoded source (``quality``).
    """
    if not any(r.encode_time_s for r in results):
        return []
    by_id = {f.id: f for f in formats}
    converted_images = sum(r.samples for r in results if r.encode_time_s)
    rows = []
    for f in manifest.formats:
        for split in manifest.split_names:
            split_results = [r for r in results if r.split == split]
            rows.append(_conversion_row(manifest, by_id[f.id].describe(), f, split,
                                        split_results) | {
                "wall_time_s": wall, "workers": workers,
                "images_per_s": converted_images / max(wall, 1e-9)}
                | quality_columns(by_id[f.id], (quality or {}).get((f.id, split))))
    return rows


def hold_conversions(dst: Store, name: str, rows: list[dict], console: Any) -> None:
    """Keep this job's conversions rows in the store before the manifest commits it.

    So a job killed between its manifest and its results write loses no rows: the
    re-run (which converts nothing) delivers what the killed job held.
    """
    if not rows:
        console.print("[dim]conversions: nothing converted, no rows written[/dim]")
        return
    job_id = new_id()
    rows = [row | {"job_id": job_id} for row in rows]
    dst.write_bytes(f"{name}/{PENDING_DIR}/{job_id}.parquet", table_bytes("conversions", rows))


def deliver_conversions(dst: Store, name: str, results: Store) -> None:
    """Move every held conversions file into the results store, each exactly once."""
    for rel in dst.walk_files(f"{name}/{PENDING_DIR}"):
        if not rel.endswith(".parquet") or rel.rsplit("/", 1)[-1].startswith("."):
            continue
        target = f"conversions/{rel.rsplit('/', 1)[-1]}"
        if not results.exists(target):  # a kill after the write, before the delete
            results.write_bytes(target, dst.read_bytes(rel))
        dst.delete(rel)


def _conversion_row(manifest: Manifest, described: dict, entry: FormatEntry, split: str,
                    split_results: list[ShardResult]) -> dict:
    """The figures of one format and split; sizes are the split's, times this job's."""
    shards = entry.split_shards(split)
    samples = sum(s.samples for s in shards)
    nbytes = sum(s.bytes for s in shards)
    raw = samples * manifest.height * manifest.width * manifest.channels
    done = [r for r in split_results if r.converted(entry.id)]
    encode = sum(r.encode_time_s[entry.id] for r in done) if done else None
    return {
        "finished_at": utc_now(), "dataset": manifest.name, "format": entry.id,
        "split": split, "samples": samples,
        "rejects": sum(len(r.rejects) for r in split_results),
        "bytes": nbytes, "bytes_per_sample": nbytes / max(samples, 1),
        "ratio_to_raw": nbytes / max(raw, 1), "encode_time_s": encode,
        "encode_images_per_s": (sum(r.samples for r in done) / max(encode, 1e-9)
                                if done else None),
        "upload_time_s": sum(r.upload_time_s.get(entry.id, 0.0) for r in done) if done else None,
        "shards_converted": len(done), "shards_skipped": len(split_results) - len(done),
        "bits": described.get("bits", 8), "compression": described.get("compression"),
        "image_size": manifest.height}
