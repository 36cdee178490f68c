"""Loaders: one module each, one explicit registry. See :mod:`node.loaders.base`.

The registry holds, per loader, what ``--help`` and ``node-agent loaders`` show (name,
device, formats, summary) and a quick availability check (an NVIDIA driver, the
packages found by ``importlib.util.find_spec``) that imports neither torch nor the
loader's libraries. A loader's module is imported only when the loader is used:
``LOADERS[name]`` or :func:`get_loader`. The full check (:meth:`Loader.unavailable_reason`:
CUDA through torch, packages that import, matching CUDA builds) runs then.

:data:`LOADER_SPECS` is a :class:`shared.registry.Registry` keyed by each spec's name.
A spec's :class:`Reads` is the one declaration of which formats the loader reads:
``Loader.supports``, the loader table's formats column and the loader contract test's
cases all come from it. Adding a loader is one module and one ``register`` line in
:mod:`node.loaders.registry`.
"""

from __future__ import annotations

from typing import Any

from node.loaders.registry import (LOADER_SPECS, LOADERS, NO_GPU, LoaderSpec, Reads,
                                   UnknownLoader, get_loader, get_spec, module_present,
                                   nvidia_gpu_present)

_BASE_NAMES = ("Batch", "Loader", "LoaderConfig", "LoaderUnavailable", "ShardSlice")


def __getattr__(name: str) -> Any:
    # The contract's types live in base, which imports torch: only on first use.
    if name in _BASE_NAMES:
        from node.loaders import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LOADERS", "LOADER_SPECS", "Batch", "Loader", "LoaderConfig", "LoaderSpec",
           "LoaderUnavailable", "Reads", "ShardSlice", "UnknownLoader", "get_loader",
           "get_spec"]
