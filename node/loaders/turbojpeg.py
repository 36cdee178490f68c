"""libjpeg-turbo's TurboJPEG API, for decoding whole runs of JPEGs into a batch's memory.

:meth:`TurboJpeg.decode_many` decodes a run of JPEG members (one buffer, with each
member's start and size) into consecutive RGB rows of ``out``. With numba installed the
loop over images is compiled (nopython, ``nogil``), reads each frame header itself and
calls ``tjDecompress2`` through a ctypes function pointer, so a run costs one Python call and
holds no GIL: no Python work per image, the way FFCV's pipeline decodes. Without numba
the same two calls are made from a Python loop (ctypes releases the GIL for each call,
but each image still costs a few microseconds of Python, which at 32x32 is a third of
the decode). :attr:`TurboJpeg.loop` says which ran, for ``io_evidence``.

Every image's frame header is read first (:func:`frame_size`) and its size checked
against the dataset's (a JPEG of another size would otherwise be scaled into the rows,
silently). Decoding uses the
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
_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def frame_size(buf: np.ndarray, start: int, size: int) -> tuple[int, int]:
    """(height, width) from the JPEG's frame header (SOFn), or (-1, -1) when the bytes at
    ``buf[start:start + size]`` are not a JPEG with one before its first scan.

    Markers are walked by their lengths, reading nothing else: ``tjDecompressHeader3``
    would parse every table once more before ``tjDecompress2`` parses them again, a
    cost that shows at 32x32. Compiled with the decode loop (numba).
    """
    end = start + size
    if size < 4 or buf[start] != 0xFF or buf[start + 1] != 0xD8:
        return -1, -1
    i = start + 2
    while i + 4 <= end:
        if buf[i] != 0xFF:
            return -1, -1
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # scan or end of image before any frame
            return -1, -1
        length = (np.int64(buf[i + 2]) << 8) | np.int64(buf[i + 3])
        if marker in _SOF_MARKERS:
            if i + 9 > end:
                return -1, -1
            return ((np.int64(buf[i + 5]) << 8) | np.int64(buf[i + 6]),
                    (np.int64(buf[i + 7]) << 8) | np.int64(buf[i + 8]))
        i += 2 + length
    return -1, -1


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
    lib.tjDecompress2.argtypes = [ptr, ptr, ctypes.c_ulong, ptr, c_int, c_int, c_int, c_int,
                                  c_int]
    lib.tjDecompress2.restype = c_int
    return lib


def _make_loop(decompress: Any, size_of: Callable[..., tuple[int, int]]
               ) -> Callable[..., tuple[int, int]]:
    """The per-image loop: the frame header's size checked, then ``tjDecompress2``."""

    def loop(handle: int, buf: np.ndarray, starts: np.ndarray, sizes: np.ndarray, dst: int,
             height: int, width: int, dims: np.ndarray) -> tuple[int, int]:
        step, src = height * width * 3, buf.ctypes.data
        for k in range(len(starts)):
            h, w = size_of(buf, starts[k], sizes[k])
            if h < 0:
                return k, _HEADER_FAILED
            if h != height or w != width:
                dims[0], dims[1] = w, h
                return k, _WRONG_SIZE
            if decompress(handle, int(src + starts[k]), int(sizes[k]), int(dst + k * step),
                          width, 0, height, TJPF_RGB, 0) != 0:
                return k, _DECODE_FAILED
        return -1, 0

    return loop


def _python_loop(lib: ctypes.CDLL) -> Callable[..., tuple[int, int]]:
    """The per-image loop in Python (numba absent): same calls, same result codes."""
    return _make_loop(lib.tjDecompress2, frame_size)


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
    ints = numba.int64[::1]
    signatures = [numba.types.UniTuple(numba.int64, 2)(
        numba.int64, numba.types.Array(numba.uint8, 1, "C", readonly=readonly), ints, ints,
        numba.int64, numba.int64, numba.int64, numba.int32[::1]) for readonly in (True, False)]
    size_of = numba.njit(nogil=True)(frame_size)
    return numba.njit(signatures, nogil=True)(_make_loop(lib.tjDecompress2, size_of))


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
        k, code = self._loop(handle, buf, np.ascontiguousarray(starts, np.int64),
                             np.ascontiguousarray(sizes, np.int64), out.ctypes.data,
                             height, width, dims)
        if code == _WRONG_SIZE:
            raise ValueError(f"member {k} decoded to shape ({dims[1]}, {dims[0]}, 3), the "
                             f"dataset's images are ({height}, {width}, 3)")
        if code:
            if code == _HEADER_FAILED:
                raise ValueError(f"member {k}: not a JPEG (no frame header before its data)")
            raise ValueError(f"member {k}: corrupt JPEG: "
                             f"{self.lib.tjGetErrorStr2(handle).decode()}")

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for handle in handles:
            self.lib.tjDestroy(handle)
        self._local = threading.local()

    def __reduce__(self) -> tuple[Any, ...]:
        return (TurboJpeg, (self.path, self.loop != "Python loop"))
