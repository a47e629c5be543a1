"""Deterministic FFN problems with an exactly chosen set of active neurons (tests and benchmarks).

How the sparsity is made exact: the first input feature is a constant 1 (a "bias feature",
``x[:, 0] = 1``), so ``w_gate[f, 0]`` acts as neuron f's bias. For an *inactive* neuron
the bias is set to ``-(max_t |x_t[1:] . w_gate[f, 1:]| + margin)``, so its gate
pre-activation is <= -margin for every token and ``relu`` gives exactly 0. For an
*active* neuron one token ``t_f`` is drawn and the bias is set so that token's gate equals
``+margin``: the neuron is active for at least that token (others are left to chance).
The union of active neurons over the tokens is therefore exactly the chosen set, whatever
dim (even 1), ffn_dim or number of tokens.

Dimension keys: T tokens, D model dim, F ffn neurons, A active neurons.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..activations import get_activation


def make_ffn(dim: int, ffn_dim: int, *, tokens: int = 1, sparsity: float = 0.9, activation="drelu",
             dtype=np.float32, seed: int = 0, margin: float = 0.25, n_active: Optional[int] = None) -> dict:
    """Random x and neuron-major FFN weights with an exact union of gate-active neurons.

    Parameters
    ----------
    dim, ffn_dim : D and F.
    tokens : T.
    sparsity : fraction of the F neurons whose gate is negative for every token
        (``n_active = round((1 - sparsity) * F)``, unless ``n_active`` is given).
    activation : decides whether ``w_up`` is made (gated) or None (plain).
    dtype : of every array (float16 weights come with a float32 ``x``).
    margin : distance of the gate pre-activations from zero (in units of a typical
        pre-activation), so that rounding in any backend cannot flip a neuron.

    Returns
    -------
    dict with ``x`` (T, D), ``w_gate``, ``w_up`` (or None), ``w_down`` (F, D) and
    ``active`` (A,) int64: the sorted union of gate-active neurons.

    Examples
    --------
    >>> p = make_ffn(33, 70, tokens=3, sparsity=0.9, seed=1)
    >>> int(p["active"].size), p["x"].shape, p["w_gate"].shape
    (7, (3, 33), (70, 33))
    """
    act = get_activation(activation)
    D, F, T = int(dim), int(ffn_dim), int(tokens)
    if D < 1 or F < 1 or T < 1:
        raise ValueError(f"dim, ffn_dim and tokens must be >= 1, got {D}, {F}, {T}")
    if n_active is None:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        n_active = int(round((1.0 - sparsity) * F))
    if not 0 <= n_active <= F:
        raise ValueError(f"n_active must be in [0, {F}], got {n_active}")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D))                                       # (T, D)
    x[:, 0] = 1.0                                                     # the bias feature
    scale = 1.0 / np.sqrt(D)
    w_gate = rng.normal(scale=scale, size=(F, D))                     # (F, D)
    rest = x[:, 1:] @ w_gate[:, 1:].T                                 # (T, F) pre-activation without bias
    typical = 1.0 if D > 1 else scale
    active = np.sort(rng.choice(F, size=n_active, replace=False)).astype(np.int64)  # (A,)
    is_active = np.zeros(F, dtype=bool)
    is_active[active] = True
    # inactive: every token's gate <= -margin
    w_gate[:, 0] = -(np.abs(rest).max(axis=0) + margin * typical)
    # active: token t_f's gate = +margin
    owner = rng.integers(0, T, size=F)                                # (F,)
    w_gate[is_active, 0] = -rest[owner[is_active], np.flatnonzero(is_active)] + margin * typical
    w_up = rng.normal(scale=scale, size=(F, D)) if act.gated else None
    w_down = rng.normal(scale=1.0 / np.sqrt(max(n_active, 1)), size=(F, D))
    wdt = np.dtype(dtype)
    xdt = np.float32 if wdt == np.float16 else wdt
    return dict(x=x.astype(xdt), w_gate=w_gate.astype(wdt), w_up=None if w_up is None else w_up.astype(wdt),
                w_down=w_down.astype(wdt), active=active)


def dense_ffn(x, w_gate, w_up, w_down, activation) -> np.ndarray:
    """The plain dense FFN in float64, the outside truth for every backend.

    ``act(x W_gate^T, x W_up^T) @ W_down`` with no skipping at all.
    """
    act = get_activation(activation)
    x = np.asarray(x, dtype=np.float64)
    g = x @ np.asarray(w_gate, dtype=np.float64).T                    # (T, F)
    u = x @ np.asarray(w_up, dtype=np.float64).T if act.gated else None  # (T, F)
    return act.forward(g, u) @ np.asarray(w_down, dtype=np.float64)   # (T, D)
