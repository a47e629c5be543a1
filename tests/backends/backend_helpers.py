"""Shared helpers of the backend tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import numpy as np
import pytest

from minisparse.activations import get_activation
from minisparse.kernels import get_backend, registered_backends

# every gated activation of the registry's ReLU and GLU families, plus plain relu
ACTIVATIONS = ["swiglu", "geglu", "geglu_tanh", "reglu", "drelu", "relu2glu", "relu"]
EXACT = ["reglu", "drelu", "relu2glu", "relu"]           # gate-decided exact zeros

# relative tolerance, against a bound on the size of every term (see `check`)
RTOL = {np.dtype(np.float16): 3e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def backend_params():
    """pytest params for every registered backend; GPU ones carry the gpu marker."""
    return [pytest.param(b, marks=[pytest.mark.gpu] if b == "cupy" else [], id=b)
            for b in registered_backends()]


def require(backend: str):
    """Skip (never pass) when a backend cannot run here."""
    try:
        return get_backend(backend)
    except ImportError as e:
        pytest.skip(str(e))


def to_numpy(a):
    return a.get() if hasattr(a, "__cuda_array_interface__") else np.asarray(a)


def truth(x, w_gate, w_up, w_down, activation, *, active=None, threshold=None):
    """float64 dense FFN with the masking semantics of sparse_ffn, and the error scale.

    Returns (y, scale): scale (T, D) bounds the magnitude of every term that enters y, so
    |y_backend - y| <= rtol * scale is a rounding-level check, independent of cancellation.
    """
    act = get_activation(activation)
    x = np.asarray(x, dtype=np.float64)
    wg, wd = np.asarray(w_gate, np.float64), np.asarray(w_down, np.float64)
    g = x @ wg.T                                                      # (T, F)
    a = act.gate_fn(g)                                                # (T, F)
    t = 0.0 if threshold is None else threshold
    m = ~(np.abs(a) <= t)                                             # (T, F)
    if active is not None:
        sel = np.zeros(wg.shape[0], dtype=bool)
        sel[np.asarray(active)] = True
        m &= sel[None, :]
    G = np.abs(x) @ np.abs(wg).T                                      # (T, F) bound on |g|
    if act.gated:
        wu = np.asarray(w_up, np.float64)
        u = x @ wu.T
        h = np.where(m, a * act.up_fn(u), 0.0)
        U = np.abs(x) @ np.abs(wu).T
        H = (G + G * G) * (U + 1.0)
    else:
        h = np.where(m, a, 0.0)
        H = G + G * G
    return h @ wd, H @ np.abs(wd) + 1e-30


def check(actual, x, w_gate, w_up, w_down, activation, dtype, what="", **kw):
    """Assert actual == truth within rtol(dtype) * scale; print the first mismatches."""
    y, scale = truth(x, w_gate, w_up, w_down, activation, **kw)
    actual = to_numpy(actual).astype(np.float64).reshape(y.shape)
    rtol = RTOL[np.dtype(dtype)]
    bad = ~(np.abs(actual - y) <= rtol * scale)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        lines = [f"  at {tuple(int(v) for v in i)}: got {actual[tuple(i)]!r}, want {y[tuple(i)]!r} "
                 f"(allowed +-{rtol * scale[tuple(i)]:.3g})" for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.size} elements differ (rtol={rtol} x scale)\n"
                    + "\n".join(lines))
