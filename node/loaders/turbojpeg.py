"""libjpeg-turbo's TurboJPEG API, for decoding whole runs of JPEGs into a batch's memory.

:meth:`TurboJpeg.decode_many` decodes a run of JPEG members (one buffer, with each
member's start and size) into consecutive RGB rows of ``out``. With numba installed the
loop over images is compiled (nopython, ``nogil``) and calls ``tjDecompressHeader3`` and
``tjDecompress2`` through ctypes function pointers, so a run costs one Python call and
holds no GIL: no Python work per image, the way FFCV's pipeline decodes. Without numba
the same two calls are made from a Python loop (ctypes releases the GIL for each call,
but each image still costs a few microseconds of Python, which at 32x32 is a third of
the decode). :attr:`TurboJpeg.loop` says which ran, for ``io_evidence``.

Every image's header is read first and its size checked against the dataset's (a JPEG
of another size would otherwise be scaled into the rows, silently). Decoding uses the
accurate integer DCT (FFCV passes ``TJFLAG_FASTDCT``; those pixels differ slightly from
every other loader's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

TJPF_RGB = 0
_HEADER_FAILED, _WRONG_SIZE, _DECODE_FAILED = 1, 2, 3
# (handle, src, starts, sizes, dst, height, width, dims) -> (member, code)
_LOOP_SIGNATURE = ("UniTuple(int64, 2)(int64, int64, int64[::1], int64[::1], int64, int64, "
                   "int64, int32[::1])")


@functools.cache
def turbojpeg_path() -> str | None:
    """The system's libturbojpeg, or None (then JPEG decodes through torchvision.io)."""
    return ctypes.util.find_library("turbojpeg")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.tjInitDecompress.restype = ctypes.c_void_p
    lib.tjDestroy.argtypes = [ctypes.c_void_p]
    lib.tjGetErrorStr2.restype = ctypes.c_char_p
    lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
    ptr, c_int = ctypes.c_void_p, ctypes.c_int
    lib.tjDecompressHeader3.argtypes = [ptr, ptr, ctypes.c_ulong, ptr, ptr, ptr, ptr]
    lib.tjDecompressHeader3.restype = c_int
    lib.tjDecompress2.argtypes = [ptr, ptr, ctypes.c_ulong, ptr, c_int, c_int, c_int, c_int,
                                  c_int]
    lib.tjDecompress2.restype = c_int
    return lib


def _python_loop(lib: ctypes.CDLL) -> Callable[..., tuple[int, int]]:
    """The per-image loop in Python (numba absent): same calls, same result codes."""
    header, decompress = lib.tjDecompressHeader3, lib.tjDecompress2

    def loop(handle: int, src: int, starts: np.ndarray, sizes: np.ndarray, dst: int,
             height: int, width: int, dims: np.ndarray) -> tuple[int, int]:
        step, d = height * width * 3, dims.ctypes.data
        for k, (start, size) in enumerate(zip(starts.tolist(), sizes.tolist())):
            if header(handle, src + start, size, d, d + 4, d + 8, d + 12) != 0:
                return k, _HEADER_FAILED
            if dims[0] != width or dims[1] != height:
                return k, _WRONG_SIZE
            if decompress(handle, src + start, size, dst + k * step, width, 0, height,
                          TJPF_RGB, 0) != 0:
                return k, _DECODE_FAILED
        return -1, 0

    return loop


@functools.cache
def compiled_loop(path: str) -> Callable[..., tuple[int, int]] | None:
    """The per-image loop compiled by numba for the library at ``path``, or None.

    Compiled when first asked for, once per process (about half a second here; the
    function pointers are constants in the machine code, so numba cannot cache it on
    disk): the reader asks in the main process, so forked DataLoader workers inherit it.
    """
    try:
        import numba
    except ImportError:
        return None
    lib = _bind(ctypes.CDLL(path))
    header, decompress = lib.tjDecompressHeader3, lib.tjDecompress2

    @numba.njit(_LOOP_SIGNATURE, nogil=True)
    def loop(handle: int, src: int, starts: np.ndarray, sizes: np.ndarray, dst: int,
             height: int, width: int, dims: np.ndarray) -> tuple[int, int]:
        step, d = height * width * 3, dims.ctypes.data
        for k in range(len(starts)):
            p = src + starts[k]
            if header(handle, p, sizes[k], d, d + 4, d + 8, d + 12) != 0:
                return k, _HEADER_FAILED
            if dims[0] != width or dims[1] != height:
                return k, _WRONG_SIZE
            if decompress(handle, p, sizes[k], dst + k * step, width, 0, height,
                          TJPF_RGB, 0) != 0:
                return k, _DECODE_FAILED
        return -1, 0

    return loop


class TurboJpeg:
    """libturbojpeg through ctypes: runs of JPEGs decoded into given memory, GIL released.

    One decompressor handle per thread (libturbojpeg handles are not thread-safe),
    destroyed by :meth:`close`. Pickles as its library path, so each DataLoader worker
    opens its own.
    """

    def __init__(self, path: str, compiled: bool = True) -> None:
        self.path = path
        self.lib = _bind(ctypes.CDLL(path))
        kernel = compiled_loop(path) if compiled else None
        self._loop = kernel or _python_loop(self.lib)
        self.loop = "numba-compiled loop" if kernel is not None else "Python loop"
        self._local = threading.local()
        self._handles: list[int] = []
        self._lock = threading.Lock()

    def _state(self) -> tuple[int, np.ndarray]:
        state = getattr(self._local, "state", None)
        if state is None:
            handle = self.lib.tjInitDecompress()
            if not handle:
                raise RuntimeError(f"{self.path}: tjInitDecompress failed")
            with self._lock:
                self._handles.append(handle)
            state = self._local.state = (handle, np.zeros(4, np.int32))
        return state

    def decode_many(self, buf: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                    out: np.ndarray) -> None:
        """Decode the JPEGs at ``buf[starts[k]:starts[k] + sizes[k]]`` into ``out[k]``.

        ``out`` is C-contiguous uint8 of shape (n, height, width, 3).

        Raises:
            ValueError: member ``k`` is not a JPEG, is corrupt, or is not ``height`` x
                ``width`` (the message names ``k``).
        """
        if not len(starts):
            return
        n, height, width, channels = out.shape
        if channels != 3 or n < len(starts) or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous (>= {len(starts)}, h, w, 3) uint8")
        handle, dims = self._state()
        k, code = self._loop(handle, buf.ctypes.data, np.ascontiguousarray(starts, np.int64),
                             np.ascontiguousarray(sizes, np.int64), out.ctypes.data,
                             height, width, dims)
        if code == _WRONG_SIZE:
            raise ValueError(f"member {k} decoded to shape ({dims[1]}, {dims[0]}, 3), the "
                             f"dataset's images are ({height}, {width}, 3)")
        if code:
            what = "not a JPEG" if code == _HEADER_FAILED else "corrupt JPEG"
            raise ValueError(f"member {k}: {what}: {self.lib.tjGetErrorStr2(handle).decode()}")

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for handle in handles:
            self.lib.tjDestroy(handle)
        self._local = threading.local()

    def __reduce__(self) -> tuple[Any, ...]:
        return (TurboJpeg, (self.path, self.loop != "Python loop"))
