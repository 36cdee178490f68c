"""``npy-files``: one ``.npy`` per sample (H, W, C uint8, NumPy format 1.0, C order).

Made for DALI's GPU numpy reader, which reads these headers and copies the payload.
The data starts at byte 4096 (a padded header, see :mod:`shared.formats.npy`), so
cuFile reads of it are page-aligned.
"""

from __future__ import annotations

import io

import numpy as np

from shared.formats.base import FileFormat
from shared.formats.npy import DATA_OFFSET, NPY_VERSION, write_npy


class NpyFilesFormat(FileFormat):
    """Raw pixels with a NumPy header, one file per sample."""

    def __init__(self) -> None:
        super().__init__("npy-files", "npy-files", True,
                         {"npy_version": ".".join(map(str, NPY_VERSION)), "order": "C",
                          "data_offset": DATA_OFFSET},
                         extension="npy", compression="none")

    def encode(self, image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        write_npy(buf, image)
        return buf.getvalue()

    def decode(self, data: bytes | bytearray) -> np.ndarray:
        image = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"npy-files: expected uint8 (H, W, C), got {image.dtype} "
                             f"{image.shape}")
        return np.ascontiguousarray(image)
