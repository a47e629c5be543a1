"""Neuron statistics: how often each neuron fires, hot vs cold neurons, reuse across tokens.

PowerInfer (Song et al. 2023) observed that neuron activation follows a power law: a small
set of *hot* neurons fires on most tokens while most neurons are *cold*; it keeps the hot
ones on the GPU. Deja Vu (Liu et al. 2023) and LLM in a Flash (Alizadeh et al. 2023) use
the slowly drifting active set between consecutive tokens. These functions measure both
on counts that :class:`minisparse.sparsity.Recorder` accumulates, or on a boolean
activity matrix.

Dimension key: T tokens (in order), F FFN neurons.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

Array = np.ndarray

__all__ = ["activation_frequency", "hot_cold_ranking", "coverage", "coverage_curve", "neurons_for_coverage",
           "consecutive_reuse", "powerlaw_slope"]


def activation_frequency(active) -> Array:
    """(F,) share of tokens on which each neuron is active, from a (T, F) boolean matrix.

    >>> activation_frequency([[True, False], [True, True]]).tolist()
    [1.0, 0.5]
    """
    a = np.asarray(active, dtype=bool)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"active must be a non-empty (tokens, neurons) boolean array, got shape {a.shape}")
    return a.mean(axis=0)


def hot_cold_ranking(counts) -> Array:
    """Neuron indices from hottest to coldest (ties: lower index first).

    >>> hot_cold_ranking([3, 10, 0, 10]).tolist()
    [1, 3, 0, 2]
    """
    c = np.asarray(counts)
    return np.argsort(-c, kind="stable")


def coverage(counts, top_fraction: float) -> float:
    """Share of all activations that the hottest ``top_fraction`` of neurons account for.

    ``counts[f]`` is how many tokens neuron f fired on. A power law shows as a large share
    from a small fraction (PowerInfer: ~20% of neurons -> ~80% of activations).
    The number of neurons is ``ceil(top_fraction * F)``.

    >>> coverage([6, 2, 1, 1], 0.25)
    0.6
    """
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]           # (F,) hottest first
    if not 0.0 <= top_fraction <= 1.0:
        raise ValueError(f"top_fraction must lie in [0, 1], got {top_fraction}")
    total = c.sum()
    if total <= 0:
        raise ValueError("no activations counted: every count is zero (record some tokens first)")
    k = int(np.ceil(top_fraction * len(c) - 1e-9))
    return float(c[:k].sum() / total)


def neurons_for_coverage(counts, share: float = 0.8) -> float:
    """Smallest fraction of neurons (hottest first) that accounts for ``share`` of all activations.

    PowerInfer's statistic: 26% / 43% / 69% of neurons cover 80% of the activations of
    OPT-30B / LLaMA2-ReGLU-70B / LLaMA2-SwiGLU-70B. ``counts[f]``: tokens neuron f fired on
    (or any non-negative weight, e.g. its summed ``|h|``). A neuron that fires on every token
    makes every neuron equal: a model without exact zeros (SwiGLU, counting ``h != 0``)
    needs ``share`` of its neurons by construction.

    >>> neurons_for_coverage([6, 2, 1, 1], 0.8)      # 6 + 2 = 8 of 10 activations: 2 of 4 neurons
    0.5
    >>> neurons_for_coverage([5] * 10, 0.8)          # equal neurons: 8 of 10
    0.8
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]           # (F,) hottest first
    total = c.sum()
    if total <= 0:
        raise ValueError("no activations counted: every count is zero (record some tokens first)")
    k = int(np.searchsorted(np.cumsum(c) / total, share - 1e-12) + 1)
    return k / len(c)


def coverage_curve(counts) -> Tuple[Array, Array]:
    """(fraction of neurons, share of activations covered), hottest first, both (F,)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = c.sum()
    if total <= 0:
        raise ValueError("no activations counted: every count is zero")
    frac = np.arange(1, len(c) + 1) / len(c)
    return frac, np.cumsum(c) / total


def consecutive_reuse(active) -> float:
    """Share of token t+1's active neurons already active at token t, over a sequence.

    ``sum_t |A_t ∩ A_{t+1}| / sum_t |A_{t+1}|`` for a (T, F) boolean matrix in token order.

    >>> consecutive_reuse([[1, 1, 0], [1, 0, 1], [1, 0, 1]])
    0.75
    """
    a = np.asarray(active, dtype=bool)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"need a (tokens >= 2, neurons) activity matrix, got shape {a.shape}")
    nxt = np.count_nonzero(a[1:])
    if nxt == 0:
        return float("nan")
    return float(np.count_nonzero(a[1:] & a[:-1]) / nxt)


def powerlaw_slope(counts) -> float:
    """Slope of log(frequency) vs log(rank) over the neurons that fired at least once.

    A straight line in the log-log rank plot is a power law; the slope is its exponent
    (more negative: more concentrated on hot neurons). Least squares in log space.
    """
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    c = c[c > 0]
    if len(c) < 2:
        return float("nan")
    r = np.arange(1, len(c) + 1)
    slope, _ = np.polyfit(np.log(r), np.log(c), 1)
    return float(slope)
