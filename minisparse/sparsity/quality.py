"""Quality under sparsification: validation loss when a rule zeroes FFN neurons.

A *rule* is an ``ffn_hook`` that returns a sparsified copy of ``h`` (never writes into it)
and counts the sparsity it produced. Rules:

* :class:`TopK` -- keep the (1 - s) share of largest ``|h|`` per token (TurboSparse's
  top-k sparsity);
* :class:`Threshold` -- zero ``|h| < t``, one t for all layers or one per layer (FATReLU-like
  magnitude pruning; CETT thresholds from :func:`calibrate_cett` plug in here);
* :class:`Mask` -- zero what a predictor says is inactive: ``fn(layer, expert, h) -> bool mask``.

:func:`evaluate_rule` gives the validation loss with a rule, on the same fixed batches as
``minisparse.train.evaluate`` (batch 16 x 128 tokens, 8 batches, seed 1234 by default);
:func:`loss_vs_sparsity` sweeps top-k sparsities (the curve TurboSparse plots);
:func:`calibrate_teal` / :func:`evaluate_teal` do TEAL's input sparsity on the FFN's three
projections.

Dimension key: N tokens, F FFN neurons, D model width, B batch, T time, V vocab.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from ..xp import to_numpy
from .metrics import cett_h_thresholds, cett_threshold, teal_threshold, topk_mask
from .recorder import Recorder, ffn_input_tap

Array = np.ndarray

__all__ = ["Rule", "TopK", "Threshold", "Mask", "evaluate_rule", "loss_vs_sparsity",
           "calibrate_cett", "calibrate_thresholds", "calibrate_teal", "evaluate_teal"]


class Rule:
    """Base class: an ``ffn_hook`` that zeroes some neurons and counts the zeros it leaves."""

    def __init__(self):
        self.n_zero = 0
        self.n_values = 0

    def mask(self, layer: int, expert: Optional[int], h: Array) -> Array:   # pragma: no cover
        raise NotImplementedError

    def __call__(self, layer: int, expert: Optional[int], h: Array) -> Array:
        keep = self.mask(layer, expert, h)                               # (N, F) bool
        out = np.where(keep, h, 0).astype(h.dtype, copy=False)           # (N, F) a new array
        self.n_zero += int(np.count_nonzero(out == 0))
        self.n_values += out.size
        return out

    @property
    def sparsity(self) -> float:
        """Share of zeros in the sparsified activations seen so far (exact zeros included)."""
        return self.n_zero / self.n_values if self.n_values else float("nan")

    def reset(self) -> None:
        self.n_zero = self.n_values = 0


class TopK(Rule):
    """Keep ``round((1 - sparsity) F)`` neurons of largest ``|h|`` per token.

    >>> r = TopK(0.5); r(0, None, np.array([[1.0, -4.0, 0.5, 3.0]])).tolist()
    [[0.0, -4.0, 0.0, 3.0]]
    """

    def __init__(self, sparsity: float):
        super().__init__()
        self.target = float(sparsity)

    def mask(self, layer, expert, h):
        return topk_mask(h, self.target)


class Threshold(Rule):
    """Zero ``|h| < t``; ``t`` a float, or a mapping ``layer -> t`` or ``(layer, expert) -> t``."""

    def __init__(self, t: Union[float, Mapping]):
        super().__init__()
        self.t = t

    def threshold(self, layer: int, expert: Optional[int]):
        """A float, or an (F,) array of per-neuron thresholds (as :func:`calibrate_cett` gives)."""
        if isinstance(self.t, Mapping):
            if (layer, expert) in self.t:
                return _t(self.t[(layer, expert)])
            if layer in self.t:
                return _t(self.t[layer])
            raise KeyError(f"no threshold for layer {layer} expert {expert}; keys: {sorted(self.t, key=str)}")
        return float(self.t)

    def mask(self, layer, expert, h):
        return np.abs(h) >= self.threshold(layer, expert)


def _t(t):
    return float(t) if np.ndim(t) == 0 else np.asarray(t, dtype=np.float64)


class Mask(Rule):
    """Zero the neurons ``fn(layer, expert, h)`` marks False (e.g. a predictor's output)."""

    def __init__(self, fn: Callable[[int, Optional[int], Array], Array]):
        super().__init__()
        self.fn = fn

    def mask(self, layer, expert, h):
        m = np.asarray(self.fn(layer, expert, h), dtype=bool)
        if m.shape != h.shape:
            raise ValueError(f"mask function returned shape {m.shape}, expected h's shape {h.shape}")
        return m


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------
def evaluate_rule(model, corpus, rule: Optional[Callable] = None, *, batch_size: int = 16,
                  seq_len: int = 128, n_batches: int = 8, seed: int = 1234) -> dict:
    """Mean validation loss with ``rule`` as the ffn_hook (None: dense), and its sparsity.

    Runs ``minisparse.train.evaluate`` (same fixed batches for a given seed), so
    ``rule=None`` gives exactly the loss the trainer reports.

    Returns ``{"loss": float, "sparsity": float}`` (sparsity nan for ``rule=None``).
    """
    from ..train import evaluate
    if isinstance(rule, Rule):
        rule.reset()
    loss = evaluate(model, corpus, batch_size=batch_size, seq_len=seq_len, n_batches=n_batches,
                    seed=seed, ffn_hook=rule)
    sparsity = rule.sparsity if isinstance(rule, Rule) else float("nan")
    return {"loss": float(loss), "sparsity": float(sparsity)}


def loss_vs_sparsity(model, corpus, sparsities: Sequence[float] = (0.0, 0.5, 0.8, 0.85, 0.9), *,
                     rule: str = "topk", **eval_kwargs) -> list:
    """Validation loss at each sparsity under ``rule`` ("topk", or "threshold": per-layer
    thresholds calibrated as quantiles of ``|h|`` on the validation batches themselves).

    Returns a list of dicts ``{"target": s, "sparsity": achieved, "loss": ...}``.

    Examples
    --------
    >>> import minisparse as ms
    >>> from minisparse.data import corpus_from_text
    >>> model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
    >>> corpus = corpus_from_text("def f(x):\\n    return x + 1\\n" * 200)
    >>> [p["target"] for p in loss_vs_sparsity(model, corpus, [0.0, 0.9], batch_size=2, seq_len=32, n_batches=1)]
    [0.0, 0.9]
    """
    out = []
    rec = None
    for s in sparsities:
        if rule == "topk":
            r = TopK(s)
        elif rule == "threshold":
            if rec is None:
                rec = Recorder(value_reservoir=50000, row_reservoir=1)
                rec.record(model, corpus, n_batches=eval_kwargs.get("n_batches", 8),
                           batch_size=eval_kwargs.get("batch_size", 16), seq_len=eval_kwargs.get("seq_len", 128),
                           seed=eval_kwargs.get("seed", 1234))
            r = Threshold(calibrate_thresholds(rec, s))
        else:
            raise ValueError(f"unknown rule {rule!r}; choose 'topk' or 'threshold'")
        res = evaluate_rule(model, corpus, r, **eval_kwargs)
        out.append({"target": float(s), "sparsity": res["sparsity"], "loss": res["loss"]})
    return out


def calibrate_thresholds(recorder: Recorder, sparsity: float) -> Dict:
    """Per-FFN threshold = the ``sparsity``-quantile of its recorded ``|h|`` sample."""
    out = {}
    for key, st in recorder.stats.items():
        out[key] = teal_threshold(st.values.sample(), sparsity)
    return out


def calibrate_cett(model, corpus=None, target: float = 0.2, *, recorder: Optional[Recorder] = None,
                   **record_kwargs) -> Dict:
    """Per-FFN CETT thresholds (ReLU^2 Wins): ``{(layer, expert): {"threshold", "eps", "sparsity", "cett"}}``.

    ``eps`` is the threshold on a neuron's output norm ``|h_f| ||w_down[f]||``; ``threshold``
    the equivalent (F,) per-neuron thresholds on ``|h|`` (``eps / ||w_down[f]||``).
    Uses the token rows in ``recorder`` (recording ``corpus`` first when none is given;
    record the *training* split to calibrate, and evaluate on validation).
    Pass ``{k: v["threshold"] for k, v in result.items()}`` to :class:`Threshold`.
    """
    if recorder is None:
        if corpus is None:
            raise ValueError("calibrate_cett needs a corpus to record, or a recorder that has recorded")
        recorder = Recorder(row_reservoir=record_kwargs.pop("row_reservoir", 512))
        recorder.record(model, corpus, **record_kwargs)
    out = {}
    for key in recorder.keys():
        w_down = to_numpy(model.ffn_weights(*key).w_down)
        t, s, c = cett_threshold(recorder.stats[key].rows.sample(), w_down, target)
        out[key] = {"threshold": cett_h_thresholds(w_down, t), "eps": t, "sparsity": s, "cett": c}
    return out


# ------------------------------------------------------------------------------------------
# TEAL: input sparsity of the FFN's projections
# ------------------------------------------------------------------------------------------
def calibrate_teal(model, corpus, sparsity: float, *, n_batches: int = 4, batch_size: int = 8,
                   seq_len: int = 128, seed: int = 4321, split: str = "train") -> Dict[str, float]:
    """TEAL thresholds for every dense FFN projection, calibrated on held-out text.

    Returns ``{param name: t}`` for ``layers.{i}.feed_forward.w_gate`` / ``w_up`` (input: the
    normed hidden state x) and ``w_down`` (input: h). Gate and up read the same x, so they
    get the same threshold. Calibration uses ``split`` ("train" by default, so that the
    validation batches used to score it stay unseen) and a seed different from evaluation's.
    """
    rec = Recorder(value_reservoir=50000, row_reservoir=2048, capture_inputs=True, seed=seed)
    rec.record(model, corpus, split=split, n_batches=n_batches, batch_size=batch_size, seq_len=seq_len, seed=seed)
    out = {}
    for layer, res in sorted(rec.inputs.items()):
        pre = f"layers.{layer}.feed_forward."
        if (layer, None) not in rec.stats:
            continue  # MoE layer: TEAL on experts is not implemented
        t_x = teal_threshold(res.sample(), sparsity)
        out[pre + "w_gate"] = t_x
        if model.act.gated:
            out[pre + "w_up"] = t_x
        out[pre + "w_down"] = teal_threshold(rec.stats[(layer, None)].values.sample(), sparsity)
    return out


def evaluate_teal(model, corpus, thresholds: Mapping[str, float], **eval_kwargs) -> dict:
    """Validation loss with TEAL: FFN inputs ``|x| < t_gate`` and ``|h| < t_down`` zeroed.

    Returns ``{"loss", "input_sparsity" (of x), "sparsity" (of h after its threshold)}``.
    """
    counts = {"zero": 0, "n": 0}

    def sparsify_x(layer: int, x2: Array):
        key = f"layers.{layer}.feed_forward.w_gate"
        if key not in thresholds:
            return None
        out = np.where(np.abs(x2) >= thresholds[key], x2, 0).astype(x2.dtype, copy=False)   # (N, D)
        counts["zero"] += int(np.count_nonzero(out == 0))
        counts["n"] += out.size
        return out

    down = Threshold({int(k.split(".")[1]): v for k, v in thresholds.items() if k.endswith("w_down")})
    with ffn_input_tap(model, sparsify_x):
        res = evaluate_rule(model, corpus, down, **eval_kwargs)
    res["input_sparsity"] = counts["zero"] / counts["n"] if counts["n"] else float("nan")
    return res
