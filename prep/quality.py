"""Quality of each lossy format in a conversion: PSNR and SSIM against the decoded source.

The reference is what the shards were made from (decoded, EXIF-rotated, resized and
cropped RGB pixels); the test image is that reference encoded and decoded by the
format, as its shard holds it. Measured on a sample, in the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prep.plan import ShardPlan

QUALITY_SAMPLES = 64  # images per split whose quality is measured, from its first shard


def measure_quality(source: Any, plans: Sequence[ShardPlan], formats: list, size: int,
                    samples: int = QUALITY_SAMPLES) -> dict[tuple[str, str], Any]:
    """PSNR and SSIM of each lossy format per split, against the decoded source images.

    The reference is what the shards were made from (decoded, resized, cropped); the test
    image is that reference encoded and decoded by the format, as its shard holds it.
    """
    from prep.transform import RejectError, prepare_image
    from shared.quality import measure

    lossy = [f for f in formats if not f.lossless and hasattr(f, "encode")]
    first: dict[str, ShardPlan] = {}
    for plan in plans:
        first.setdefault(plan.split, plan)
    out: dict[tuple[str, str], Any] = {}
    for split, plan in first.items() if lossy else ():
        refs = []
        for _, payload in source.load(plan.items[:samples]):
            try:
                if not isinstance(payload, BaseException):
                    refs.append(prepare_image(payload, size))
            except RejectError:
                continue
        for f in lossy:
            out[(f.id, split)] = measure(refs, [f.decode(f.encode(r)) for r in refs])
    return out


def quality_columns(fmt: Any, quality: Any) -> dict[str, Any]:
    """The conversions row's quality columns; PSNR and SSIM are null for lossless formats."""
    from shared.formats.registry import chroma_subsampling

    return {"psnr_db": quality.psnr_db if quality else None,
            "ssim": quality.ssim if quality else None,
            "chroma_subsampling": chroma_subsampling(fmt)}


def quality_cells(quality: Any) -> tuple[str, str]:
    """PSNR and SSIM for the size table; ``lossless`` for formats that round-trip."""
    if quality is None or quality.psnr_db is None:
        return "lossless", "lossless"
    return f"{quality.psnr_db:.1f}", "-" if quality.ssim is None else f"{quality.ssim:.4f}"
