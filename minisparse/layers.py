"""The equations of the decoder, one pure function each, forward and backward side by side.

Every ``*_forward`` returns ``(out, cache)`` where ``cache`` holds exactly what the matching
``*_backward`` needs; every ``*_backward`` takes ``(dout, cache)`` and returns the gradients
of the inputs and parameters. No hidden state.

Dimension key: B batch, T time (queries), S time (keys, S >= T with a KV cache), D dim,
H query heads, K kv heads, Dh head dim, F ffn neurons, V vocab, N = B*T tokens.

Papers: RMSNorm (Zhang & Sennrich 2019); rotary embeddings (Su et al. 2021, RoFormer), in
the "rotate-half" layout Hugging Face's Llama uses; grouped-query attention (Ainslie et al.
2023); gated FFNs (Shazeer 2020); dReLU (Song et al. 2024, TurboSparse).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from . import _fused
from .activations import Activation, relu, relu_grad, silu
from .xp import add_at, array_module

Array = np.ndarray


# ======================================================================================
# weight gradients that may be queued
# ======================================================================================
class Deferred:
    """A weight gradient queued by a backward given ``defer`` (a list) instead of computed in
    place: nothing later in the backward reads it, so another thread may compute it
    (``run()``, then ``.value``). The same product either way, bit for bit."""

    __slots__ = ("fn", "value")

    def __init__(self, fn):
        self.fn, self.value = fn, None

    def run(self):
        self.value, self.fn = self.fn(), None
        return self.value


def _weight_grad(fn, defer: Optional[list]):
    """``fn()`` now (``defer`` None), or queued on ``defer`` as a :class:`Deferred`."""
    if defer is None:
        return fn()
    d = Deferred(fn)
    defer.append(d)
    return d


# ======================================================================================
# token embedding
# ======================================================================================
def embedding_forward(table: Array, tokens: Array) -> Array:
    """table (V, D), tokens (B, T) int -> (B, T, D)."""
    return table[tokens]                                            # (B, T, D)


def embedding_backward(dout: Array, tokens: Array, vocab_size: int) -> Array:
    """dout (B, T, D) -> d table (V, D); rows of repeated tokens accumulate."""
    xp = array_module(dout)                                         # numpy or cupy (minisparse.xp)
    D = dout.shape[-1]
    dtable = xp.zeros((vocab_size, D), dtype=dout.dtype)            # (V, D)
    # one scatter-add over flat element indices (token * D + column): the same sums as adding
    # whole rows, and NumPy's add.at is ~2.5x faster on 1-D indices
    idx = (tokens.reshape(-1, 1) * D + xp.arange(D)).reshape(-1)    # (B*T*D,)
    add_at(dtable.reshape(-1), idx, dout.reshape(-1))
    return dtable


# ======================================================================================
# RMSNorm:  y = x / sqrt(mean(x^2) + eps) * w      (Gemma: * (1 + w))
# ======================================================================================
# RMSNorm on host arrays runs its forward and backward as one Numba pass each
# (minisparse._fused; equal to the NumPy lines below up to rounding: the row sums are taken
# in another order). False: always the NumPy lines. Arrays smaller than FUSED_NORM_MIN_SIZE
# elements, and runs without Numba, keep the NumPy lines.
FUSED_NORM = True
FUSED_NORM_MIN_SIZE = 1 << 16


def _fused_norm(x: Array, scale: Array) -> bool:
    """Whether the fused RMSNorm pass applies to x (..., D) with this scale (D,)."""
    return (FUSED_NORM and x.size >= FUSED_NORM_MIN_SIZE and x.ndim >= 2 and _fused.usable(x)
            and _fused.usable(scale) and scale.dtype == x.dtype and _fused.more_kernels() is not None)


def rms_norm_forward(x: Array, w: Array, eps: float, offset: bool = False):
    """x (..., D), w (D,) -> y (..., D)."""
    scale = (1.0 + w) if offset else w                               # (D,)
    if _fused_norm(x, scale):                                        # the lines below in one pass
        D = x.shape[-1]
        y, xhat, rstd = _fused.rms_norm_forward(x.reshape(-1, D), scale, eps)
        return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(*x.shape[:-1], 1), scale)
    mean_sq = np.einsum("...d,...d->...", x, x)[..., None] / x.shape[-1]  # (..., 1) mean(x^2), no x*x array
    rstd = 1.0 / np.sqrt(mean_sq + eps)                              # (..., 1)
    xhat = x * rstd                                                  # (..., D)
    return xhat * scale, (xhat, rstd, scale)


def rms_norm_backward(dy: Array, cache):
    """dy (..., D) -> dx (..., D), dw (D,)."""
    xhat, rstd, scale = cache
    D = xhat.shape[-1]
    if _fused_norm(dy, scale) and _fused.usable(dy, xhat) and _fused.usable(rstd):
        dx, dw = _fused.rms_norm_backward(dy.reshape(-1, D), xhat.reshape(-1, D), rstd.reshape(-1, 1), scale)
        return dx.reshape(dy.shape), dw
    dw = np.einsum("nd,nd->d", dy.reshape(-1, D), xhat.reshape(-1, D))  # (D,) sum over tokens of dy * xhat
    dxhat = dy * scale                                               # (..., D)
    # d/dx of x*rstd: rstd * (dxhat - xhat * mean(dxhat * xhat)), the row means as dot products
    dx = xhat * (np.einsum("...d,...d->...", dxhat, xhat)[..., None] / D)
    np.subtract(dxhat, dx, out=dx)
    dx *= rstd
    return dx, dw


# ======================================================================================
# rotary position embeddings (rotate-half layout)
# ======================================================================================
def rope_tables(head_dim: int, max_len: int, theta: float, dtype=np.float32):
    """cos, sin tables, each (max_len, Dh); computed in float64, then cast."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (Dh/2,)
    freqs = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)            # (L, Dh/2)
    emb = np.concatenate([freqs, freqs], axis=-1)                                # (L, Dh)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def rope_forward(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, heads, T, Dh), cos/sin (T, Dh) -> rotated x, same shape (Dh even).

    x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] for the halves x1, x2 of
    the last axis; written half by half, without building rotate_half(x).
    """
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]               # -x2 * sin
    out[..., half:] += x[..., :half] * sin[..., half:]               # +x1 * sin
    return out


def rope_backward(dout: Array, cos: Array, sin: Array) -> Array:
    """The rotation is orthogonal: its gradient is the inverse rotation (angle -> -angle),
    dout * cos - rotate_half(dout) * sin."""
    half = dout.shape[-1] // 2
    dx = dout * cos
    dx[..., :half] += dout[..., half:] * sin[..., :half]
    dx[..., half:] -= dout[..., :half] * sin[..., half:]
    return dx


# ======================================================================================
# causal self-attention with grouped-query KV heads
# ======================================================================================
def causal_mask_bias(T: int, S: int, q_start: int = 0, dtype=np.float32, xp=np) -> Array:
    """(T, S) additive mask: 0 where query i (at position q_start + i) may see key j, -inf after.

    ``xp`` is the array module of the scores (numpy, or cupy on the GPU)."""
    return xp.where(causal_hidden(T, S, q_start, xp), -np.inf, 0.0).astype(dtype)


def causal_hidden(T: int, S: int, q_start: int = 0, xp=np) -> Array:
    """(T, S) bool: True where key j lies after query i's position q_start + i (hidden)."""
    return xp.arange(S)[None, :] > q_start + xp.arange(T)[:, None]


