"""The array-module seam: the same code runs on NumPy (CPU) and CuPy (GPU) arrays.

The readable layers are written against NumPy. CuPy implements NumPy's dispatch protocols
(``__array_ufunc__`` for ufuncs such as ``np.exp(x, out=x)``, ``__array_function__`` for
functions such as ``np.mean``, ``np.concatenate`` or ``np.where``; NEP 13 and NEP 18), so
``np.exp(a)`` on a CuPy array runs on the GPU and returns a CuPy array. What does *not*
follow the arrays is listed here, one small helper each:

=====================================  ================================================
NumPy code                             why it needs a helper
=====================================  ================================================
``np.zeros(shape)``, ``np.arange(n)``  no array argument to dispatch on: ``array_module(x).zeros``
``np.add.at(a, idx, v)``               not dispatched to CuPy: :func:`add_at`
``np.asarray(device_array)``           CuPy refuses implicit copies to the host: :func:`to_numpy`
a NumPy array inside a CuPy expression CuPy refuses it (no implicit upload): :func:`to_device`
=====================================  ================================================

Scalars are safe everywhere (``x * 0.5``, ``x * dtype.type(0.5)``). CuPy is never imported
here unless an array of it is already alive (or a device is asked for by name), so
``import minisparse`` needs NumPy only.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

#: device names accepted by :func:`get_module` and ``Transformer.to``
DEVICES = {"numpy": "numpy", "cpu": "numpy", "cupy": "cupy", "gpu": "cupy", "cuda": "cupy"}


def array_module(*arrays) -> Any:
    """``cupy`` if any of ``arrays`` is a CuPy array, else ``numpy`` (None entries are skipped).

    >>> array_module(np.zeros(3)) is np
    True
    """
    cp = sys.modules.get("cupy")
    if cp is not None:
        for a in arrays:
            if isinstance(a, cp.ndarray):
                return cp
    return np


def is_device_array(a) -> bool:
    """True for a CuPy array (without importing CuPy)."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(a, cp.ndarray)


def get_module(device: str):
    """The array module for a device name: ``"numpy"``/``"cpu"`` or ``"cupy"``/``"gpu"``/``"cuda"``.

    Raises ValueError for an unknown name and ImportError, with the install command,
    when CuPy or a CUDA device is missing.
    """
    if not isinstance(device, str) or device.strip().lower() not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {sorted(DEVICES)} "
                         "('numpy' keeps arrays on the host, 'cupy' moves them to the GPU)")
    name = DEVICES[device.strip().lower()]
    if name == "numpy":
        return np
    try:
        import cupy as cp
    except ImportError as e:
        raise ImportError(f"device {device!r} needs CuPy ({e}); install it with: pip install cupy-cuda12x "
                          "(CUDA 12 drivers) or cupy-cuda13x (CUDA 13), on a machine with an NVIDIA GPU") from e
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver
        raise ImportError(f"device {device!r}: CuPy is installed but no CUDA device is usable ({e})") from e
    if n < 1:
        raise ImportError(f"device {device!r}: CuPy is installed but no CUDA device is visible")
    return cp


def device_name(xp) -> str:
    """``"numpy"`` or ``"cupy"`` for an array module."""
    return "numpy" if xp is np else "cupy"


def to_numpy(a):
    """A NumPy array for a NumPy or CuPy array (copies device arrays to the host; None stays None)."""
    if a is None or isinstance(a, np.ndarray):
        return a
    if is_device_array(a):
        return a.get()
    return np.asarray(a)


def to_device(a, xp):
    """``a`` as an array of module ``xp`` (a no-op when it already is one)."""
    if a is None:
        return None
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)


def add_at(a, idx, v) -> None:
    """``a[idx] += v`` with repeated indices accumulating (``np.add.at``; CuPy's scatter_add)."""
    if is_device_array(a):
        at = getattr(array_module(a).add, "at", None)   # CuPy >= 13 has ufunc.at; older: cupyx.scatter_add
        if at is not None:
            at(a, idx, v)
        else:
            import cupyx
            cupyx.scatter_add(a, idx, v)
    else:
        np.add.at(a, idx, v)


__all__ = ["DEVICES", "array_module", "is_device_array", "get_module", "device_name",
           "to_numpy", "to_device", "add_at"]
