"""Plots of sparsity measurements (matplotlib, imported lazily, Agg backend: files only).

Each function takes plain data (dicts of lists/arrays keyed by a model's name), writes one
PNG and returns its path. ``pip install 'minisparse[plot]'`` provides matplotlib.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Sequence

import numpy as np

__all__ = ["plot_loss_curves", "plot_sparsity_per_layer", "plot_loss_vs_sparsity",
           "plot_neuron_frequency", "plot_activation_histograms", "plot_seed_bands"]


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'minisparse[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def plot_loss_curves(histories: Mapping[str, Sequence[dict]], path, smooth: int = 20,
                     title: str = "training loss") -> Path:
    """Training loss (moving average over ``smooth`` steps) and validation points per model.

    ``histories[name]`` is a list of ``minisparse.train`` records (``step``, ``loss``,
    optionally ``val_loss``); records may carry ``step_offset`` to place a continued run
    (ReLUfication) after its parent.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, hist in histories.items():
        if not hist:
            continue
        off = hist[0].get("step_offset", 0)
        steps = np.array([r["step"] + 1 + off for r in hist])
        loss = np.array([r["loss"] for r in hist])
        k = max(1, min(smooth, len(loss)))
        ma = np.convolve(loss, np.ones(k) / k, mode="valid")
        line, = ax.plot(steps[k - 1:], ma, lw=1.2, label=name)
        ev = [r for r in hist if "val_loss" in r]
        if ev:
            ax.plot([r["step"] + 1 + off for r in ev], [r["val_loss"] for r in ev], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title + " (dots: validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sparsity_per_layer(per_layer: Mapping[str, Sequence[float]], path,
                            ylabel: str = "exact-zero fraction of h", title: str = "sparsity per layer") -> Path:
    """Grouped bars: one group per layer, one bar per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    names = list(per_layer)
    n_layers = max((len(v) for v in per_layer.values()), default=0)
    w = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        v = np.asarray(per_layer[name], dtype=float)
        ax.bar(np.arange(len(v)) + j * w - 0.4 + w / 2, v, width=w, label=name)
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_sparsity(curves: Mapping[str, Sequence[dict]], path,
                          title: str = "validation loss under top-k sparsity") -> Path:
    """Loss against the sparsity a rule achieved; ``curves[name]`` = [{"sparsity", "loss"}, ...]."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, pts in curves.items():
        s = [p.get("target", p["sparsity"]) for p in pts]
        ax.plot(np.array(s) * 100, [p["loss"] for p in pts], "o-", label=name)
    ax.set_xlabel("top-k sparsity (% of neurons zeroed per token)")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_seed_bands(x: Sequence[float], series: Mapping[str, np.ndarray], path, *, xlabel: str, ylabel: str,
                    title: str = "", reference: Mapping[str, Sequence[float]] = None, logy: bool = False) -> Path:
    """Mean over seeds with a +-1 sd band per series; ``series[name]`` is (seeds, len(x)).

    ``reference[name]``: published values at the same ``x``, drawn dashed (e.g. a paper's table).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs = np.asarray(x, dtype=float)
    for name, ys in series.items():
        ys = np.atleast_2d(np.asarray(ys, dtype=float))               # (seeds, len(x))
        m = ys.mean(axis=0)
        line, = ax.plot(xs, m, "o-", label=f"{name} ({ys.shape[0]} seed{'s' if ys.shape[0] > 1 else ''})")
        if ys.shape[0] > 1:
            sd = ys.std(axis=0, ddof=1)
            ax.fill_between(xs, m - sd, m + sd, color=line.get_color(), alpha=0.2)
    for name, ys in (reference or {}).items():
        ax.plot(xs, ys, "s--", alpha=0.7, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_neuron_frequency(freqs: Mapping[str, np.ndarray], path,
                          title: str = "neuron activation frequency (rank, log-log)") -> Path:
    """Activation frequency of every neuron sorted hottest first, log-log (PowerInfer's plot)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, f in freqs.items():
        f = np.sort(np.asarray(f, dtype=float).ravel())[::-1]
        f = f[f > 0]
        if len(f):
            ax.loglog(np.arange(1, len(f) + 1), f, lw=1.2, label=name)
    ax.set_xlabel("neuron rank (hottest first)")
    ax.set_ylabel("share of tokens the neuron fires on")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_activation_histograms(samples: Mapping[str, np.ndarray], path, bins: int = 60,
                               title: str = "distribution of |h| (exact zeros at the left edge)") -> Path:
    """Histograms of sampled ``|h|`` on log-spaced bins; exact zeros are shown in a first bin."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    pos = [np.asarray(v, dtype=float) for v in samples.values()]
    allpos = np.concatenate([v[v > 0] for v in pos]) if pos else np.array([])
    if allpos.size == 0:
        allpos = np.array([1e-6, 1.0])
    # the 0.1%..100% range of the nonzero values (a few denormal-small values would squash the plot)
    lo, hi = np.log10(max(np.quantile(allpos, 0.001), 1e-12)), np.log10(allpos.max())
    edges = np.logspace(lo, hi + 1e-9, bins)
    zero_x = 10 ** (lo - 0.5)
    for name, v in samples.items():
        v = np.asarray(v, dtype=float)
        zeros = np.count_nonzero(v == 0) / max(v.size, 1)
        cnt, _ = np.histogram(np.clip(v[v > 0], edges[0], edges[-1]), bins=edges)
        line, = ax.step(edges[:-1], cnt / max(v.size, 1), where="post",
                        label=f"{name} ({zeros:.0%} exact zeros)")
        ax.bar([zero_x], [zeros], width=zero_x * 0.8, color=line.get_color(), alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("|h|")
    ax.set_ylabel("share of values")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
