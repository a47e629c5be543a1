"""Fused element-wise passes of the SwiGLU forward and backward (Numba, CPU, optional).

:func:`minisparse.layers.ffn_forward` and :func:`~minisparse.layers.ffn_backward` compute
SiLU-gated activations in NumPy as a chain of whole-array passes (``e += 1; a = g / e;
h = a * b`` forward, six passes backward); each pass reads and writes the (N, F) arrays
through memory, and on a training batch those arrays are several MB. The kernels here do
each chain in one pass, with the same operations in the same order in the same dtype, so
the results are the NumPy expressions' bit for bit (``tests/test_fused_swiglu.py``):

* no ``fastmath`` (no reassociation, no contraction into FMA), ``error_model="numpy"``
  (a division by zero gives inf/nan as in NumPy, instead of a ZeroDivisionError check that
  also stops LLVM from vectorising the loop);
* the constant 1 is passed in the arrays' dtype (a Python ``1`` in Numba would promote a
  float32 expression to float64 and round differently);
* ``exp`` stays NumPy's (its SIMD exp is fast, and the same function on every path; LLVM
  would call the scalar libm ``exp``, slower and not the same bits).

The kernels are serial (``parallel=False``) and release the GIL (``nogil=True``): the
training step already runs its batch halves in two threads (``minisparse.train.run_parallel``),
and a kernel that started its own thread pool there would fight them.

Numba is imported on first use, never by ``import minisparse``; without Numba,
:func:`kernels` returns None and the layers run their NumPy expressions (the same bits).
Compiled code is cached on disk (``cache=True``, in ``__pycache__`` or Numba's user-wide
cache); where no cache directory is writable the kernels compile in memory, silently.
"""
from __future__ import annotations

import threading

import numpy as np

DTYPES = (np.float32, np.float64)

_KERNELS = None          # the (forward, backward) dispatchers once built; False when Numba is missing
_LOCK = threading.Lock()  # the two training threads may ask at the same time: build them once


def _py_swiglu_rest(g, b, e, a, h, one):
    """g, b, e (n,) -> e (n,) += 1 in place, a = g / e (n,), h = a * b (n,); all 1-D, one dtype.

    ``e`` holds exp(-g) on entry and 1 + exp(-g) = 1 / sigmoid(g) on return; a = silu(g)."""
    for i in range(g.size):
        ei = e[i] + one                                  # 1 + exp(-g)
        e[i] = ei
        ai = g[i] / ei                                   # silu(g) = g * sigmoid(g)
        a[i] = ai
        h[i] = ai * b[i]                                 # silu(g) * up(u)


def _py_swiglu_backward(dh, b, a, e, dg, one):
    """dh, b, a, e (n,) -> dg (n,) = dh * b * silu'(g), and dh (n,) overwritten with du = dh * a.

    silu'(g) = s + g s (1 - s) with s = 1 / e, written (1 - a) / e + a (a = g s)."""
    for i in range(dh.size):
        d = dh[i]
        ai = a[i]
        dg[i] = (d * b[i]) * ((one - ai) / e[i] + ai)    # dL/dg = dh * up(u) * silu'(g)
        dh[i] = d * ai                                   # dL/d up(u) = dh * silu(g), in place


def _jit(fn):
    from numba import njit
    opts = dict(nogil=True, error_model="numpy", fastmath=False, boundscheck=False)
    try:
        return njit(cache=True, **opts)(fn)
    except RuntimeError:     # no writable cache directory (a read-only install): compile in memory
        return njit(cache=False, **opts)(fn)


def kernels():
    """The compiled ``(forward, backward)`` pair, or None when Numba is not importable."""
    global _KERNELS
    if _KERNELS is None:
        with _LOCK:
            if _KERNELS is None:
                try:
                    import numba  # noqa: F401
                except ImportError:
                    _KERNELS = False
                else:
                    _KERNELS = (_jit(_py_swiglu_rest), _jit(_py_swiglu_backward))
    return _KERNELS or None


def _require():
    k = kernels()
    if k is None:
        raise ImportError("the fused SwiGLU kernels need Numba: pip install 'minisparse[numba]'")
    return k


def usable(*arrays) -> bool:
    """True when every array is a host ``np.ndarray``, C-contiguous, of one shape and one
    dtype in float32/float64 (the kernels' contract); device arrays (CuPy) are not."""
    first = arrays[0]
    for x in arrays:
        if type(x) is not np.ndarray or not x.flags.c_contiguous or x.shape != first.shape \
                or x.dtype != first.dtype:
            return False
    return first.dtype in DTYPES


def swiglu_rest(g, b, e) -> tuple:
    """Forward, after ``e = exp(-g)``: ``e += 1`` in place, and returns (a, h) with a = g / e
    = silu(g) and h = a * b, each (N, F) like g.

    Parameters
    ----------
    g : (N, F) gate pre-activation; b : (N, F) up(u); e : (N, F) exp(-g), updated in place.
    All host arrays, C-contiguous, one float dtype (:func:`usable`).
    """
    k = _require()
    a, h = np.empty_like(g), np.empty_like(g)                      # (N, F) each
    k[0](g.reshape(-1), b.reshape(-1), e.reshape(-1), a.reshape(-1), h.reshape(-1), g.dtype.type(1))
    return a, h


def swiglu_backward(dh, b, a, e) -> np.ndarray:
    """Backward: returns dg (N, F) = dh * b * ((1 - a) / e + a) and overwrites dh with
    du = dh * a (the gradient with respect to up(u)).

    Parameters
    ----------
    dh : (N, F) gradient of h, overwritten; b : (N, F) up(u); a : (N, F) silu(g);
    e : (N, F) 1 + exp(-g). All host arrays, C-contiguous, one float dtype (:func:`usable`).
    """
    k = _require()
    dg = np.empty_like(dh)                                         # (N, F)
    k[1](dh.reshape(-1), b.reshape(-1), a.reshape(-1), e.reshape(-1), dg.reshape(-1), dh.dtype.type(1))
    return dg