# On host arrays three of attention's non-matmul steps run as small Numba loops
# (minisparse._fused): the pair layout's column reorder (:func:`_to_pairs`, a copy), the
# causal mask of each block of scores (the same -inf entries as
# np.copyto(where=...), which walks a 5-D broadcast view) and the backward's [do', -D'] in
# one pass (do' the same bits; D' = do' . out summed in float64, equal to einsum's to
# rounding). False, fewer than FUSED_ATTENTION_MIN_SIZE query elements, or no Numba: the
# NumPy lines. (False also drops host-only layout changes that need no Numba, the same values
# either way: the keys in C order (without a KV cache: a decoding step would copy its cache),
# v in C order before its transpose, and with one query head per KV head the blocks' e @ v
# and ds @ k written straight into out and dq, no copy.)
FUSED_ATTENTION = True
FUSED_ATTENTION_MIN_SIZE = 1 << 16


def _fused_attention(*arrays) -> bool:
    return (FUSED_ATTENTION and arrays[0].size >= FUSED_ATTENTION_MIN_SIZE and _fused.host_float(*arrays)
            and _fused.more_kernels() is not None)


QUERY_BLOCK = 64  # queries per block in attention: later blocks need more keys, early ones fewer
GPU_QUERY_BLOCK = 256  # on a GPU: a block is ~15 kernel launches, which cost more than the masked scores they skip


def _exp_needs_shift(qs: Array, k: Array):
    """Whether softmax must subtract each row's max before ``exp`` (the usual safeguard).

    Softmax is shift-invariant; the shift only keeps ``exp`` in range. By Cauchy-Schwarz
    every score lies within +-max|q_i| * max|k_j|; while that bound is below ln(dtype max)/3
    (29.6 in float32), ``exp(scores)`` can neither overflow nor lose a row to underflow, and
    the pass computing the max and the pass subtracting it can be skipped (small models in
    training, the common case). A bool on the host; on CuPy a 0-d device array (no host sync).
    """
    xp = array_module(qs)
    q2 = np.max(np.einsum("...d,...d->...", qs, qs))                  # max_i |q_i|^2
    k2 = np.max(np.einsum("...d,...d->...", k, k))                    # max_j |k_j|^2
    need = q2 * k2 > (math.log(np.finfo(qs.dtype).max) / 3) ** 2
    return bool(need) if xp is np else need


