"""CPU neuron skipping with Numba: read only the rows of W_up and W_down of active neurons.

Batch-1 decoding is memory bound (the time is the bytes of weights read), so the kernels
are organised around passes over memory:

1. **gate pass** (``_gate_pass``): stream W_gate four rows at a time (rows split over
   threads, ``prange``), ``g = x . w_gate[f]`` for every token, ``a = act_gate(g)``, and
   mark f active when ``|a| > threshold`` for any token (the union over tokens). Four
   rows per pass keep four memory streams in flight per core: with one, the pass read at
   ~60% of BLAS's rate on an Intel Xeon; with four it times like BLAS's GEMV.
2. **up/down pass** (``_up_down_pass``): the active list is cut into chunks, one per
   thread-task; each task reads ``w_up[f]`` and ``w_down[f]`` of its neurons only (four
   neurons per pass: four up dot products per read of x, ``p += h0 r0 + .. + h3 r3``) and
   accumulates ``h_tf * w_down[f]`` into its *own* partial output (T, D): no two threads
   write the same memory, so there are no races and no atomics. The partials are summed.
3. with ``active`` given (a predictor), one fused pass (``_predicted_pass``) reads
   ``w_gate[f]``, ``w_up[f]`` and ``w_down[f]`` of the chosen neurons only.

With several tokens the union of active neurons can be large; when skipping would be
slower than BLAS on every row, the up and down projections run dense through NumPy
(``stats["path"] == "dense"``); the result is the same function either way.

Ideal speed-up at batch 1 with a fraction ``a`` of neurons active: ``3 / (1 + 2a)`` without
a predictor (the gate stays dense), ``1 / a`` with one (``bench/README.md``).

Dimension keys: T tokens, D model dim, F ffn neurons, A active neurons, C chunks.
"""
from __future__ import annotations

import math

import numpy as np

from ..activations import Activation
from .base import GATE_KINDS, UP_KINDS, activation_codes, keep_mask  # noqa: F401  (the shared codes)

NAME = "numba"
WEIGHT_DTYPES = (np.float32, np.float64)

try:  # the optional dependency, imported when the backend is asked for
    import numba
    from numba import njit, prange
except ImportError as _e:  # pragma: no cover - exercised through the registry tests
    numba = None
    _IMPORT_ERROR = _e

    def check_usable() -> None:
        raise ImportError(f"numba is not installed ({_IMPORT_ERROR})")
else:
    def check_usable() -> None:
        """Numba imported: usable."""

    from ..runtime import configure_numba
    configure_numba()              # start Numba's threads with passive OpenMP waiting (runtime.py)

# reassociation lets LLVM vectorise the dot products; no 'nnan'/'ninf', so NaN and inf
# still propagate as in the reference
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# skipping is slower than dense BLAS once the union of active neurons over T tokens
# exceeds this fraction (measured with bench/ffn_sparse.py on 2 cores; see bench/README.md)
_DENSE_ABOVE = ((1, 0.70), (4, 0.55), (16, 0.35), (64, 0.2))
_BLAS_GATE_FROM_T = 8          # from this many tokens, the gate is one BLAS GEMM
# batch 1: the dense gate GEMV by BLAS ("blas") or by the numba pass ("numba", four rows
# at a time). Side by side on the loaded 2-core Xeon (seven runs, bench/README.md) they are
# within noise overall (medians 2.09x vs 2.02x over dense). On the H200 host's 16-core
# Xeon (quiet, bench/results/h200_targets/ffn_sparse_cpu_targets_h200host.log) the numba
# pass skips at 3.76x over dense NumPy and the BLAS gate at 1.50x (the BLAS call and the
# numba pass that follows it hand the cores back and forth); at 0% sparsity they tie
# (0.91x / 0.92x). So the numba pass is the default.
GATE_ONE_TOKEN = "numba"
_PARALLEL_FROM = 1 << 20       # weights (x tokens) a pass must stream before threads are used


def _dense_above(T: int) -> float:
    for t, frac in _DENSE_ABOVE:
        if T <= t:
            return frac
    return 0.1


