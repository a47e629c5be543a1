"""A strict stand-in for CuPy, so the NumPy/CuPy seam is tested on machines without a GPU.

``FakeArray`` holds a NumPy array and behaves like a CuPy array in the ways that break
host code written for NumPy:

* ``np.asarray(device_array)`` raises TypeError (CuPy refuses implicit device->host copies);
* a NumPy array inside a device expression raises TypeError (no implicit upload), in
  operators, ufuncs, ``np.*`` functions, indexing and item assignment;
* reductions return 0-d device arrays (not NumPy scalars); ``int()``/``float()`` work;
* ufuncs have no ``.at`` (``np.add.at``), as in CuPy; ``cupyx.scatter_add`` exists.

Everything is computed by NumPy underneath, so results equal the host path bit for bit:
what these tests check is that no host array leaks into a device computation and no
device array is silently pulled to the host. ``install(monkeypatch)`` puts the module in
``sys.modules`` as ``cupy`` (and ``cupyx``) for one test.
"""
from __future__ import annotations

import sys
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


class HostArrayError(TypeError):
    pass


def _unwrap(x):
    if isinstance(x, FakeArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise HostArrayError(f"a NumPy array {x.shape} {x.dtype} was mixed into a device computation "
                             "(CuPy refuses this); move it with minisparse.xp.to_device")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(r):
    if isinstance(r, np.ndarray):
        return FakeArray(r)
    if isinstance(r, np.generic) and not isinstance(r, (np.str_, np.bytes_)):
        return FakeArray(np.asarray(r))            # CuPy reductions give 0-d device arrays
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


class FakeArray(NDArrayOperatorsMixin):
    __array_priority__ = 1000

    def __init__(self, a: np.ndarray):
        self._a = a

    # -- the strict parts -------------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise HostArrayError("Implicit conversion to a NumPy array is not allowed (fake CuPy); "
                             "use minisparse.xp.to_numpy / .get()")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method == "at":
            raise HostArrayError(f"CuPy ufuncs have no .at ({ufunc.__name__}.at); use minisparse.xp.add_at")
        out = kwargs.pop("out", None)
        kwargs = _unwrap(kwargs)
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        r = getattr(ufunc, method)(*_unwrap(list(inputs)), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(r)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap(list(args)), **_unwrap(kwargs)))

    # -- array protocol -----------------------------------------------------------------
    def __getitem__(self, idx):
        return _wrap(self._a[_unwrap(idx)])

    def __setitem__(self, idx, value):
        self._a[_unwrap(idx)] = _unwrap(value)

    def __getattr__(self, name):
        if name.startswith("__"):                     # no __array_interface__ & co: NumPy must not see through
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *a, **k: _wrap(attr(*_unwrap(list(a)), **_unwrap(k)))
        return _wrap(attr)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __bool__(self):
        return bool(self._a)

    def __int__(self):
        return int(self._a)

    def __float__(self):
        return float(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return f"fake_cupy.{self._a!r}"

    @property
    def shape(self):
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def T(self):
        return FakeArray(self._a.T)

    def get(self):
        """Device -> host copy, as cupy.ndarray.get()."""
        return self._a.copy()


def _asarray(a, dtype=None):
    if isinstance(a, FakeArray):
        return a if dtype is None else a.astype(dtype)
    return FakeArray(np.array(a, dtype=dtype))       # the explicit upload: always a copy


def _module_function(name):
    fn = getattr(np, name)
    if not callable(fn) or isinstance(fn, type):
        return fn                                      # dtypes (float32, bool_ ...) and constants
    return lambda *a, **k: _wrap(fn(*_unwrap(list(a)), **_unwrap(k)))


def make_module():
    """The fake ``cupy`` and ``cupyx`` modules."""
    cp = types.ModuleType("cupy")
    cp.__getattr__ = _module_function                  # module-level fallback: np.* made strict
    cp.ndarray = FakeArray
    cp.asarray = _asarray
    cp.array = _asarray
    cp.asnumpy = lambda a: a.get() if isinstance(a, FakeArray) else np.asarray(a)
    cp.get_array_module = lambda *arrays: cp if any(isinstance(a, FakeArray) for a in arrays) else np
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    cp.cuda = types.SimpleNamespace(runtime=runtime)
    cpx = types.ModuleType("cupyx")

    def scatter_add(a, idx, v):
        np.add.at(a._a, _unwrap(idx), _unwrap(v))
    cpx.scatter_add = scatter_add
    return cp, cpx


def install(monkeypatch):
    """Make ``import cupy`` give the fake for the duration of one test; returns the module."""
    cp, cpx = make_module()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cpx)
    return cp