def _rows(a: Array) -> Array:
    """The (..., Dh) vectors of a (B, H, T, Dh) as a C-contiguous (B, T, H, Dh) view when a is
    one transposed (training's queries), else a: the same vectors, read in memory order."""
    t = a.transpose(0, 2, 1, 3)
    return t if t.flags.c_contiguous else a


def attention_core_forward(q: Array, k: Array, v: Array, q_start: int = 0, block: Optional[int] = None,
                           scale: Optional[float] = None):
    """Causal softmax attention, softmax(scale q k^T + mask) v, scale = 1/sqrt(Dh) by default.

    q (B, H, T, Dh); k, v (B, K, S, Dh) with K dividing H; query i sits at absolute position
    ``q_start + i`` and sees keys 0..q_start+i. Returns out (B, H, T, Dh) and a cache.
    ``scale=1.0`` for queries already scaled (saves a pass; the backward's dq is then the
    gradient of the scaled queries).

    Savings, same result:

    * Grouped-query attention without copying k and v: the rep = H/K query heads that
      share a KV head are stacked along time, so one matmul per KV head serves all of them
      (query head h uses KV head h // rep, as ``np.repeat(k, rep, axis=1)`` would give).
    * Causality: queries are taken ``block`` at a time (default :data:`QUERY_BLOCK`, on a
      GPU :data:`GPU_QUERY_BLOCK`), and a block only computes scores against the keys its
      last query can see (about half the work of the full T x S); only the keys the
      block's first query cannot see are masked.
    * Few passes over the (block x keys) scores: the max is subtracted only when the
      scores could overflow ``exp`` (:func:`_exp_needs_shift`), the probabilities
      p = e / l (e = exp(scores), l = row sums of e) are never formed: the output is
      (e @ v) / l, a division over Dh columns instead of over the keys (FlashAttention's
      deferred normalisation; the backward folds 1/l into dout the same way).
    """
    B, H, T, Dh = q.shape
    K, S = k.shape[1], k.shape[2]
    rep = H // K
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    xp = array_module(q)                                              # numpy or cupy (minisparse.xp)
    block = block or (QUERY_BLOCK if xp is np else GPU_QUERY_BLOCK)
    qs = q * q.dtype.type(scale) if scale != 1.0 else q               # (B, H, T, Dh) scaled queries
    host = xp is np and FUSED_ATTENTION                               # host layouts (the same values):
    if host and q_start == 0:                                         # keys in C order (training's are a
        k = np.ascontiguousarray(k)                                   # transposed view): kt below and the
    shift = _exp_needs_shift(_rows(qs) if host else qs, k)            # backward's ds @ k read them faster
    out = np.empty_like(q)                                            # (B, H, T, Dh)
    l_all = xp.empty((B, H, T, 1), dtype=q.dtype)                     # (B, H, T, 1) softmax denominators
    kt = k.transpose(0, 1, 3, 2).copy()                               # (B, K, Dh, S): q @ kt is a plain matmul
    fast = _fused_attention(q)                                        # the mask as a Numba loop
    blocks = []
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        Tb, s1 = t1 - t0, min(S, q_start + t1)                        # s1: keys the block can see
        c0 = min(s1, q_start + t0)                                    # keys c0.. are hidden from some queries
        qb = qs[:, :, t0:t1].reshape(B, K, rep * Tb, Dh)              # (B, K, rep*Tb, Dh)
        scores = qb @ kt[:, :, :, :s1]                                # (B, K, rep*Tb, s1), a new C array,
        # so the reshape below is a view and the hidden scores set to -inf land in `scores`
        if fast:                                                      # the line below as a Numba loop
            _fused.mask_after(scores, Tb, q_start + t0)
        else:
            np.copyto(scores.reshape(B, K, rep, Tb, s1)[..., c0:], -np.inf,
                      where=causal_hidden(Tb, s1 - c0, q_start + t0 - c0, xp))
        if xp is np:
            if shift:
                scores -= scores.max(axis=-1, keepdims=True)          # exp never overflows
        else:                                                         # the same choice without a host sync
            scores -= xp.where(shift, scores.max(axis=-1, keepdims=True), scores.dtype.type(0))
        e = np.exp(scores, out=scores)                                # (B, K, rep*Tb, s1) softmax numerators
        l = np.einsum("...s->...", e)[..., None]                      # (B, K, rep*Tb, 1) denominators
        if host and rep == 1:                                         # straight into out (a strided view),
            ob = np.matmul(e, v[:, :, :s1], out=out[:, :, t0:t1])     # no copy (the same values)
        else:
            ob = e @ v[:, :, :s1]                                     # (B, K, rep*Tb, Dh)
        ob /= l                                                       # = p @ v with p = e / l
        if not (host and rep == 1):
            out[:, :, t0:t1] = ob.reshape(B, H, Tb, Dh)
        l_all[:, :, t0:t1] = l.reshape(B, H, Tb, 1)
        blocks.append((t0, t1, s1, qb, e))
    return out, (k, v, scale, out, l_all, blocks)


