"""Fused element-wise passes of the training step (Numba, CPU, optional): SwiGLU's
forward and backward lines here first; RMSNorm, AdamW and attention's causal mask at the end
(round 7, their own section).

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

_KERNELS = None          # {name: dispatcher} once built (_compiled); False when Numba is missing
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


def _jit(fn, fastmath=False):
    from numba import njit
    opts = dict(nogil=True, error_model="numpy", fastmath=fastmath, boundscheck=False)
    try:
        return njit(cache=True, **opts)(fn)
    except RuntimeError:     # no writable cache directory (a read-only install): compile in memory
        return njit(cache=False, **opts)(fn)


def _compiled():
    """Every kernel of this module by name (:data:`_FNS`), wrapped by Numba once (each compiles
    or loads from the cache at its first call), or None when Numba is not importable."""
    global _KERNELS
    if _KERNELS is None:
        with _LOCK:
            if _KERNELS is None:
                try:
                    import numba  # noqa: F401
                except ImportError:
                    _KERNELS = False
                else:
                    _KERNELS = {name: _jit(fn, fastmath=_REASSOC if name in _REASSOC_FNS else False)
                                for name, fn in _FNS.items()}
    return _KERNELS or None


def kernels():
    """The compiled SwiGLU ``(forward, backward)`` pair, or None when Numba is not importable."""
    k = _compiled()
    return None if k is None else (k["swiglu_rest"], k["swiglu_backward"])


def more_kernels():
    """The compiled round-7 kernels by name (``adamw``, ``rms_forward``, ``rms_backward``,
    ``mask_after``, ``attention_do1``, ``pairs``, ``relu_glu_forward``, ``relu_glu_backward``;
    with the SwiGLU pair), or None when Numba is not importable."""
    return _compiled()


def _require():
    k = _compiled()
    if k is None:
        raise ImportError("the fused kernels need Numba: pip install 'minisparse[numba]'")
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
    k["swiglu_rest"](g.reshape(-1), b.reshape(-1), e.reshape(-1), a.reshape(-1), h.reshape(-1), g.dtype.type(1))
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
    k["swiglu_backward"](dh.reshape(-1), b.reshape(-1), a.reshape(-1), e.reshape(-1), dg.reshape(-1), dh.dtype.type(1))
    return dg


# ======================================================================================
# round 7: RMSNorm, AdamW and attention's causal mask (issue 14, the training step)
# ======================================================================================
# Built on first use with the SwiGLU pair, in one table (_compiled; `kernels()` still gives
# the SwiGLU pair, `more_kernels()` the table). AdamW's pass is the NumPy lines' arithmetic, element by element
# in the same order and dtype: the same bits. RMSNorm's row sums of squares and dot products
# are summed in a different order than NumPy's einsum (which no loop can reproduce; its
# kernels may reassociate them into SIMD partial sums), so its results differ from the NumPy
# lines by rounding (tests/test_train_fast_paths.py bounds it).
# The mask loop writes the -inf entries np.copyto(where=...) writes: the same bits; attention
# backward's row constants D' = do' . out are summed in float64 (equal to einsum to rounding).



def _py_adamw(p, g, m, v, b1, c1, b2, c2, sqrt_bc2, eps, step_size, decay, decays):
    """One AdamW update of one parameter, in place; arrays 1-D, scalars in p's dtype.

    The NumPy lines of :meth:`minisparse.train.AdamW._update` per element, in their order:
    m = m*b1 + g*c1; v = v*b2 + (g*g)*c2; u = (m / ((sqrt(v) / sqrt_bc2) + eps)) * step_size;
    p = p*decay - u, where ``decays`` (p is decayed), else p = p - u."""
    for i in range(p.size):
        gi = g[i]
        mi = m[i] * b1 + gi * c1
        m[i] = mi
        vi = v[i] * b2 + (gi * gi) * c2
        v[i] = vi
        u = (mi / ((np.sqrt(vi) / sqrt_bc2) + eps)) * step_size
        pi = p[i] * decay if decays else p[i]
        p[i] = pi - u


def _py_rms_forward(x, scale, eps, dd, xhat, y, rstd):
    """x (N, D), scale (D,) -> xhat (N, D) = x * rstd, y (N, D) = xhat * scale, rstd (N,)
    = 1 / sqrt(sum(x^2) / D + eps) per row; ``eps`` and ``dd`` (= D) in the dtype.

    Compiled with ``fastmath={"reassoc"}`` (:data:`_REASSOC`): LLVM may reorder the row
    sums into SIMD partial sums (3x faster than one chain; another order than NumPy's
    einsum, so the results differ by rounding)."""
    N, D = x.shape
    one = dd / dd
    for n in range(N):
        ss = dd * 0
        for d in range(D):
            ss += x[n, d] * x[n, d]
        r = one / np.sqrt(ss / dd + eps)
        rstd[n] = r
        for j in range(D):
            xh = x[n, j] * r
            xhat[n, j] = xh
            y[n, j] = xh * scale[j]


def _py_rms_backward(dy, xhat, rstd, scale, dd, dx, dw):
    """dy, xhat (N, D), rstd (N,), scale (D,) -> dx (N, D) = rstd * (dxhat - xhat *
    mean(dxhat * xhat)) with dxhat = dy * scale (not stored), and dw (D,) float64 += the
    column sums of dy * xhat. ``fastmath={"reassoc"}`` as :func:`_py_rms_forward`."""
    N, D = dy.shape
    for n in range(N):
        s = dd * 0
        for d in range(D):
            s += (dy[n, d] * scale[d]) * xhat[n, d]
        mean = s / dd
        r = rstd[n]
        for j in range(D):
            dx[n, j] = (dy[n, j] * scale[j] - xhat[n, j] * mean) * r
            dw[j] += dy[n, j] * xhat[n, j]


def _py_mask_after(scores, tb, first, neg_inf):
    """scores (A, B, R, S): row r is query r % tb at position first + r % tb; every key
    j > that position gets ``neg_inf`` (the causal mask; the other entries untouched)."""
    A, B, R, S = scores.shape
    for a in range(A):
        for b in range(B):
            for r in range(R):
                for j in range(first + r % tb + 1, S):
                    scores[a, b, r, j] = neg_inf


def _py_relu_glu_forward(g, u, h, up_relu, zero):
    """g, u (n,) -> h = relu(g) * relu(u) (dReLU, ``up_relu``) or relu(g) * u (ReGLU); all
    1-D, one dtype. relu is np.maximum(x, 0): +0 for x <= 0 (-0 included), x for x > 0,
    a NaN passed on as it is."""
    for i in range(g.size):
        gi = g[i]
        ai = gi if (gi > zero or gi != gi) else zero
        ui = u[i]
        if up_relu:
            ui = ui if (ui > zero or ui != ui) else zero
        h[i] = ai * ui


def _py_relu_glu_backward(dh, g, u, dg, up_relu, one, zero):
    """dh, g, u (n,) -> dg = (dh * b) * (g > 0), and dh overwritten with du = (dh * a)
    [* (u > 0) when ``up_relu``], with a = relu(g), b = relu(u) or u recomputed; the masks
    as 1 or 0 in the dtype, as NumPy multiplies by a bool array."""
    for i in range(dh.size):
        d = dh[i]
        gi = g[i]
        ui = u[i]
        ai = gi if (gi > zero or gi != gi) else zero
        bi = ui
        if up_relu:
            bi = ui if (ui > zero or ui != ui) else zero
        dg[i] = (d * bi) * (one if gi > zero else zero)
        du = d * ai
        if up_relu:
            du = du * (one if ui > zero else zero)
        dh[i] = du


def _py_attention_do1(dout_t, l, out_t, do1):
    """dout_t, out_t (A, T, B, D) (dout, out with axes 1 and 2 swapped: training's layout
    makes them C-contiguous), l (A, B, T, 1) -> do1 (A, B, T, D+1) = [dout / l,
    -(dout / l) . out]; the dot product accumulated in float64, then rounded to the dtype."""
    A, T, B, D = dout_t.shape
    for a in range(A):
        for t in range(T):
            for b in range(B):
                r = l[a, b, t, 0]
                acc = np.float64(0.0)
                for d in range(D):
                    x = dout_t[a, t, b, d] / r
                    do1[a, b, t, d] = x
                    acc += np.float64(x) * np.float64(out_t[a, t, b, d])
                do1[a, b, t, D] = -acc


def _py_pairs(w, heads, out, inverse):
    """w (R, heads*Dh) -> out (R, heads*Dh), each head's columns reordered from the
    rotate-half layout [x_0 .. x_{h-1}, x_h .. x_{Dh-1}] (h = Dh/2) to adjacent pairs
    [x_0, x_h, x_1, x_{h+1}, ...]; ``inverse``: back. A copy, value for value."""
    R, n = w.shape
    dh = n // heads
    half = dh // 2
    for r in range(R):
        for hd in range(heads):
            o = hd * dh
            for i in range(half):
                if inverse:
                    out[r, o + i] = w[r, o + 2 * i]
                    out[r, o + half + i] = w[r, o + 2 * i + 1]
                else:
                    out[r, o + 2 * i] = w[r, o + i]
                    out[r, o + 2 * i + 1] = w[r, o + half + i]


_REASSOC = {"reassoc"}                       # the only fast-math flag, for the row sums of RMSNorm
_REASSOC_FNS = ("rms_forward", "rms_backward")
_FNS = {"swiglu_rest": _py_swiglu_rest, "swiglu_backward": _py_swiglu_backward,
        "adamw": _py_adamw, "pairs": _py_pairs, "attention_do1": _py_attention_do1,
        "rms_forward": _py_rms_forward, "rms_backward": _py_rms_backward, "mask_after": _py_mask_after,
        "relu_glu_forward": _py_relu_glu_forward, "relu_glu_backward": _py_relu_glu_backward}


def adamw_update(p, g, m, v, b1, b2, sqrt_bc2, eps, step_size, decay) -> None:
    """AdamW's update of one parameter in one pass, in place (p, m, v), bit for bit the NumPy
    lines of :meth:`minisparse.train.AdamW._update` (m, v: this parameter's moments).

    Parameters
    ----------
    p : (...) parameter, C-contiguous, float32/float64, updated in place.
    g : (...) its gradient, same shape and dtype (read only).
    m, v : (P,) first and second moments, same size and dtype, updated in place.
    b1, b2, sqrt_bc2, eps, step_size : Python floats (cast to p's dtype, as NumPy does).
    decay : float or None; p is multiplied by it first (1 - lr * weight_decay), None: not.
    """
    k = _require()["adamw"]
    t = p.dtype.type
    k(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), t(b1), t(1.0 - b1), t(b2), t(1.0 - b2),
      t(sqrt_bc2), t(eps), t(step_size), t(1.0 if decay is None else decay), decay is not None)


def rms_norm_forward(x, scale, eps: float):
    """RMSNorm forward in one pass: x (N, D), scale (D,) -> y (N, D), xhat (N, D), rstd (N, 1).

    Host arrays, x and scale C-contiguous of one float dtype (:func:`usable` for x)."""
    k = _require()["rms_forward"]
    N = x.shape[0]
    xhat, y = np.empty_like(x), np.empty_like(x)
    rstd = np.empty((N, 1), dtype=x.dtype)
    k(x, scale, x.dtype.type(eps), x.dtype.type(x.shape[1]), xhat, y, rstd.reshape(-1))
    return y, xhat, rstd


def rms_norm_backward(dy, xhat, rstd, scale):
    """RMSNorm backward in one pass: dy, xhat (N, D), rstd (N, 1), scale (D,) -> dx (N, D),
    dw (D,) (summed in float64, returned in the dtype)."""
    k = _require()["rms_backward"]
    dx = np.empty_like(dy)
    dw = np.zeros(dy.shape[1], dtype=np.float64)
    k(dy, xhat, rstd.reshape(-1), scale, dy.dtype.type(dy.shape[1]), dx, dw)
    return dx, dw.astype(dy.dtype)


def host_float(*arrays) -> bool:
    """True when every array is a host ``np.ndarray`` of one dtype in float32/float64 (any
    strides: :func:`mask_after` indexes them as they are)."""
    first = arrays[0]
    return all(type(x) is np.ndarray and x.dtype == first.dtype for x in arrays) and first.dtype in DTYPES


def attention_do1(dout, l, out, do1) -> None:
    """Attention backward's [do', -D'] in one pass: do1 (A, B, T, D+1) gets do' = dout / l in
    its first D columns (NumPy's division, the same bits) and -D' = -do' . out in the last
    (summed in float64: equal to NumPy's einsum to rounding). dout, out (A, B, T, D), l
    (A, B, T, 1), any strides, one float dtype (:func:`host_float`)."""
    _require()["attention_do1"](dout.transpose(0, 2, 1, 3), l, out.transpose(0, 2, 1, 3), do1)


def pairs(w, heads: int, inverse: bool = False):
    """:func:`minisparse.layers._to_pairs` (``inverse``: ``_from_pairs``) of a 2-D host array
    (R, heads*Dh) as one Numba loop: returns the reordered copy (the same values). (The
    layers use it one way only: NumPy's copy back is the faster, 0.06 against 0.10 ms for
    256 x 256 float32, where the forward's is 0.29 against 0.10.)"""
    out = np.empty(w.shape, dtype=w.dtype)
    _require()["pairs"](w, heads, out, inverse)
    return out


def mask_after(scores, tb: int, first: int) -> None:
    """The causal mask of a block of scores (A, B, rep*tb, S), in place: row r holds query
    r % tb at absolute position first + r % tb, and keys after it get -inf."""
    _require()["mask_after"](scores, tb, first, scores.dtype.type(-np.inf))


def relu_glu_forward(g, u, up_relu: bool):
    """ReLU-gated FFN forward in one pass: h (N, F) = relu(g) * relu(u) (dReLU, ``up_relu``)
    or relu(g) * u (ReGLU), the bits of ``np.maximum(g, 0) * np.maximum(u, 0)``; relu(g)
    and relu(u) are not kept (:func:`relu_glu_backward` recomputes them).

    Parameters
    ----------
    g, u : (N, F) gate and up pre-activations; host arrays, C-contiguous, one float dtype.
    """
    k = _require()["relu_glu_forward"]
    h = np.empty_like(g)
    k(g.reshape(-1), u.reshape(-1), h.reshape(-1), up_relu, g.dtype.type(0))
    return h


def relu_glu_backward(dh, g, u, up_relu: bool):
    """ReLU-gated FFN backward in one pass: returns dg (N, F) = dh * b * (g > 0) and
    overwrites dh with du = dh * a [* (u > 0) for dReLU], a = relu(g) and b = relu(u) (or u)
    recomputed from g, u; the bits of ffn_backward's NumPy lines.

    Parameters
    ----------
    dh : (N, F) gradient of h, overwritten; g, u : (N, F) pre-activations. Host arrays,
    C-contiguous, one float dtype.
    """
    k = _require()["relu_glu_backward"]
    dg = np.empty_like(dh)
    t = dh.dtype.type
    k(dh.reshape(-1), g.reshape(-1), u.reshape(-1), dg.reshape(-1), up_relu, t(1), t(0))
    return dg
