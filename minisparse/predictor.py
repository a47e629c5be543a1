"""Activation predictors: which FFN neurons will fire for a token, before computing them.

Deja Vu (Liu et al. 2023) and PowerInfer (Song et al. 2023) put a small low-rank MLP in
front of each FFN::

    p(x) = sigmoid(fc2(relu(fc1(x))))        fc1: D -> r,  fc2: r -> F        (N, F)

trained on recorded (FFN input, neuron-is-nonzero) pairs. At decode time the FFN then
computes gate, up and down only for the neurons with ``p > threshold``
(``sparse_ffn(..., active=...)``), so even the gate projection is skipped: the ideal
speed-up becomes ``3 / (3a + c)`` with ``c`` the predictor's cost (:meth:`Predictor.cost`).

Training is NumPy with a hand-written backward and Adam, on a class-weighted binary
cross-entropy (most neurons are zero; without weights the predictor learns "always 0"):

    L = mean( w_pos * y * softplus(-z) + w_neg * (1 - y) * softplus(z) ),   z = logits

The threshold trades recall (missed neurons change the output) against precision
(extra neurons cost time): :func:`tune_threshold` picks the largest threshold that keeps
a target recall on held-out data. :func:`loss_change` reports how much the validation
loss moves when every FFN uses its predicted mask.

One predictor per dense layer, and per expert in MoE layers (key ``(layer, expert)``,
expert None for a dense FFN, -1 for the shared experts).

Dimension keys: N tokens, D model dim, F ffn neurons, R predictor rank.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from .xp import array_module, to_device, to_numpy

Array = np.ndarray
Key = Tuple[int, Optional[int]]


# ======================================================================================
# the predictor: fc2(relu(fc1(x))), forward and backward side by side
# ======================================================================================
@dataclass
class Predictor:
    """Low-rank MLP predicting which of the F neurons of one FFN are nonzero.

    Parameters
    ----------
    w1 (D, R), b1 (R,), w2 (R, F), b2 (F,) : weights (float32).
    threshold : probability above which a neuron is predicted active.

    Examples
    --------
    >>> p = Predictor.init(dim=8, ffn_dim=16, rank=4, seed=0)
    >>> p.predict(np.ones((3, 8), np.float32)).shape
    (3, 16)
    """

    w1: Array
    b1: Array
    w2: Array
    b2: Array
    threshold: float = 0.5
    metrics: dict = field(default_factory=dict)
    _device: dict = field(default_factory=dict, repr=False, compare=False)   # xp -> weight copies

    @classmethod
    def init(cls, dim: int, ffn_dim: int, rank: int = 32, seed: int = 0) -> "Predictor":
        rng = np.random.default_rng(seed)
        w1 = (rng.normal(size=(dim, rank)) / np.sqrt(dim)).astype(np.float32)
        w2 = (rng.normal(size=(rank, ffn_dim)) / np.sqrt(rank)).astype(np.float32)
        return cls(w1, np.zeros(rank, np.float32), w2, np.zeros(ffn_dim, np.float32))

    @property
    def dim(self) -> int:
        return self.w1.shape[0]

    @property
    def ffn_dim(self) -> int:
        return self.w2.shape[1]

    @property
    def rank(self) -> int:
        return self.w1.shape[1]

    def cost(self) -> float:
        """Predictor weights read per token, in units of one FFN weight matrix (F*D)."""
        return (self.dim * self.rank + self.rank * self.ffn_dim) / (self.dim * self.ffn_dim)

    def weights_on(self, xp):
        """(w1, b1, w2, b2) as arrays of module ``xp`` (copies on the GPU are made once, kept)."""
        if xp is np:
            return self.w1, self.b1, self.w2, self.b2
        if xp not in self._device:
            self._device[xp] = tuple(to_device(w, xp) for w in (self.w1, self.b1, self.w2, self.b2))
        return self._device[xp]

    def forward(self, x: Array):
        """Logits z (N, F) and the cache of the backward; x (N, D), NumPy or CuPy."""
        xp = array_module(x)
        x = (x if hasattr(x, "astype") else np.asarray(x)).astype(self.w1.dtype, copy=False)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"predictor input must be (N, dim={self.dim}), got shape {x.shape}")
        w1, b1, w2, b2 = self.weights_on(xp)
        z1 = x @ w1 + b1                                              # (N, R)
        a1 = np.maximum(z1, 0)                                        # (N, R)
        z2 = a1 @ w2 + b2                                             # (N, F)
        return z2, (x, z1, a1)

    def backward(self, dz2: Array, cache):
        """dL/dz2 (N, F) -> gradients of w1, b1, w2, b2."""
        x, z1, a1 = cache
        dw2 = a1.T @ dz2                                              # (R, F)
        db2 = dz2.sum(axis=0)                                         # (F,)
        da1 = dz2 @ self.w2.T                                         # (N, R)
        dz1 = da1 * (z1 > 0)                                          # (N, R)
        dw1 = x.T @ dz1                                               # (D, R)
        db1 = dz1.sum(axis=0)                                         # (R,)
        return {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}

    def predict_proba(self, x: Array) -> Array:
        """P(neuron active) (N, F)."""
        z, _ = self.forward(np.atleast_2d(x))
        return _sigmoid(z)

    def predict(self, x: Array, threshold: Optional[float] = None) -> Array:
        """Boolean mask (N, F): neurons predicted active for each token."""
        t = self.threshold if threshold is None else threshold
        z, _ = self.forward(np.atleast_2d(x))
        return z > _logit(t)                                          # same as sigmoid(z) > t

    def active(self, x: Array) -> Array:
        """Sorted indices (A,) of the neurons predicted active for *any* of the tokens in x."""
        return np.flatnonzero(self.active_mask(x))

    def active_mask(self, x: Array) -> Array:
        """Boolean mask (F,) of the neurons predicted active for any token of x (on x's device)."""
        return self.predict(x).any(axis=0)


def _sigmoid(z: Array) -> Array:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return float(np.log(p) - np.log1p(-p))


# ======================================================================================
# class-weighted binary cross-entropy (with logits), forward and backward
# ======================================================================================
def _softplus(z: Array) -> Array:
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def bce_forward(z: Array, y: Array, w_pos: float, w_neg: float) -> float:
    """mean(w_pos * y * softplus(-z) + w_neg * (1 - y) * softplus(z)) over all N*F entries."""
    y = y.astype(z.dtype)
    return float(np.mean(w_pos * y * _softplus(-z) + w_neg * (1 - y) * _softplus(z)))


def bce_backward(z: Array, y: Array, w_pos: float, w_neg: float) -> Array:
    """dL/dz (N, F) of :func:`bce_forward`."""
    y = y.astype(z.dtype)
    s = _sigmoid(z)
    return (w_pos * y * (s - 1) + w_neg * (1 - y) * s) / z.size


def class_weights(y: Array) -> Tuple[float, float]:
    """Balanced weights: each class contributes half of the loss (w = 0.5 / class share)."""
    p = float(np.clip(np.mean(y), 1e-6, 1 - 1e-6))
    return 0.5 / p, 0.5 / (1 - p)


# ======================================================================================
# training (Adam) and evaluation
# ======================================================================================
def train_predictor(x: Array, y: Array, *, rank: int = 32, epochs: int = 30, lr: float = 3e-3,
                    batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0,
                    verbose: bool = False) -> Predictor:
    """Fit fc2(relu(fc1(x))) to boolean labels y (N, F) = "neuron nonzero" for inputs x (N, D).

    Adam (Kingma & Ba 2015; :class:`minisparse.train.AdamW`, decoupled ``weight_decay``
    on w1 and w2) with the class-weighted BCE above; rank is clipped to min(D, F).
    Training runs on the host. Returns the predictor (threshold 0.5; see
    :func:`tune_threshold`).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(512, 8)).astype(np.float32)
    >>> w = rng.normal(size=(8, 16))
    >>> y = x @ w > 0.5                                              # a learnable rule
    >>> p = train_predictor(x, y, rank=8, epochs=40, lr=1e-2)
    >>> t = tune_threshold(p, x, y, target_recall=0.95)
    >>> float(evaluate(p, x, y)["recall"]) >= 0.95
    True
    """
    from .train import AdamW
    x = to_numpy(x).astype(np.float32, copy=False)
    y = to_numpy(y).astype(bool, copy=False)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x (N, D) and y (N, F) with the same N, got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        raise ValueError("no training examples (N = 0): record some tokens first")
    N, D = x.shape
    F = y.shape[1]
    pred = Predictor.init(D, F, max(1, min(rank, D, F)), seed)
    w_pos, w_neg = class_weights(y)
    rng = np.random.default_rng(seed + 1)
    params = {k: getattr(pred, k) for k in ("w1", "b1", "w2", "b2")}   # the predictor's own arrays
    opt = AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for epoch in range(epochs):
        order = rng.permutation(N)
        total = 0.0
        for s in range(0, N, batch_size):
            bi = order[s:s + batch_size]
            z, cache = pred.forward(x[bi])                            # (B, F)
            total += bce_forward(z, y[bi], w_pos, w_neg) * bi.size
            grads = pred.backward(bce_backward(z, y[bi], w_pos, w_neg), cache)
            opt.step(params, {k: g.astype(np.float32, copy=False) for k, g in grads.items()})
        if verbose:
            print(f"  epoch {epoch + 1}/{epochs}: weighted BCE {total / N:.4f}")
    return pred


def evaluate(pred: Predictor, x: Array, y: Array, threshold: Optional[float] = None) -> dict:
    """recall, precision, predicted and true sparsity of predictions on (x, y)."""
    y = np.asarray(y, dtype=bool)
    m = pred.predict(x, threshold)                                    # (N, F)
    tp = int((m & y).sum())
    pos, npred = int(y.sum()), int(m.sum())
    return dict(recall=tp / pos if pos else 1.0, precision=tp / npred if npred else 1.0,
                predicted_sparsity=1.0 - npred / m.size, true_sparsity=1.0 - pos / y.size,
                threshold=pred.threshold if threshold is None else threshold, n=int(y.shape[0]))


def tune_threshold(pred: Predictor, x: Array, y: Array, target_recall: float = 0.99) -> float:
    """The largest threshold whose recall on (x, y) is >= target_recall; sets pred.threshold."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    y = np.asarray(y, dtype=bool)
    z, _ = pred.forward(np.atleast_2d(x))
    z = z.astype(np.float64)[y]                                       # logits of true positives
    if z.size == 0:
        pred.threshold = 0.5
        return pred.threshold
    k = int(np.floor((1 - target_recall) * z.size))                   # positives we may miss
    zt = float(np.sort(z)[k])                                         # keep z >= zt ...
    zt -= 1e-6 * max(1.0, abs(zt))                                    # ... as z > zt' (in logit space:
    pred.threshold = float(_sigmoid(np.float64(zt)))                  # float32 probabilities saturate)
    return pred.threshold


# ======================================================================================
# recording FFN inputs and labels from a model, and decoding with predicted masks
# ======================================================================================
@contextmanager
def _tap(model, make_hook):
    """Run the model's FFNs with ``hook = make_hook(layer, x2)``; restores the model.

    The hook is called ``hook(layer, expert, h, rows)``: the model passes MoE experts the
    token rows they were routed (``rows`` is None for a dense FFN), so the tap pairs each
    h with its inputs without running the router again.
    """
    def tapped(ffn, i, x2, hook, train):
        return ffn(i, x2, make_hook(i, x2), train)

    with model.wrap_ffn(tapped):
        yield model


def _inputs_of(x2: Array, rows) -> Array:
    return x2 if rows is None else x2[rows]


def record(model, token_batches: Iterable, threshold: float = 0.0) -> Dict[Key, Tuple[Array, Array]]:
    """FFN inputs x (N, D) and labels y = |h| > threshold (N, F) of every FFN, by (layer, expert).

    ``token_batches``: int arrays (B, T) (or one such array). Labels are of the
    *activation output* h: for drelu a neuron counts only if both gate and up fire.
    The pairs are returned as NumPy arrays (copied from the GPU for a model there).
    """
    if isinstance(token_batches, np.ndarray):
        token_batches = [token_batches]
    xs: Dict[Key, list] = {}
    ys: Dict[Key, list] = {}

    def make_hook(layer, x2):
        def hook(lyr, expert, h, rows=None):
            key = (lyr, expert)
            xs.setdefault(key, []).append(to_numpy(_inputs_of(x2, rows).astype(np.float32)))
            ys.setdefault(key, []).append(to_numpy(np.abs(h) > threshold))
            return None
        return hook

    with _tap(model, make_hook):
        for toks in token_batches:
            model.forward(np.asarray(toks))
    return {k: (np.concatenate(xs[k]), np.concatenate(ys[k])) for k in xs}


class PredictorSet(dict):
    """Predictors keyed by (layer, expert); ``report()`` lists their held-out metrics."""

    def report(self) -> list:
        return [dict(layer=k[0], expert=k[1], rank=p.rank, cost=p.cost(), **p.metrics)
                for k, p in sorted(self.items(), key=lambda kv: (kv[0][0], -2 if kv[0][1] is None else kv[0][1]))]


def fit_predictors(model, token_batches, *, rank: int = 32, epochs: int = 30, lr: float = 3e-3,
                   batch_size: int = 256, target_recall: float = 0.99, val_frac: float = 0.2,
                   seed: int = 0, verbose: bool = False) -> PredictorSet:
    """Record the model's FFNs on ``token_batches``, train one predictor per FFN, tune thresholds.

    A fraction ``val_frac`` of the recorded tokens is held out: the threshold is tuned
    for ``target_recall`` on it and the metrics (recall, precision, predicted sparsity)
    reported there (``PredictorSet.report()``).
    """
    data = record(model, token_batches)
    out = PredictorSet()
    rng = np.random.default_rng(seed)
    for key, (x, y) in sorted(data.items(), key=lambda kv: str(kv[0])):
        n = x.shape[0]
        perm = rng.permutation(n)
        n_val = int(round(val_frac * n)) if n > 1 else 0
        val, tr = perm[:n_val], perm[n_val:]
        if tr.size == 0:
            continue
        p = train_predictor(x[tr], y[tr], rank=rank, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        xv, yv = (x[val], y[val]) if val.size else (x[tr], y[tr])
        tune_threshold(p, xv, yv, target_recall)
        p.metrics = evaluate(p, xv, yv)
        out[key] = p
        if verbose:
            m = p.metrics
            print(f"layer {key[0]} expert {key[1]}: recall {m['recall']:.3f} precision {m['precision']:.3f} "
                  f"predicted sparsity {m['predicted_sparsity']:.3f} (true {m['true_sparsity']:.3f})")
    return out


def loss_with_predictors(model, predictors: Dict[Key, Predictor], tokens, targets=None) -> float:
    """Cross-entropy when each FFN keeps only its predicted neurons (per token).

    Evaluated through the model's ffn_hook: h (N, F) is multiplied by the predicted mask
    of each token, which is exactly what ``sparse_ffn(x_t, ..., active=mask_t)`` computes.
    FFNs without a predictor run dense.
    """
    def make_hook(layer, x2):
        def hook(lyr, expert, h, rows=None):
            p = predictors.get((lyr, expert))
            if p is None:
                return None
            return h * p.predict(_inputs_of(x2, rows))
        return hook

    with _tap(model, make_hook):
        return float(model.loss(tokens, targets))


def loss_change(model, predictors: Dict[Key, Predictor], tokens, targets=None) -> dict:
    """Validation loss dense vs with predicted masks: dict(dense, predicted, delta)."""
    dense = float(model.loss(tokens, targets))
    pred = loss_with_predictors(model, predictors, tokens, targets)
    return dict(dense=dense, predicted=pred, delta=pred - dense)


@contextmanager
def predicted_decoding(model, predictors: Dict[Key, Predictor], backend: str = "numpy"):
    """Inside the block, every dense FFN of ``model`` runs ``sparse_ffn(..., active=...)``.

    The predictor chooses the neurons (union over the tokens of the call: one token per
    decode step), and gate, up and down are computed for those rows only, on ``backend``.
    ``model.ffn_stats`` records each call (``predicted=True``). MoE layers, and layers
    without a predictor, run as usual.

    >>> import minisparse as ms
    >>> m = ms.Transformer(ms.preset("nano", activation="relu"), seed=0)
    >>> ps = fit_predictors(m, np.array([[1, 2, 3, 4, 5, 6]]), rank=4, epochs=2)
    >>> with predicted_decoding(m, ps):
    ...     len(ms.generate(m, [256], max_new_tokens=3, temperature=0))
    3
    """
    from .kernels import sparse_ffn
    from .model import FFNOut

    def predicted(ffn, i, x2, hook, train):
        p = predictors.get((i, None))
        if train or hook is not None or p is None or model.config.is_moe_layer(i):
            return ffn(i, x2, hook, train)
        wg, wu, wd = model.ffn_weights(i)
        stats: dict = {}
        y = sparse_ffn(x2, wg, wu, wd, model.act, backend=backend,
                       active=p.active_mask(x2), stats=stats)         # (N, D); the mask stays on x2's device
        model.ffn_stats.append(dict(layer=i, **stats))
        return y, FFNOut("kernel", None)

    with model.wrap_ffn(predicted):
        yield model


__all__ = ["Predictor", "PredictorSet", "train_predictor", "evaluate", "tune_threshold", "record",
           "fit_predictors", "loss_with_predictors", "loss_change", "predicted_decoding",
           "bce_forward", "bce_backward", "class_weights"]