def attention_core_backward(dout: Array, cache):
    """dout (B, H, T, Dh) -> dq (B, H, T, Dh), dk, dv (B, K, S, Dh).

    With p = e / l (forward) and dp = dout v^T, softmax's backward is ds = p (dp - D),
    D = sum_j dp_j p_j = dout . out (FlashAttention's identity, a dot over Dh). Writing
    do' = dout / l and D' = D / l gives ds = e (do' v^T - D'); the row constant D' rides
    in the same matmul as a last coordinate, [do', -D'] @ [v, 1]^T, so ds costs one pass
    over the scores (the product with e).
    """
    k, v, scale, out, l, blocks = cache
    B, H, T, Dh = dout.shape
    K = k.shape[1]
    rep = H // K
    xp = array_module(dout)
    S = v.shape[2]
    dq = np.empty_like(dout)                                          # (B, H, T, Dh)
    # the blocks run last to first: the last block's queries see every key (training: S = T),
    # so its products are written into dk, dv (no zero fill), and the earlier blocks add theirs
    blocks = blocks[::-1]
    sets = blocks[0][2] == S                                          # the first block covers all keys
    dk = (xp.empty if sets else xp.zeros)(k.shape, dtype=k.dtype)     # (B, K, S, Dh), C order
    dv = (xp.empty if sets else xp.zeros)(v.shape, dtype=v.dtype)     # (B, K, S, Dh)
    v1t = xp.empty((B, K, Dh + 1, S), dtype=v.dtype)                  # (B, K, Dh+1, S) = [v, 1]^T
    # on the host through a C-order copy of v (training's v is a transposed view): two copies
    # cost less than one strided transpose (0.6 against 0.9 ms per layer, 8 rows, float32)
    host = xp is np and FUSED_ATTENTION                               # host layouts (the same values)
    v1t[:, :, :Dh] = (np.ascontiguousarray(v) if host else v).transpose(0, 1, 3, 2)
    v1t[:, :, Dh] = 1
    do1 = xp.empty((B, H, T, Dh + 1), dtype=dout.dtype)               # (B, H, T, Dh+1) = [do', -D']
    if _fused_attention(dout, l, out, do1):                           # the two lines below in 1 pass
        _fused.attention_do1(dout, l, out, do1)                       # (D' to rounding: summed in float64)
    else:
        do = np.divide(dout, l, out=do1[..., :Dh])                    # do' = dout / l
        do1[..., Dh] = -np.einsum("...d,...d->...", do, out)          # -D' = -do' . out
    # on the CPU a few batch rows at a time, so that a block's scores (~1 MB) stay in cache
    # between the matmuls and the product that use them; on a GPU all rows at once (every
    # operation below is a kernel launch, and launches, not cache misses, are what cost there)
    rows = max(1, (1 << 20) // (H * QUERY_BLOCK * S * dout.dtype.itemsize)) if xp is np else B
    for b in range(0, B, rows):
        n, nb = slice(b, b + rows), min(B, b + rows) - b              # batch rows of this pass, their count
        for j, (t0, t1, s1, qb, e) in enumerate(blocks):
            Tb = t1 - t0
            qb, e = qb[n], e[n]
            do1b = do1[n, :, t0:t1].reshape(nb, K, rep * Tb, Dh + 1)  # [do', -D'] of the block's queries
            if j == 0 and sets:                                       # (nb, K, s1, Dh) = p^T dout, sums the rep heads
                np.matmul(e.transpose(0, 1, 3, 2), do1b[..., :Dh], out=dv[n])
            else:
                dv[n, :, :s1] += e.transpose(0, 1, 3, 2) @ do1b[..., :Dh]
            ds = do1b @ v1t[n, :, :, :s1]                             # (nb, K, rep*Tb, s1) = do' v^T - D'
            ds *= e                                                   # ds = e (do' v^T - D') = p (dp - D)
            if host and rep == 1:                                     # straight into dq (a strided view)
                dqb = np.matmul(ds, k[n, :, :s1], out=dq[n, :, t0:t1])
            else:
                dqb = ds @ k[n, :, :s1]                               # (nb, K, rep*Tb, Dh)
            if scale != 1.0:
                dqb *= k.dtype.type(scale)
            if not (host and rep == 1):
                dq[n, :, t0:t1] = dqb.reshape(nb, H, Tb, Dh)
            if j == 0 and sets:                                       # (nb, K, s1, Dh)
                np.matmul(ds.transpose(0, 1, 3, 2), qb, out=dk[n])
            else:
                dk[n, :, :s1] += ds.transpose(0, 1, 3, 2) @ qb
    return dq, dk, dv


def _to_pairs(w: Array, heads: int) -> Array:
    """Columns (or entries) of a (..., heads*Dh) projection reordered per head from the
    rotate-half layout [x_0 .. x_{h-1}, x_h .. x_{Dh-1}] (h = Dh/2) to adjacent rotation
    pairs [x_0, x_h, x_1, x_{h+1}, ...] (a copy)."""
    if w.ndim == 2 and _fused_attention(w):                          # the line below as a Numba loop
        return _fused.pairs(w, heads)
    *lead, n = w.shape
    return w.reshape(*lead, heads, 2, n // heads // 2).swapaxes(-1, -2).reshape(*lead, n)


def _from_pairs(g: Array, heads: int) -> Array:
    """The inverse of :func:`_to_pairs` (gradients back to the parameters' layout)."""
    *lead, n = g.shape
    return g.reshape(*lead, heads, n // heads // 2, 2).swapaxes(-1, -2).reshape(*lead, n)


def _rotate_pairs(x: Array, cos: Array, sin: Array, heads: int, inverse: bool = False,
                  factor: float = 1.0, rot: Optional[Array] = None) -> Array:
    """Rotary embedding of x (B, T, heads*Dh) in the pair layout of :func:`_to_pairs`, in place.

    Pair (a, b) at position t rotates by the angle of cos/sin (T, Dh) column j: with
    z = a + i b, the rotation is z * (cos + i sin), one complex multiplication per pair
    (RoFormer's complex form; ``inverse``: by cos - i sin, the backward). The rotate-half
    tables hold each angle twice (columns j and j + Dh/2), so their first half is used.
    ``factor`` scales the result too (free: it multiplies the small table). ``rot``: the
    table (:func:`_rotation`, conjugated for ``inverse``) when the caller has it already.
    """
    if rot is None:
        rot = _rotation(cos, sin, heads, x.dtype, array_module(x), factor)
        if inverse:
            rot = rot.conj()
    z = x.view(rot.dtype)                                            # (B, T, heads*Dh/2) complex view
    z *= rot
    return x


def _rotation(cos: Array, sin: Array, heads: int, dtype, xp, factor: float = 1.0) -> Array:
    """(T, heads*Dh/2) complex table of :func:`_rotate_pairs`: factor * e^{i theta} per pair
    (its conjugate is the inverse rotation's table, exactly)."""
    half = cos.shape[1] // 2
    rot = (cos[:, :half] + 1j * sin[:, :half]) * factor              # (T, Dh/2) e^{i theta}
    return xp.tile(rot.astype(np.result_type(dtype, np.complex64)), (1, heads))  # (T, heads*Dh/2)


def attention_forward(x: Array, wq: Array, wk: Array, wv: Array, wo: Array,
                      cos: Array, sin: Array, n_heads: int, n_kv_heads: int,
                      bq: Optional[Array] = None, bk: Optional[Array] = None,
                      bv: Optional[Array] = None, kv_cache=None, start_pos: int = 0):
    """Multi-head attention block (projections, rotary, causal attention, output).

    x (B, T, D); wq (D, H*Dh); wk, wv (D, K*Dh); wo (H*Dh, D); cos/sin (T, Dh) for the
    positions start_pos..start_pos+T-1. With ``kv_cache=(k_buf, v_buf)`` of shape
    (B, K, L, Dh) the new keys/values are written at start_pos and attention runs over all
    cached positions. Returns y (B, T, D) and a cache for the backward.

    Without a KV cache (training, a whole sequence), the query and key projections are
    computed with their columns in the pair layout of :func:`_to_pairs`: attention only
    uses dot products q . k, which do not change when q and k have their coordinates
    permuted alike, and with each rotation pair side by side the rotary embedding is one
    complex multiplication (:func:`_rotate_pairs`) instead of :func:`rope_forward`'s
    three passes over half-rows. The permuted weights are small copies (D x H*Dh); with a
    KV cache (decoding, one token at a time) the rotate-half path is used as written.
    """
    B, T, D = x.shape
    Dh = wq.shape[1] // n_heads
    paired = kv_cache is None
    if paired:
        wq, wk = _to_pairs(wq, n_heads), _to_pairs(wk, n_kv_heads)
        if bq is not None:
            bq, bk = _to_pairs(bq, n_heads), _to_pairs(bk, n_kv_heads)
    q = x @ wq                                                       # (B, T, H*Dh)
    k = x @ wk                                                       # (B, T, K*Dh)
    v = x @ wv                                                       # (B, T, K*Dh)
    if bq is not None:
        q = q + bq
        k = k + bk
        v = v + bv
    rots = None
    if paired:                                                       # in place; q also takes attention's
        xp = array_module(q)                                         # 1/sqrt(Dh)
        rots = (_rotation(cos, sin, n_heads, q.dtype, xp, 1.0 / math.sqrt(Dh)),
                _rotation(cos, sin, n_kv_heads, k.dtype, xp))        # kept for the backward, with wq, wk
        q = _rotate_pairs(q, cos, sin, n_heads, rot=rots[0])
        k = _rotate_pairs(k, cos, sin, n_kv_heads, rot=rots[1])
    q = q.reshape(B, T, n_heads, Dh).transpose(0, 2, 1, 3)           # (B, H, T, Dh)
    k = k.reshape(B, T, n_kv_heads, Dh).transpose(0, 2, 1, 3)        # (B, K, T, Dh)
    v = v.reshape(B, T, n_kv_heads, Dh).transpose(0, 2, 1, 3)        # (B, K, T, Dh)
    if not paired:
        q = rope_forward(q, cos, sin)
        k = rope_forward(k, cos, sin)
        k_buf, v_buf = kv_cache
        k_buf[:, :, start_pos:start_pos + T] = k
        v_buf[:, :, start_pos:start_pos + T] = v
        k = k_buf[:, :, :start_pos + T]                              # (B, K, S, Dh)
        v = v_buf[:, :, :start_pos + T]
    o, core_cache = attention_core_forward(q, k, v, q_start=start_pos,  # (B, H, T, Dh)
                                           scale=1.0 if paired else None)
    o = o.transpose(0, 2, 1, 3).reshape(B, T, n_heads * Dh)          # (B, T, H*Dh)
    y = o @ wo                                                       # (B, T, D)
    return y, (x, o, core_cache, cos, sin, n_heads, n_kv_heads, paired, bq is not None,
               (wq, wk, rots) if paired else None)


def attention_backward(dy: Array, cache, wq: Array, wk: Array, wv: Array, wo: Array,
                       defer: Optional[list] = None):
    """dy (B, T, D) -> dx (B, T, D) and a dict of parameter gradients (wq, wk, wv, wo; and
    bq, bk, bv when the forward had biases). With ``defer`` (a list) the wq, wk, wv
    gradients are :class:`Deferred` entries queued there (see :func:`ffn_backward`)."""
    x, o, core_cache, cos, sin, H, K, paired, bias, kept = cache
    B, T, D = x.shape
    Dh = wq.shape[1] // H
    g = {}
    g["wo"] = o.reshape(-1, H * Dh).T @ dy.reshape(-1, D)            # (H*Dh, D) now: callers update dy
    do = (dy @ wo.T).reshape(B, T, H, Dh).transpose(0, 2, 1, 3)      # (B, H, T, Dh)
    dq, dk, dv = attention_core_backward(do, core_cache)
    if not paired:
        dq = rope_backward(dq, cos, sin)
        dk = rope_backward(dk, cos, sin)
    dq = dq.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)              # (B, T, H*Dh)
    dk = dk.transpose(0, 2, 1, 3).reshape(B, T, K * Dh)              # (B, T, K*Dh)
    dv = dv.transpose(0, 2, 1, 3).reshape(B * T, K * Dh)             # (N, K*Dh)
    if paired:                                                       # back through the rotation, then
        xp = array_module(dq)                                        # the pair layout (the forward's
        wq, wk, (rot_q, rot_k) = kept                                # paired weights and tables)
        dq = _rotate_pairs(xp.ascontiguousarray(dq), cos, sin, H, rot=rot_q.conj())
        dk = _rotate_pairs(xp.ascontiguousarray(dk), cos, sin, K, rot=rot_k.conj())
    dq, dk = dq.reshape(B * T, H * Dh), dk.reshape(B * T, K * Dh)    # (N, H*Dh), (N, K*Dh)
    x2 = x.reshape(-1, D)                                            # (N, D)
    back = _from_pairs if paired else (lambda w, heads: w)           # to the parameters' layout
    g["wq"] = _weight_grad(lambda: back(x2.T @ dq, H), defer)        # (D, H*Dh)
    g["wk"] = _weight_grad(lambda: back(x2.T @ dk, K), defer)        # (D, K*Dh)
    g["wv"] = _weight_grad(lambda: x2.T @ dv, defer)                 # (D, K*Dh)
    if bias:
        g["bq"], g["bk"], g["bv"] = back(dq.sum(0), H), back(dk.sum(0), K), dv.sum(0)
    dx = dq @ wq.T + dk @ wk.T + dv @ wv.T                           # (N, D)
    return dx.reshape(B, T, D), g


# ======================================================================================
# gated FFN, neuron-major weights
#   y = down(act(gate(x), up(x)))   e.g. down(relu(x Wg^T) * relu(x Wu^T))  # dReLU, TurboSparse eq. 2
# ======================================================================================
# SiLU-gated FFNs (SwiGLU) on host arrays run their element-wise lines through one fused
# Numba pass each way (minisparse._fused: the same operations in the same order, the same
# bits; exp stays NumPy's). False: always the NumPy lines. Arrays smaller than
# FUSED_SWIGLU_MIN_SIZE elements keep the NumPy lines (a few microseconds; and a short
# inference call then does not import Numba). Without Numba: the NumPy lines.
FUSED_SWIGLU = True
FUSED_SWIGLU_MIN_SIZE = 1 << 16


# ReLU-gated FFNs (dReLU: relu(g) * relu(u); ReGLU: relu(g) * u) on host arrays likewise:
# one Numba pass forward (a, b, h) and one backward (dg, du), the NumPy lines' bits.
FUSED_RELU_GLU = True


def _fused_relu_glu(act: Activation, *arrays) -> bool:
    """Whether the fused ReLU-gate passes apply (plain relu gate; up relu or identity)."""
    return (FUSED_RELU_GLU and act.gate_fn is relu and act.gate_grad is relu_grad
            and (act.up_kind == "identity" or (act.up_fn is relu and act.up_grad is relu_grad))
            and arrays[0].size >= FUSED_SWIGLU_MIN_SIZE and _fused.usable(*arrays)
            and _fused.more_kernels() is not None)


def _fused_swiglu(*arrays) -> bool:
    """Whether the fused SiLU-gate pass applies to these (N, F) arrays (see FUSED_SWIGLU)."""
    return (FUSED_SWIGLU and arrays[0].size >= FUSED_SWIGLU_MIN_SIZE and _fused.usable(*arrays)
            and _fused.kernels() is not None)


class FFNCache(NamedTuple):
    """What :func:`ffn_backward` needs from :func:`ffn_forward` (and what instruments read)."""
    x: Array                    # (N, D) input tokens
    g: Array                    # (N, F) gate pre-activation  x @ w_gate.T
    u: Optional[Array]          # (N, F) up pre-activation    x @ w_up.T (None: plain activation)
    h: Array                    # (N, F) activation output    act(g, u), after any hook


class _FFNCacheKept(FFNCache):
    """An :class:`FFNCache` that also keeps, as attributes (it still unpacks as (x, g, u, h)),
    what a gated activation's backward would compute again: ``a`` = gate(g), ``b`` = up(u)
    (h = a * b before any hook) and ``e`` = 1 + exp(-g) = 1 / sigmoid(g) when the gate is
    SiLU (else None)."""


def ffn_forward(x: Array, w_gate: Array, w_up: Optional[Array], w_down: Array,
                act: Activation, hook=None):
    """Feed-forward block on tokens x (N, D).

    w_gate, w_up, w_down are all (F, D): row f holds neuron f's weights (contiguous, so a
    sparse kernel can read only the rows of active neurons). Plain activations use no
    ``w_up``. ``hook(h)`` may observe or replace the intermediate activation h (N, F).
    Returns y (N, D) and an :class:`FFNCache` ``(x, g, u, h)``.
    """
    g = x @ w_gate.T                                                 # (N, F) gate pre-activation
    a = b = e = None
    if act.gated:                                                    # = act.forward(g, u), keeping its factors
        u = x @ w_up.T                                               # (N, F) up pre-activation
        fused_relu = _fused_relu_glu(act, g, u)                      # ReLU gates in 1 pass (below)
        b = None if fused_relu else u if act.up_kind == "identity" else act.up_fn(u)  # (N, F) up(u)
        if act.gate_fn is silu:                                      # SwiGLU: silu(g) = g / (1 + exp(-g)),
            e = np.negative(g)                                       # keeping 1 + exp(-g) for the derivative
            with np.errstate(over="ignore"):                         # (exp(-g) = inf for g < -88 in float32:
                np.exp(e, out=e)                                     # silu -> -0, the right limit)
            if _fused_swiglu(g, b, e):                               # the 3 lines below in 1 pass
                a, h = _fused.swiglu_rest(g, b, e)                   # (N, F) each; e += 1 in place
            else:
                e += 1                                               # (N, F) 1 + exp(-g)
                a = g / e                                            # (N, F) silu(g)
                h = a * b                                            # (N, F)
        elif fused_relu:                                             # h = relu(g) * up(u); a, b not kept
            h = _fused.relu_glu_forward(g, u, act.up_kind != "identity")  # (the backward recomputes them)
        else:
            a = act.gate_fn(g)                                       # (N, F) gate(g)
            h = a * b                                                # (N, F)
    else:
        u = None
        h = act.forward(g)                                           # (N, F)
    if hook is not None:
        h2 = hook(h)
        if h2 is not None:
            h = h2
    y = h @ w_down                                                   # (N, D)
    cache = _FFNCacheKept(x, g, u, h)
    cache.a, cache.b, cache.e = a, b, e
    return y, cache


def ffn_backward(dy: Array, cache, w_gate: Array, w_up: Optional[Array], w_down: Array,
                 act: Activation, l1: float = 0.0, l1_tokens: Optional[int] = None,
                 defer: Optional[list] = None):
    """dy (N, D) -> dx (N, D), dw_gate, dw_up (or None), dw_down, each (F, D).

    ``defer``: a list; dw_gate and dw_up are then returned as :class:`Deferred` entries
    appended to it, to be computed later (by any thread: the training split lets a thread
    that finished its rows take products of the other's), the same bits. (dw_down, like
    attention's wo, is computed at once: it reads ``dy``, which callers update in place.)

    ``l1`` adds the gradient of ``l1 * sum(|h|) / l1_tokens`` (ProSparse's activation
    penalty: a sum over neurons, averaged over tokens; ``l1_tokens`` defaults to N, and a
    MoE expert passes the layer's token count so each token is penalised once).
    """
    x, g, u, h = cache
    a, b, e = (getattr(cache, name, None) for name in "abe")         # kept by ffn_forward, or None
    dw_down = h.T @ dy                                               # (F, D) now: callers update dy
    dh = dy @ w_down.T                                               # (N, F)
    if l1:
        dh += dh.dtype.type(l1 / (l1_tokens or h.shape[0])) * np.sign(h)
    # = act.backward(dh, g, u), with the forward's gate(g), up(u) (and sigmoid(g)) reused
    up_done = False
    if act.gated:
        fused_relu = e is None and _fused_relu_glu(act, dh, g, u)    # ReLU gates in 1 pass (below)
        if a is None and not fused_relu:                             # a cache built elsewhere (or fused)
            a, b = act.gate_fn(g), (u if act.up_kind == "identity" else act.up_fn(u))
        if e is not None and _fused_swiglu(dh, b, a, e):             # the SiLU lines below in 1 pass:
            dg = _fused.swiglu_backward(dh, b, a, e)                 # (N, F); dh becomes du = dh * a
            du = dh                                                  # (N, F)
        elif fused_relu:                                             # relu(g), up(u) again and the lines
            dg = _fused.relu_glu_backward(dh, g, u, act.up_kind != "identity")  # below in 1 pass:
            du, up_done = dh, True                                   # dh became du, its up mask applied
        else:
            dg = dh * b                                              # (N, F)
            if e is not None:                                        # silu'(g) = s + g s (1 - s), s = 1 / e,
                d_gate = np.subtract(1, a, dtype=a.dtype)            # = (1 - a) / e + a with a = g s
                d_gate /= e
                d_gate += a
            elif act.gate_grad is relu_grad:
                d_gate = g > 0                                       # relu'(g) as a mask (no float copy)
            else:
                d_gate = act.gate_grad(g)
            dg *= d_gate                                             # dL/dg = dh * up(u) * gate'(g)
            du = np.multiply(dh, a, out=dh)                          # (N, F), in place of dh
        if act.up_kind != "identity" and not up_done:                # dL/du = dh * gate(g) * up'(u)
            du *= (u > 0) if act.up_grad is relu_grad else act.up_grad(u)
    else:
        dg = np.multiply(dh, act.gate_grad(g), out=dh)               # (N, F) dL/dg = dh * f'(g)
        du = None
    dw_gate = _weight_grad(lambda: dg.T @ x, defer)                  # (F, D)
    dx = dg @ w_gate                                                 # (N, D)
    dw_up = None
    if act.gated:
        dw_up = _weight_grad(lambda: du.T @ x, defer)                # (F, D)
        dx += du @ w_up
    return dx, dw_gate, dw_up, dw_down


# ======================================================================================
# cross-entropy over the vocabulary
# ======================================================================================
def cross_entropy_forward(logits: Array, targets: Array, ignore_index: int = -1, read: bool = True):
    """logits (N, V), targets (N,) int -> mean loss over targets != ignore_index.

    ``read=False`` returns the loss as a 0-d array (of the logits' module) instead of a
    float, and leaves out the check that some target counts: on a GPU each of the two is a
    host sync, which a training step makes once, after its backward is queued.
    """
    valid = targets != ignore_index                                   # (N,)
    n = valid.sum(dtype=logits.dtype)                                 # () the count, as a float (exact < 2^24)
    if read and not n:
        raise ValueError("cross_entropy: every target is ignore_index; nothing to average")
    m = logits.max(axis=-1, keepdims=True)                           # (N, 1) for a stable logsumexp
    z = logits - m
    lse = np.log(np.exp(z).sum(axis=-1))                             # (N,)
    t = np.where(valid, targets, 0)
    rows = array_module(z).arange(len(t))                            # (N,) on z's device
    nll = lse - z[rows, t]                                           # (N,)
    loss = (nll * valid).sum() / n                                   # ()
    return (float(loss) if read else loss), (z, lse, t, valid, n, rows)


def cross_entropy_backward(cache) -> Array:
    """-> dlogits (N, V) = (softmax - onehot) / n on valid rows, 0 elsewhere."""
    z, lse, t, valid, n, rows = cache
    p = np.exp(z - lse[:, None])                                     # (N, V)
    p[rows, t] -= 1.0
    p *= (valid / n)[:, None].astype(p.dtype)
    return p