if numba is not None:
    # ----------------------------------------------------------------------------------
    # scalar activation (float64 inside; cast back when stored)
    # ----------------------------------------------------------------------------------
    @njit(cache=True, inline="always")
    def _act(v, kind, thr):
        v = float(v)
        if kind == 0:                                   # relu: v if v > 0; FATReLU: v if v >= thr
            # NaN: np.maximum (relu) propagates it, np.where (FATReLU) gives 0; mirror both
            if thr > 0.0:
                return v if v >= thr else 0.0
            return v if (v > 0.0 or v != v) else 0.0
        elif kind == 1:                                 # relu^2 (NaN propagates)
            r = 0.0 if v <= 0.0 else v
            return r * r
        elif kind == 2:                                 # silu = v * sigmoid(v)
            if v >= 0.0:
                return v / (1.0 + math.exp(-v))
            e = math.exp(v)
            return v * e / (1.0 + e)
        elif kind == 3:                                 # exact gelu
            return 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))
        elif kind == 4:                                 # tanh-approximate gelu
            return 0.5 * v * (1.0 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
        return v                                        # identity

    @njit(cache=True, fastmath=_FASTMATH, inline="always")
    def _dot(a, b, zero):
        s = zero
        for d in range(a.shape[0]):
            s += a[d] * b[d]
        return s

    @njit(cache=True, fastmath=_FASTMATH, inline="always")
    def _dot4(xt, r0, r1, r2, r3, zero):
        """Four dot products in one pass over x: four weight streams in flight at once (one
        stream per core reads at ~60% of the memory rate on Intel Xeons; four reach it)."""
        s0 = s1 = s2 = s3 = zero
        for d in range(xt.shape[0]):
            v = xt[d]
            s0 += v * r0[d]
            s1 += v * r1[d]
            s2 += v * r2[d]
            s3 += v * r3[d]
        return s0, s1, s2, s3

    @njit(cache=True, fastmath=_FASTMATH, inline="always")
    def _axpy4(pt, hv, r0, r1, r2, r3):
        """pt += hv[0] r0 + hv[1] r1 + hv[2] r2 + hv[3] r3: four rows per pass over pt."""
        h0, h1, h2, h3 = hv[0], hv[1], hv[2], hv[3]
        for d in range(pt.shape[0]):
            pt[d] += h0 * r0[d] + h1 * r1[d] + h2 * r2[d] + h3 * r3[d]

    # ----------------------------------------------------------------------------------
    # row kernels (inlined into the parallel and the serial drivers below); rows in blocks
    # of four, the remainder one by one
    # ----------------------------------------------------------------------------------
    @njit(cache=True, fastmath=_FASTMATH, inline="always")
    def _keep(a, skip_thr):
        return not (abs(a) <= skip_thr)                                 # NaN counts as active

    @njit(cache=True, fastmath=_FASTMATH, inline="always")
    def _gate_rows(x, wg, lo, hi, kind, act_thr, skip_thr, a_out, any_out, zero):
        """Rows lo..hi of W_gate: a (T, F) and the union mask (F,)."""
        T = x.shape[0]
        f = lo
        while f + 4 <= hi:
            h0 = h1 = h2 = h3 = False
            for t in range(T):
                s0, s1, s2, s3 = _dot4(x[t], wg[f], wg[f + 1], wg[f + 2], wg[f + 3], zero)
                a0, a1 = _act(s0, kind, act_thr), _act(s1, kind, act_thr)
                a2, a3 = _act(s2, kind, act_thr), _act(s3, kind, act_thr)
                a_out[t, f], a_out[t, f + 1], a_out[t, f + 2], a_out[t, f + 3] = a0, a1, a2, a3
                h0 |= _keep(a0, skip_thr)
                h1 |= _keep(a1, skip_thr)
                h2 |= _keep(a2, skip_thr)
                h3 |= _keep(a3, skip_thr)
            any_out[f], any_out[f + 1], any_out[f + 2], any_out[f + 3] = h0, h1, h2, h3
            f += 4
        for f in range(f, hi):
            row = wg[f]                                                 # (D,)
            hit = False
            for t in range(T):
                a = _act(_dot(x[t], row, zero), kind, act_thr)
                a_out[t, f] = a
                hit |= _keep(a, skip_thr)
            any_out[f] = hit

    @njit(cache=True, fastmath=_FASTMATH, inline="always")
    def _h4(hv, a0, a1, a2, a3, u0, u1, u2, u3, gated, up_kind, act_thr, skip_thr):
        """hv[i] = a_i * b(u_i) (or a_i) where neuron i is kept for this token, else 0;
        stored in the array dtype, so the axpy that follows runs in it."""
        if gated:
            hv[0] = a0 * _act(u0, up_kind, act_thr) if _keep(a0, skip_thr) else 0.0
            hv[1] = a1 * _act(u1, up_kind, act_thr) if _keep(a1, skip_thr) else 0.0
            hv[2] = a2 * _act(u2, up_kind, act_thr) if _keep(a2, skip_thr) else 0.0
            hv[3] = a3 * _act(u3, up_kind, act_thr) if _keep(a3, skip_thr) else 0.0
        else:
            hv[0] = a0 if _keep(a0, skip_thr) else 0.0
            hv[1] = a1 if _keep(a1, skip_thr) else 0.0
            hv[2] = a2 if _keep(a2, skip_thr) else 0.0
            hv[3] = a3 if _keep(a3, skip_thr) else 0.0

    @njit(cache=True, fastmath=_FASTMATH, inline="always")
    def _up_down_rows(x, a_all, wu, wd, idx, lo, hi, gated, up_kind, act_thr, skip_thr, p, hv, zero):
        """Active slots lo..hi: p (T, D) += h_tf * w_down[f], reading w_up[f], w_down[f] only."""
        T, D = x.shape
        for t in range(T):
            for d in range(D):
                p[t, d] = zero
        j = lo
        while j + 4 <= hi:
            f0, f1, f2, f3 = idx[j], idx[j + 1], idx[j + 2], idx[j + 3]
            for t in range(T):
                u0 = u1 = u2 = u3 = zero
                if gated:
                    u0, u1, u2, u3 = _dot4(x[t], wu[f0], wu[f1], wu[f2], wu[f3], zero)
                _h4(hv, a_all[t, f0], a_all[t, f1], a_all[t, f2], a_all[t, f3], u0, u1, u2, u3, gated, up_kind,
                    act_thr, skip_thr)
                _axpy4(p[t], hv, wd[f0], wd[f1], wd[f2], wd[f3])
            j += 4
        for j in range(j, hi):
            f = idx[j]
            for t in range(T):
                a = a_all[t, f]
                if abs(a) <= skip_thr:                                  # this token skips neuron f
                    continue
                if gated:
                    hv[0] = a * _act(_dot(x[t], wu[f], zero), up_kind, act_thr)
                else:
                    hv[0] = a
                h = hv[0]                                               # in the array dtype
                pt = p[t]
                row = wd[f]
                for d in range(D):                                      # axpy: p[t] += h * w_down[f]
                    pt[d] += h * row[d]

    @njit(cache=True, fastmath=_FASTMATH, inline="always")
    def _predicted_rows(x, wg, wu, wd, idx, lo, hi, gate_kind, gated, up_kind, act_thr, skip_thr, p, hv, zero):
        """Chosen neurons lo..hi: gate, up and down of those rows only."""
        T, D = x.shape
        for t in range(T):
            for d in range(D):
                p[t, d] = zero
        j = lo
        while j + 4 <= hi:
            f0, f1, f2, f3 = idx[j], idx[j + 1], idx[j + 2], idx[j + 3]
            for t in range(T):
                g0, g1, g2, g3 = _dot4(x[t], wg[f0], wg[f1], wg[f2], wg[f3], zero)
                u0 = u1 = u2 = u3 = zero
                if gated:
                    u0, u1, u2, u3 = _dot4(x[t], wu[f0], wu[f1], wu[f2], wu[f3], zero)
                _h4(hv, _act(g0, gate_kind, act_thr), _act(g1, gate_kind, act_thr), _act(g2, gate_kind, act_thr),
                    _act(g3, gate_kind, act_thr), u0, u1, u2, u3, gated, up_kind, act_thr, skip_thr)
                _axpy4(p[t], hv, wd[f0], wd[f1], wd[f2], wd[f3])
            j += 4
        for j in range(j, hi):
            f = idx[j]
            for t in range(T):
                a = _act(_dot(x[t], wg[f], zero), gate_kind, act_thr)
                if abs(a) <= skip_thr:
                    continue
                if gated:
                    hv[0] = a * _act(_dot(x[t], wu[f], zero), up_kind, act_thr)
                else:
                    hv[0] = a
                h = hv[0]
                pt = p[t]
                row = wd[f]
                for d in range(D):
                    pt[d] += h * row[d]

    # ----------------------------------------------------------------------------------
    # 1. gate: stream W_gate once, rows split into C contiguous chunks over the threads
    # ----------------------------------------------------------------------------------
    @njit(parallel=True, cache=True, fastmath=_FASTMATH)
    def _gate_pass(x, wg, kind, act_thr, skip_thr, a_out, any_out, zero, C):
        F = wg.shape[0]
        for c in prange(C):
            _gate_rows(x, wg, c * F // C, (c + 1) * F // C, kind, act_thr, skip_thr, a_out, any_out, zero)

    @njit(cache=True, fastmath=_FASTMATH)
    def _gate_pass_serial(x, wg, kind, act_thr, skip_thr, a_out, any_out, zero, C):
        _gate_rows(x, wg, 0, wg.shape[0], kind, act_thr, skip_thr, a_out, any_out, zero)

    @njit(cache=True, fastmath=_FASTMATH)
    def _act_pass(g, kind, act_thr, skip_thr, a_out, any_out):
        """Activation and union mask from a precomputed gate g (T, F) (BLAS gate path)."""
        T, F = g.shape
        for f in range(F):
            hit = False
            for t in range(T):
                a = _act(g[t, f], kind, act_thr)
                a_out[t, f] = a
                if not (abs(a) <= skip_thr):
                    hit = True
            any_out[f] = hit

    # ----------------------------------------------------------------------------------
    # 2. up and down for the active rows; each task its own partial output (no races)
    # ----------------------------------------------------------------------------------
    @njit(parallel=True, cache=True, fastmath=_FASTMATH)
    def _up_down_pass(x, a_all, wu, wd, idx, gated, up_kind, act_thr, skip_thr, part, zero):
        C = part.shape[0]
        n = idx.shape[0]
        for c in prange(C):
            hv = np.empty(4, dtype=part.dtype)                          # h cast to the array dtype
            _up_down_rows(x, a_all, wu, wd, idx, c * n // C, (c + 1) * n // C, gated, up_kind, act_thr,
                          skip_thr, part[c], hv, zero)

    @njit(cache=True, fastmath=_FASTMATH)
    def _up_down_pass_serial(x, a_all, wu, wd, idx, gated, up_kind, act_thr, skip_thr, part, zero):
        hv = np.empty(4, dtype=part.dtype)
        _up_down_rows(x, a_all, wu, wd, idx, 0, idx.shape[0], gated, up_kind, act_thr, skip_thr, part[0], hv, zero)

    # ----------------------------------------------------------------------------------
    # 3. predicted neurons: gate, up and down of the chosen rows only, one fused pass
    # ----------------------------------------------------------------------------------
    @njit(parallel=True, cache=True, fastmath=_FASTMATH)
    def _predicted_pass(x, wg, wu, wd, idx, gate_kind, gated, up_kind, act_thr, skip_thr, part, zero):
        C = part.shape[0]
        n = idx.shape[0]
        for c in prange(C):
            hv = np.empty(4, dtype=part.dtype)
            _predicted_rows(x, wg, wu, wd, idx, c * n // C, (c + 1) * n // C, gate_kind, gated, up_kind,
                            act_thr, skip_thr, part[c], hv, zero)

    @njit(cache=True, fastmath=_FASTMATH)
    def _predicted_pass_serial(x, wg, wu, wd, idx, gate_kind, gated, up_kind, act_thr, skip_thr, part, zero):
        hv = np.empty(4, dtype=part.dtype)
        _predicted_rows(x, wg, wu, wd, idx, 0, idx.shape[0], gate_kind, gated, up_kind, act_thr, skip_thr,
                        part[0], hv, zero)

    @njit(cache=True, fastmath=_FASTMATH)
    def _sum_parts(part, out):
        C, T, D = part.shape
        for t in range(T):
            for d in range(D):
                s = part[0, t, d]
                for c in range(1, C):
                    s += part[c, t, d]
                out[t, d] = s


def _n_chunks(n_rows: int, parallel: bool) -> int:
    """Tasks of a pass: one per thread and a few more (so that a thread descheduled by
    other processes on a busy machine delays less of the work); 1 when serial."""
    if not parallel:
        return 1
    return max(1, min(4 * numba.get_num_threads(), n_rows))


def _c(a):
    return np.ascontiguousarray(a)


def ffn(x, w_gate, w_up, w_down, act: Activation, *, active=None, threshold=None, stats=None):
    """Numba FFN on x (T, D) -> y (T, D); same function as :func:`numpy_.ffn`."""
    if stats is None:
        stats = {}
    gk, uk, act_thr = activation_codes(act, NAME)      # raises for custom activations
    x, w_gate, w_down = _c(x), _c(w_gate), _c(w_down)
    w_up = _c(w_up) if w_up is not None else w_gate                    # placeholder when plain
    T, D = x.shape
    F = w_gate.shape[0]
    dt = x.dtype
    zero = dt.type(0)
    skip = 0.0 if threshold is None else float(threshold)
    gated = bool(act.gated)
    # threads pay off only when a pass streams enough bytes to hide the fork/join
    parallel = F * D * T >= _PARALLEL_FROM and numba.get_num_threads() > 1

    if active is not None:                                            # predictor: fused pass over chosen rows
        idx = np.ascontiguousarray(active, dtype=np.int64)            # (A,)
        par = parallel and idx.size * D * T * 3 >= _PARALLEL_FROM
        part = np.empty((_n_chunks(idx.size, par), T, D), dtype=dt)   # (C, T, D)
        (_predicted_pass if par else _predicted_pass_serial)(x, w_gate, w_up, w_down, idx, gk, gated, uk,
                                                             act_thr, skip, part, zero)
        if part.shape[0] == 1:
            y = part[0]
        else:
            y = np.empty((T, D), dtype=dt)
            _sum_parts(part, y)
        stats.update(path="sparse", n_active=int(idx.size), gate="numba", threads=part.shape[0] > 1)
        return y

    if not act.exact_zeros and threshold is None:                     # nothing to skip: BLAS
        g = x @ w_gate.T                                              # (T, F)
        u = x @ w_up.T if gated else None                             # (T, F)
        stats.update(path="dense", n_active=F, gate="blas")
        return act.forward(g, u) @ w_down                             # (T, D)

    # 1. gate (numba GEMV for few tokens, BLAS GEMM for many) + union of active neurons
    a_all = np.empty((T, F), dtype=dt)                                # (T, F)
    hit = np.empty(F, dtype=np.bool_)                                 # (F,)
    if T >= _BLAS_GATE_FROM_T or (T == 1 and GATE_ONE_TOKEN == "blas"):
        g = (w_gate @ x[0])[None] if T == 1 else x @ w_gate.T         # (T, F) one BLAS GEMV / GEMM
        _act_pass(_c(g), gk, act_thr, skip, a_all, hit)
        gate_how = "blas"
    else:
        (_gate_pass if parallel else _gate_pass_serial)(x, w_gate, gk, act_thr, skip, a_all, hit, zero,
                                                        _n_chunks(F, parallel))
        gate_how = "numba"
    idx = np.flatnonzero(hit)                                         # (A,) union over tokens
    n = int(idx.size)
    stats.update(n_active=n, gate=gate_how)

    if n > _dense_above(T) * F:
        # 2'. most rows are needed by some token: dense BLAS for up and down is faster
        m = keep_mask(a_all, threshold)                               # (T, F)
        if gated:
            u = x @ w_up.T                                            # (T, F)
            h = np.where(m, a_all * act.up_fn(u), 0).astype(dt, copy=False)  # (T, F)
        else:
            h = np.where(m, a_all, 0).astype(dt, copy=False)          # (T, F)
        stats["path"] = "dense"
        return h @ w_down                                             # (T, D)

    # 2. up and down for the active rows only
    par = parallel and n * D * T * 2 >= _PARALLEL_FROM
    part = np.empty((_n_chunks(n, par), T, D), dtype=dt)              # (C, T, D)
    (_up_down_pass if par else _up_down_pass_serial)(x, a_all, w_up, w_down, idx.astype(np.int64), gated, uk,
                                                     act_thr, skip, part, zero)
    if part.shape[0] == 1:
        y = part[0]                                                   # (T, D)
    else:
        y = np.empty((T, D), dtype=dt)                                # (T, D)
        _sum_parts(part, y)
    stats.update(path="sparse", threads=par)
    return y
