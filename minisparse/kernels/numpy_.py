"""The NumPy reference of :func:`minisparse.sparse_ffn`: the definition every backend is held to.

    y_t = sum_{f in S} m_tf * a(g_tf) * b(u_tf) * w_down[f]            (T, D)
    g = x @ w_gate.T,  u = x @ w_up.T                                    (T, F) each
    m_tf = not(|a(g_tf)| <= threshold)     (threshold 0 when None: "a(g) is not exactly 0")
    S = active if given, else the union over tokens of {f : m_tf}

``a`` is the activation's gate function and ``b`` its up function (drelu: relu, relu;
reglu: relu, identity; swiglu: silu, identity ...); plain activations have ``h = a(g)``.
For the ReLU family ``a(g) = 0`` exactly, so skipping those neurons changes nothing
(Deja Vu, Liu et al. 2023; TurboSparse, Song et al. 2024). A ``threshold`` on |a(g)| for
swiglu/geglu is CATS (Lee et al. 2024): an approximation, defined here per token.

Readable first: the gate is computed for every neuron (or only the ``active`` ones), then
the up and down projections only for the rows in S. The fast backends do the same with
fewer passes over memory.

Dimension keys: T tokens, D model dim, F ffn neurons, A active neurons.
"""
from __future__ import annotations

import numpy as np

from ..activations import Activation
from .base import REFERENCE_WEIGHT_DTYPES, check_inputs, keep_mask  # noqa: F401  (check_inputs: re-export)

NAME = "numpy"
# float16 weights are computed in float32 (the GPU backend's format); x may be float32 then.
WEIGHT_DTYPES = REFERENCE_WEIGHT_DTYPES


def check_usable() -> None:
    """NumPy is always usable."""


def ffn(x, w_gate, w_up, w_down, act: Activation, *, active=None, threshold=None, stats=None):
    """Reference FFN on x (T, D) -> y (T, D); see the module docstring for the definition."""
    if stats is None:
        stats = {}
    out_dtype = x.dtype
    if w_gate.dtype == np.float16:      # half weights: compute in float32, as the GPU does
        x, w_gate, w_down = x.astype(np.float32), w_gate.astype(np.float32), w_down.astype(np.float32)
        w_up = None if w_up is None else w_up.astype(np.float32)
    T, D = x.shape
    F = w_gate.shape[0]
    if active is None and not act.exact_zeros and threshold is None:
        # nothing can be skipped (swiglu/geglu without a threshold): the plain dense FFN
        g = x @ w_gate.T                                              # (T, F)
        u = x @ w_up.T if act.gated else None                         # (T, F)
        h = act.forward(g, u)                                         # (T, F)
        stats.update(path="dense", n_active=F)
        return (h @ w_down).astype(out_dtype, copy=False)             # (T, D)
    if active is None:
        g = x @ w_gate.T                                              # (T, F) every neuron's gate
        a = act.gate_fn(g)                                            # (T, F)
        m = keep_mask(a, threshold)                                   # (T, F)
        idx = np.flatnonzero(m.any(axis=0))                           # (A,) union over tokens
        a, m = a[:, idx], m[:, idx]                                   # (T, A)
    else:
        idx = active                                                  # (A,)
        g = x @ w_gate[idx].T                                         # (T, A) only the chosen gates
        a = act.gate_fn(g)                                            # (T, A)
        m = keep_mask(a, threshold)                                   # (T, A)
    if act.gated:
        u = x @ w_up[idx].T                                           # (T, A) only active rows of W_up
        h = np.where(m, a * act.up_fn(u), 0).astype(x.dtype, copy=False)  # (T, A)
    else:
        h = np.where(m, a, 0).astype(x.dtype, copy=False)             # (T, A)
    y = h @ w_down[idx]                                               # (T, D) only active rows of W_down
    stats.update(path="sparse", n_active=int(idx.size))
    return y.astype(out_dtype, copy=False)
