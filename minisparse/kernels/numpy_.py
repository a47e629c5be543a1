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

from typing import Optional

import numpy as np

from ..activations import Activation

NAME = "numpy"
# float16 weights are computed in float32 (the GPU backend's format); x may be float32 then.
WEIGHT_DTYPES = (np.float16, np.float32, np.float64)


def check_usable() -> None:
    """NumPy is always usable."""


# ======================================================================================
# input validation, shared by every backend (called by minisparse.kernels.sparse_ffn)
# ======================================================================================
def _is_device_array(a) -> bool:
    return hasattr(a, "__cuda_array_interface__")


def _as_array(a, name: str, device_ok: bool):
    if a is None:
        return None
    if _is_device_array(a):
        if not device_ok:
            raise TypeError(f"{name} is a GPU (CuPy) array; this backend runs on the CPU: pass a NumPy "
                            f"array ({name}.get()) or use backend='cupy'")
        return a
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    return a


def check_inputs(x, w_gate, w_up, w_down, act: Activation, *, active=None, threshold=None,
                 weight_dtypes=WEIGHT_DTYPES, backend: str = NAME) -> dict:
    """Validate the arguments of ``sparse_ffn``; return normalised pieces.

    Returns a dict with ``x2`` (T, D), ``x_shape``, ``T``, ``D``, ``F``, the weights,
    ``active`` (None, a sorted unique int64 index array, or for the GPU backend a device
    array passed through) and ``threshold`` (None or a float >= 0).
    Raises ValueError / TypeError saying what was wrong and how to fix it.
    """
    device_ok = backend == "cupy"
    x = _as_array(x, "x", device_ok)
    w_gate = _as_array(w_gate, "w_gate", device_ok)
    w_up = _as_array(w_up, "w_up", device_ok)
    w_down = _as_array(w_down, "w_down", device_ok)
    if w_gate is None or w_down is None:
        raise TypeError("w_gate and w_down are required arrays of shape (ffn_dim, dim)")
    # activation <-> w_up
    if act.gated and w_up is None:
        raise ValueError(f"activation {act.name!r} is gated (h = a(x W_gate^T) * b(x W_up^T)): pass w_up "
                         f"of shape (ffn_dim, dim), or use a plain activation such as 'relu'")
    if not act.gated and w_up is not None:
        raise ValueError(f"activation {act.name!r} is plain (h = f(x W_gate^T)) and takes no w_up: pass "
                         f"w_up=None, or use a gated activation such as 'reglu' or 'drelu'")
    # shapes
    if x.ndim not in (1, 2):
        raise ValueError(f"x must be (dim,) or (tokens, dim), got shape {tuple(x.shape)}; "
                         "flatten batch and time first: x.reshape(-1, dim)")
    D = int(x.shape[-1])
    if w_gate.ndim != 2:
        raise ValueError(f"w_gate must be 2-D (ffn_dim, dim), got shape {tuple(w_gate.shape)}")
    F = int(w_gate.shape[0])
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w is None:
            continue
        if w.ndim != 2 or tuple(w.shape) != (F, D):
            hint = ""
            if w.ndim == 2 and tuple(w.shape) == (D, F):
                hint = f" It looks transposed: weights are neuron-major (row f = neuron f); pass {name}.T"
            elif w.ndim == 2 and w.shape[1] != D:
                hint = f" Its second axis ({w.shape[1]}) must equal x's last axis (dim={D})."
            raise ValueError(f"{name} must have shape (ffn_dim, dim) = ({F}, {D}) to match w_gate "
                             f"{tuple(w_gate.shape)} and x {tuple(x.shape)}, got {tuple(w.shape)}.{hint}")
    if D < 1 or F < 1:
        raise ValueError(f"dim and ffn_dim must be >= 1, got dim={D}, ffn_dim={F}")
    # dtypes
    wdt = np.dtype(w_gate.dtype)
    for name, w in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w is not None and np.dtype(w.dtype).kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {w.dtype}; cast it, e.g. "
                            f"{name}.astype(np.float32)")
    for name, w in (("w_up", w_up), ("w_down", w_down)):
        if w is not None and np.dtype(w.dtype) != wdt:
            raise TypeError(f"weights mix dtypes: w_gate is {wdt}, {name} is {w.dtype}; cast them to one")
    if wdt not in [np.dtype(d) for d in weight_dtypes]:
        raise TypeError(f"backend {backend!r} supports weights of dtype "
                        f"{', '.join(np.dtype(d).name for d in weight_dtypes)}, got {wdt}")
    xdt = np.dtype(x.dtype)
    if xdt != wdt and not (wdt == np.float16 and xdt == np.float32):
        raise TypeError(f"x is {xdt} but the weights are {wdt}; cast x to {wdt} "
                        "(only float16 weights accept float32 x)")
    # threshold
    if threshold is not None:
        threshold = float(threshold)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (skip neurons with |a(g)| <= threshold), got {threshold}")
    # active
    if active is not None:
        active = _check_active(active, F, device_ok)
    x2 = x.reshape(1, D) if x.ndim == 1 else x                       # (T, D)
    return dict(x2=x2, x_shape=tuple(x.shape), T=int(x2.shape[0]), D=D, F=F, w_gate=w_gate, w_up=w_up,
                w_down=w_down, active=active, threshold=threshold)


def _check_active(active, F: int, device_ok: bool):
    """An index array or a boolean mask of length F -> sorted unique int64 indices (host)."""
    if _is_device_array(active):
        if not device_ok:
            raise TypeError("active is a GPU (CuPy) array; pass a NumPy array on the CPU backends")
        if active.ndim != 1:
            raise ValueError(f"active must be 1-D (indices or a mask of length ffn_dim), got shape {active.shape}")
        kind = np.dtype(active.dtype).kind
        if kind == "b" and active.shape[0] != F:
            raise ValueError(f"boolean active mask has length {active.shape[0]}, expected ffn_dim={F}")
        if kind not in "biu":
            raise TypeError(f"active must be integer indices or a boolean mask, got dtype {active.dtype}")
        return active                                                 # the GPU backend checks the rest
    a = np.asarray(active)
    if a.ndim != 1:
        raise ValueError(f"active must be 1-D (indices or a mask of length ffn_dim), got shape {a.shape}")
    if a.dtype == bool:
        if a.shape[0] != F:
            raise ValueError(f"boolean active mask has length {a.shape[0]}, expected ffn_dim={F}")
        return np.flatnonzero(a).astype(np.int64)                     # (A,)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"active must be integer indices or a boolean mask, got dtype {a.dtype}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= F:
        raise ValueError(f"active indices must lie in [0, ffn_dim={F}), got values from {lo} to {hi}")
    return np.unique(a).astype(np.int64)                              # (A,) sorted, no repeats


# ======================================================================================
# the reference
# ======================================================================================
def keep_mask(a: np.ndarray, threshold: Optional[float]) -> np.ndarray:
    """m = not(|a| <= threshold): the neurons that count (NaN counts, so it propagates)."""
    t = 0.0 if threshold is None else threshold
    return ~(np.abs(a) <= t)


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
