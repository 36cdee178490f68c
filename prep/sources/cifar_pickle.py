"""Unpickling untrusted CIFAR-10 batch files: nothing but NumPy array reconstruction.

:class:`_CifarUnpickler` resolves only the globals an array pickle needs; a pickle that
names anything else is refused (:class:`Refused`) before any of it is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np


class Refused(Exception):
    """A pickle asked for something outside the allow-list."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _numpy_attr(path: str, name: str) -> Any:
    """Resolve ``numpy._core.<path>.<name>`` (NumPy 2) or ``numpy.core...`` (NumPy 1)."""
    import importlib

    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{path}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {path}.{name}")


def _plain_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` limited to plain numeric types (no objects, no records)."""
    dtype = np.dtype(*args)
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise Refused(f"numpy.dtype({dtype.str})")
    return dtype


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it: str -> latin-1 bytes, only."""
    if not isinstance(obj, str) or encoding.replace("-", "").lower() != "latin1" or errors != "strict":
        raise Refused("_codecs.encode")
    return obj.encode("latin-1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_attr("multiarray", "_reconstruct")
    scalar = _numpy_attr("multiarray", "scalar")
    frombuffer = _numpy_attr("numeric", "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only NumPy array reconstruction; every other global is refused."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _allowed_globals()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("a persistent id")


def safe_unpickle(data: bytes) -> Any:
    """Unpickle untrusted CIFAR-10 data (Python 2 or 3 pickles).

    Raises:
        Refused: The pickle references anything beyond NumPy array reconstruction.
    """
    # encoding="bytes" keeps Python 2 str as bytes, as the original CIFAR files expect.
    return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
