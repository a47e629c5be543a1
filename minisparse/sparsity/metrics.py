"""Sparsity metrics of an FFN's intermediate activation h, one function per definition.

Dimension key: N tokens, F FFN neurons, D model width. ``h`` is the (N, F) activation that
feeds the down projection, ``y = h @ w_down`` with ``w_down`` neuron-major (F, D).

Definitions implemented here

* **exact-zero fraction** -- share of entries of h that are exactly 0 (what a kernel can
  skip for free; the ReLU family produces them, SwiGLU/GELU almost never do).
* **fraction below eps** -- share with ``|h| < eps``.
* **top-k sparsity** -- keep, per token, the ``(1 - s)`` share of neurons with the largest
  ``|h|`` and zero the rest (how TurboSparse, Song et al. 2024, compares activations at a
  fixed sparsity ``s``).
* **CETT** -- cumulative errors of tail truncation (ReLU^2 Wins, Zhang et al. 2024,
  arXiv 2402.03804): neuron f's output on a token is ``n_f = h_f w_down[f]``, of norm
  ``|h_f| ||w_down[f]||``; drop every neuron whose output norm is below ``eps``;
  CETT(eps) = ||sum of the dropped n_f|| / ||y||, averaged over tokens. Neurons are ranked
  by their *output norm*, not by ``|h_f|`` alone. :func:`cett_threshold` finds by binary
  search the largest ``eps`` whose CETT stays under a target (0.2 in the paper) and the
  sparsity it allows; :func:`cett_mask` applies it. Calibrate on training text, evaluate
  on validation text.
* **TEAL-uniform input sparsity** -- (after Liu et al. 2024, "Training-free activation
  sparsity in LLMs"): zero the entries of a projection's *input* whose magnitude is below
  ``t``, where ``t`` is the ``s``-quantile of ``|x|`` on held-out calibration text, so a
  share ``s`` is dropped. TEAL itself thresholds the inputs of every projection (attention
  too) with a greedy per-layer allocation of sparsity; this is the uniform, per-tensor
  version ("TEAL-uniform"), applied to FFN inputs only by :mod:`~minisparse.sparsity.quality`.

Everything here works on plain arrays, so it can be checked by hand (see the tests).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

Array = np.ndarray

__all__ = [
    "exact_zero_fraction", "below_eps_fraction", "topk_keep_count", "topk_mask", "topk_sparsify",
    "threshold_mask", "threshold_sparsify", "neuron_output_norms", "cett_mask", "cett_h_thresholds",
    "cett_per_token", "cett", "cett_threshold",
    "teal_threshold", "teal_thresholds",
]


def _as_2d(h, name: str = "h") -> Array:
    h = np.asarray(h)
    if h.ndim == 1:
        h = h[None, :]
    if h.ndim != 2:
        raise ValueError(f"{name} must have shape (tokens, neurons), got shape {h.shape}; "
                         "reshape a (batch, time, neurons) array with .reshape(-1, neurons)")
    if h.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numeric, got dtype {h.dtype}")
    return h


def _check_sparsity(s: float) -> float:
    s = float(s)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1] (a share of neurons to drop), got {s}; "
                         "write 90% as 0.9")
    return s


# --------------------------------------------------------------------------------------
# counting zeros
# --------------------------------------------------------------------------------------
def exact_zero_fraction(h) -> float:
    """Share of entries of ``h`` that are exactly zero.

    >>> exact_zero_fraction([[0.0, 1.0], [0.0, 0.0]])
    0.75
    """
    h = np.asarray(h)
    if h.size == 0:
        raise ValueError("exact_zero_fraction of an empty array is undefined")
    return float(np.count_nonzero(h == 0) / h.size)


def below_eps_fraction(h, eps: float) -> float:
    """Share of entries with ``|h| < eps`` (``eps = 0`` counts nothing; use exact zeros).

    >>> below_eps_fraction([[0.0, 0.001, 0.5, -2.0]], 0.01)
    0.5
    """
    h = np.asarray(h)
    if h.size == 0:
        raise ValueError("below_eps_fraction of an empty array is undefined")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(np.count_nonzero(np.abs(h) < eps) / h.size)


# --------------------------------------------------------------------------------------
# top-k sparsity (TurboSparse)
# --------------------------------------------------------------------------------------
def topk_keep_count(n_neurons: int, sparsity: float) -> int:
    """Neurons kept per token at top-k sparsity ``s``: round((1 - s) * F).

    >>> topk_keep_count(344, 0.9)
    34
    """
    s = _check_sparsity(sparsity)
    return int(min(n_neurons, max(0, round((1.0 - s) * n_neurons))))


def topk_mask(h, sparsity: float) -> Array:
    """Boolean (N, F) mask keeping, per token, the ``round((1-s) F)`` largest ``|h|``.

    Ties are broken by ``np.argpartition`` (deterministic for a given input).

    >>> topk_mask([[0.1, -3.0, 2.0, 0.5]], 0.5).astype(int).tolist()
    [[0, 1, 1, 0]]
    """
    h = _as_2d(h)
    N, F = h.shape
    k = topk_keep_count(F, sparsity)
    mask = np.zeros((N, F), dtype=bool)                               # (N, F)
    if k == 0:
        return mask
    if k == F:
        mask[:] = True
        return mask
    idx = np.argpartition(-np.abs(h), k - 1, axis=1)[:, :k]           # (N, k) largest |h|
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def topk_sparsify(h, sparsity: float) -> Array:
    """``h`` with all but the per-token top ``(1 - s)`` share of ``|h|`` set to zero."""
    h = _as_2d(h)
    return np.where(topk_mask(h, sparsity), h, 0).astype(h.dtype, copy=False)  # (N, F)


def threshold_mask(h, t: float) -> Array:
    """Boolean mask of the entries that survive a magnitude threshold: ``|h| >= t``."""
    return np.abs(np.asarray(h)) >= t


def threshold_sparsify(h, t: float) -> Array:
    """``h`` with every ``|h| < t`` set to zero (TEAL / CETT-style magnitude pruning)."""
    h = np.asarray(h)
    return np.where(np.abs(h) >= t, h, 0).astype(h.dtype, copy=False)


# --------------------------------------------------------------------------------------
# CETT (ReLU^2 Wins, Zhang et al. 2024)
# --------------------------------------------------------------------------------------
def _check_w_down(h: Array, w_down) -> Array:
    w = np.asarray(w_down)
    if w.ndim != 2 or w.shape[0] != h.shape[1]:
        raise ValueError(f"w_down must be neuron-major (F, D) with F = h.shape[1] = {h.shape[1]}, "
                         f"got shape {w.shape}; transpose a (D, F) matrix")
    return w


def neuron_output_norms(h, w_down) -> Array:
    """(N, F) norm of each neuron's output on each token: ``|h_f| * ||w_down[f]||``.

    This is the quantity ReLU^2 Wins ranks and drops neurons by (float64).

    >>> import numpy as np
    >>> neuron_output_norms([[3.0, -4.0]], np.array([[1.0, 0.0], [0.0, 0.5]])).tolist()
    [[3.0, 2.0]]
    """
    h = _as_2d(h).astype(np.float64)
    w = _check_w_down(h, w_down).astype(np.float64)
    return np.abs(h) * np.linalg.norm(w, axis=1)[None, :]              # (N, F)


def cett_mask(h, w_down, eps: float) -> Array:
    """Boolean (N, F) mask of the neurons CETT keeps: output norm ``|h_f| ||w_down[f]|| >= eps``.

    >>> import numpy as np
    >>> cett_mask([[3.0, 4.0, 12.0]], np.diag([1.0, 0.5, 1.0]), 2.5).tolist()
    [[True, False, True]]
    """
    return neuron_output_norms(h, w_down) >= eps


def cett_h_thresholds(w_down, eps: float) -> Array:
    """(F,) per-neuron thresholds on ``|h_f|`` equivalent to an output-norm threshold ``eps``:
    ``eps / ||w_down[f]||`` (``inf`` for a neuron whose down row is zero: it is always dropped).

    ``|h_f| >= eps / ||w_f||`` iff ``|h_f| ||w_f|| >= eps``, so a :class:`~minisparse.sparsity.Threshold`
    rule with these thresholds applies CETT's drop rule.
    """
    w = np.asarray(w_down, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"w_down must be neuron-major (F, D), got shape {w.shape}")
    norms = np.linalg.norm(w, axis=1)                                  # (F,)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(norms > 0, eps / np.where(norms > 0, norms, 1.0), np.inf)
    if eps <= 0:
        out = np.zeros_like(norms)
    return out


def cett_per_token(h, w_down, eps: float) -> Array:
    """CETT of each token at output-norm threshold ``eps`` (ReLU^2 Wins):
    ``||sum_{f: |h_f| ||w_f|| < eps} h_f w_f|| / ||h @ w_down||``.

    Tokens whose FFN output is exactly zero have nothing to lose and score 0.
    Computed in float64 (ratios of norms of small vectors).

    >>> import numpy as np
    >>> cett_per_token([[3.0, 4.0, 12.0]], np.eye(3), 3.5).round(4).tolist()
    [0.2308]
    """
    h = _as_2d(h).astype(np.float64)
    w = _check_w_down(h, w_down).astype(np.float64)
    y = h @ w                                                          # (N, D) full output
    drop = neuron_output_norms(h, w) < eps                             # (N, F)
    dropped = np.where(drop, h, 0.0) @ w                               # (N, D) output of dropped neurons
    ny = np.linalg.norm(y, axis=1)                                     # (N,)
    nd = np.linalg.norm(dropped, axis=1)                               # (N,)
    out = np.zeros_like(ny)
    ok = ny > 0
    out[ok] = nd[ok] / ny[ok]
    return out


def cett(h, w_down, eps: float) -> float:
    """Mean CETT over tokens at output-norm threshold ``eps`` (see :func:`cett_per_token`)."""
    return float(cett_per_token(h, w_down, eps).mean())


def cett_threshold(h, w_down, target: float = 0.2) -> Tuple[float, float, float]:
    """Largest output-norm threshold ``eps`` whose mean CETT stays <= ``target``; its sparsity.

    A neuron is dropped on a token when its output norm ``|h_f| ||w_down[f]||`` is below
    ``eps`` (ReLU^2 Wins). Binary search over the sorted distinct output norms: only those
    values give distinct drop sets, and the largest ``eps`` giving a drop set is that value
    itself. CETT grows (almost always) with ``eps``; the search assumes it is monotone, as
    the paper does. Calibrate on training text and evaluate the threshold on validation text.

    Returns ``(eps, sparsity, cett_at_eps)`` where sparsity is the share of entries dropped
    (exact zeros always count as dropped). If every neuron can be dropped, ``eps = inf``.
    Per-neuron thresholds on ``|h|``: :func:`cett_h_thresholds`.

    Examples
    --------
    Down rows of norms (1, 2, 0.25), one token ``h = (3, 4, 12)``: neuron outputs of norm
    3, 8 and 3, ``y = (3, 8, 3)`` of norm sqrt(82) = 9.06. Dropping the two of norm 3 gives
    CETT sqrt(18)/9.06 = 0.47; ranking by ``|h|`` would have dropped 3 and 4 instead.
    Under a 0.5 target the largest threshold is eps = 8 (drops both norm-3 neurons).

    >>> import numpy as np
    >>> w = np.diag([1.0, 2.0, 0.25])
    >>> eps, s, c = cett_threshold([[3.0, 4.0, 12.0]], w, 0.5)
    >>> float(eps), round(s, 4), round(c, 4)
    (8.0, 0.6667, 0.4685)
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"CETT target must lie in [0, 1], got {target} (the paper uses 0.2)")
    h = _as_2d(h).astype(np.float64)
    w = _check_w_down(h, w_down).astype(np.float64)
    a = neuron_output_norms(h, w)                                      # (N, F) output norms
    values = np.unique(a[a > 0])                                       # sorted distinct candidates
    candidates = np.append(values, np.inf)                             # eps = inf drops everything

    def score(t: float) -> float:
        return cett(h, w, t)

    lo, hi = -1, len(candidates) - 1            # candidates[lo] feasible (lo=-1: t=0), find largest
    if score(candidates[hi]) <= target:
        lo = hi
    else:
        while hi - lo > 1:                      # invariant: lo feasible, hi infeasible
            mid = (lo + hi) // 2
            if score(candidates[mid]) <= target:
                lo = mid
            else:
                hi = mid
    t = 0.0 if lo < 0 else float(candidates[lo])
    sparsity = float(np.count_nonzero((a < t) | (h == 0)) / a.size)
    return t, sparsity, score(t) if t > 0 else 0.0


# --------------------------------------------------------------------------------------
# TEAL: calibrated magnitude thresholds on a projection's input
# --------------------------------------------------------------------------------------
def teal_threshold(x, sparsity: float) -> float:
    """The ``s``-quantile of ``|x|``: zeroing ``|x| < t`` drops a share ``s`` of the inputs.

    >>> teal_threshold([[-4.0, 1.0, 2.0, -3.0]], 0.5)
    2.5
    """
    s = _check_sparsity(sparsity)
    x = np.asarray(x)
    if x.size == 0:
        raise ValueError("cannot calibrate a TEAL threshold on an empty array")
    if s == 0.0:
        return 0.0
    return float(np.quantile(np.abs(x).astype(np.float64).ravel(), s))


def teal_thresholds(inputs: Dict[str, Array], sparsity: float) -> Dict[str, float]:
    """One threshold per projection from its calibration inputs.

    ``inputs`` maps a projection name (e.g. ``"layers.0.feed_forward.w_gate"``) to samples of
    that projection's input (tokens, in_features); gate and up share their input ``x``, down's
    input is ``h``.
    """
    return {name: teal_threshold(x, sparsity) for name, x in inputs.items()}
