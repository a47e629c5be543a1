"""Training: AdamW, the learning-rate schedule, gradient clipping and accumulation, the loop.

* AdamW: Adam (Kingma & Ba 2015) with decoupled weight decay (Loshchilov & Hutter 2019),
  written with PyTorch's ``torch.optim.AdamW`` update order so both give the same numbers.
  Norm weights and biases (1-D parameters) are not decayed.
* Schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio`` (as in nanoGPT).
* Global-norm gradient clipping (Pascanu et al. 2013) and gradient accumulation.
* ``l1``: ProSparse's activation penalty ``l1 * sum_f |h_f|`` per token and FFN (Song et al. 2024).

Exact resume: the model, the optimizer moments, the step and the state of the batch
generator are checkpointed, so training k steps, saving, loading and training on to N
gives the same losses, step for step, as training N steps in one go.

The module is callable: ``minisparse.train(model, corpus, cfg)`` calls :func:`train`, whatever
was imported first (``import minisparse.train as T; T.TrainConfig`` works too).

Dimension key: B batch, T time.
"""
from __future__ import annotations

import inspect
import json
import math
import sys
import time
import types
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .data import Corpus
from .model import Transformer
from .runtime import (auto_threads, blas_threads_limited, configure_training, keep_freed_memory,  # noqa: F401
                      set_blas_threads, set_training_threads, training_workers)
from .xp import array_module, to_device, to_numpy

Array = np.ndarray


# ======================================================================================
# configuration
# ======================================================================================
@dataclass
class TrainConfig:
    """How to train (the model's shape lives in :class:`~minisparse.config.ModelConfig`).

    >>> TrainConfig(steps=10, warmup=2).tokens_per_step
    2048
    """

    steps: int = 300                 # optimizer steps
    batch_size: int = 16             # sequences per micro-batch
    seq_len: int = 128               # tokens per sequence
    lr: float = 3e-3                 # peak learning rate
    min_lr_ratio: float = 0.1        # the cosine decays to lr * min_lr_ratio
    warmup: int = 30                 # linear-warmup steps
    weight_decay: float = 0.1        # AdamW decoupled weight decay (not on norms and biases)
    betas: Tuple[float, float] = (0.9, 0.95)  # Adam moment decay rates
    eps: float = 1e-8                # Adam epsilon
    grad_clip: float = 1.0           # global gradient-norm clip (0 = off)
    grad_accum: int = 1              # micro-batches per optimizer step
    eval_every: int = 100            # validate every this many steps (0 = only at the end)
    eval_batches: int = 8            # validation batches per evaluation
    seed: int = 0                    # seed of the batch sampler
    l1: float = 0.0                  # ProSparse activation penalty l1 * sum_f |h_f| per token, each FFN
    log_every: int = 10              # plain-text progress line every this many steps (no tqdm)
    progress: bool = True            # show a progress bar (tqdm) or plain lines
    out_dir: Optional[str] = None    # where to write checkpoint, metrics.jsonl, loss curve
    save_every: int = 0              # also checkpoint every this many steps (0 = only at the end)

    def __post_init__(self) -> None:
        def bad(name, msg):
            raise ValueError(f"TrainConfig.{name}: {msg}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                bad(name, f"must be a positive int, got {v!r}")
        for name in ("warmup", "eval_every", "log_every", "save_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                bad(name, f"must be an int >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            bad("lr", f"must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            bad("eps", f"must be > 0, got {self.eps!r}")
        if self.grad_clip < 0:
            bad("grad_clip", f"must be >= 0 (0 = no clipping), got {self.grad_clip!r}")
        if self.l1 < 0:
            bad("l1", f"must be >= 0, got {self.l1!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warmup to ``cfg.lr``, then cosine decay.

    step < warmup: lr * (step + 1) / warmup; afterwards
    lr * (r + (1 - r) * (1 + cos(pi * progress)) / 2), r = min_lr_ratio, progress going
    from 0 at the end of warmup to 1 at the last step.

    >>> cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    >>> lr_at(0, cfg), lr_at(9, cfg), round(lr_at(99, cfg), 6)
    (0.1, 1.0, 0.1)
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / decay_steps)
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


# ======================================================================================
# AdamW
# ======================================================================================
def decays(shape) -> bool:
    """Weight decay applies to matrices only (by shape): not to norm weights, biases (1-D)."""
    return len(shape) >= 2


class AdamW:
    """AdamW with decoupled weight decay, in place on a dict of NumPy (or CuPy) arrays.

    For each parameter p with gradient g, at step t (1-based)::

        p <- p * (1 - lr * wd)                  (matrices only)
        m <- b1 m + (1 - b1) g
        v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    which is ``torch.optim.AdamW``'s update. Moments are kept in the parameters' dtype.

    The moments of all parameters of one dtype live in one flat buffer each
    (``exp_avg[name]`` is a view of it), so that the lines above run once over all the
    parameters rather than once per parameter: the same arithmetic, element by element,
    in a dozen array operations instead of a dozen per parameter (on a GPU each is a kernel
    launch; per parameter, the update was a third of a training step's launches).

    >>> import numpy as np
    >>> p = {"w": np.ones((2, 2))}
    >>> opt = AdamW(p, lr=0.1)
    >>> opt.step(p, {"w": np.ones((2, 2))}, lr=0.1)
    >>> round(float(p["w"][0, 0]), 6)  # 1 * (1 - 0.1*0.1) - 0.1 / (1 + eps)
    0.89
    """

    def __init__(self, params: Dict[str, Array], lr: float = 3e-3, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.exp_avg: Dict[str, Array] = {}
        self.exp_avg_sq: Dict[str, Array] = {}
        self._groups = []                            # [(names, [(start, stop)], m, v)], one per dtype
        for dtype in dict.fromkeys(v.dtype for v in params.values()):
            names = [k for k, v in params.items() if v.dtype == dtype]
            stops = np.cumsum([params[k].size for k in names]).tolist()
            bounds = list(zip([0] + stops[:-1], stops))
            xp = array_module(params[names[0]])
            m, v = xp.zeros(stops[-1], dtype=dtype), xp.zeros(stops[-1], dtype=dtype)   # (P,) moments
            for k, (a, b) in zip(names, bounds):
                self.exp_avg[k] = m[a:b].reshape(params[k].shape)
                self.exp_avg_sq[k] = v[a:b].reshape(params[k].shape)
            self._groups.append((names, bounds, m, v))

    def step(self, params: Dict[str, Array], grads: Dict[str, Array], lr: Optional[float] = None,
             workers: int = 1) -> None:
        """Update every parameter in place (lr: this step's learning rate).

        ``workers`` > 1 (NumPy arrays only) runs the update of contiguous runs of parameters
        in that many threads (:func:`run_parallel`): every element gets the same operations,
        so the result is the same, bit for bit, as with one.
        """
        lr = self.lr if lr is None else float(lr)
        missing = sorted(set(params) - set(grads))
        if missing:
            raise KeyError(f"AdamW.step: no gradient for parameter(s) {missing[:5]}")
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.t                     # bias corrections
        bc2 = 1.0 - b2 ** self.t
        coef = (b1, b2, lr / bc1, math.sqrt(bc2), lr)  # ..., step size, sqrt(bc2), lr
        for names, bounds, m, v in self._groups:
            runs = (_balanced_runs([b - a for a, b in bounds], workers)
                    if workers > 1 and array_module(m) is np and m.size >= _PARALLEL_MIN else [(0, len(names))])
            run_parallel([partial(self._update, params, grads, names[i:j], bounds[i:j], m, v, coef)
                          for i, j in runs])

    def _update(self, params, grads, names, bounds, m, v, coef) -> None:
        """The update of the parameters ``names``, which fill ``m[bounds[0][0]:bounds[-1][1]]``."""
        b1, b2, step_size, sqrt_bc2, lr = coef
        if _fused_adamw(params, grads, names, m):   # the lines below in one pass per parameter, same bits
            from . import _fused
            for name, (a, b) in zip(names, bounds):
                p = params[name]
                decay = 1.0 - lr * self.weight_decay if self.weight_decay and decays(p.shape) else None
                _fused.adamw_update(p, grads[name], m[a:b], v[a:b], b1, b2, sqrt_bc2, self.eps, step_size, decay)
            return
        o = bounds[0][0]
        m, v = m[o:bounds[-1][1]], v[o:bounds[-1][1]]    # (P,) this run's moments (views)
        g = array_module(m).concatenate([grads[k].ravel() for k in names])  # (P,) its gradients
        tmp = np.multiply(g, 1.0 - b1)               # (P,) the one temporary, reused in place below
        m *= b1
        m += tmp                                     # m <- b1 m + (1 - b1) g
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v *= b2
        v += tmp                                     # v <- b2 v + (1 - b2) g^2
        denom = np.sqrt(v, out=tmp)
        denom /= sqrt_bc2
        denom += self.eps                            # sqrt(v_hat) + eps
        update = np.divide(m, denom, out=g)          # (P,) g is done with
        update *= step_size                          # step_size * m_hat... / (sqrt(v_hat) + eps)
        for name, (a, b) in zip(names, bounds):
            p = params[name]
            if self.weight_decay and decays(p.shape):
                p *= 1.0 - lr * self.weight_decay
            p -= update[a - o:b - o].reshape(p.shape)

    def state_dict(self, copy: bool = True) -> dict:
        """Scalars and moment arrays (copied; ``copy=False``: the live arrays, for saving)."""
        take = (lambda v: v.copy()) if copy else (lambda v: v)
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "exp_avg": {k: take(v) for k, v in self.exp_avg.items()},
                "exp_avg_sq": {k: take(v) for k, v in self.exp_avg_sq.items()}}

    def load_state_dict(self, state: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            have, got = set(getattr(self, key)), set(state[key])
            if have != got:
                raise ValueError(f"optimizer state does not match the parameters: missing "
                                 f"{sorted(have - got)[:5]}, unexpected {sorted(got - have)[:5]}")
            for k, v in state[key].items():
                if v.shape != getattr(self, key)[k].shape:
                    raise ValueError(f"optimizer state {key}[{k!r}] has shape {v.shape}, "
                                     f"parameter has {getattr(self, key)[k].shape}")
            live = getattr(self, key)                   # views of the flat buffers, where the parameters live
            for k, v in state[key].items():
                live[k][...] = to_device(np.array(to_numpy(v), dtype=live[k].dtype), array_module(live[k]))
        self.t = int(state["t"])
        self.lr = float(state.get("lr", self.lr))
        self.betas = tuple(state.get("betas", self.betas))
        self.eps = float(state.get("eps", self.eps))
        self.weight_decay = float(state.get("weight_decay", self.weight_decay))


# AdamW on host float32/float64 parameters runs its update as one Numba pass per parameter
# (minisparse._fused.adamw_update: the NumPy lines of AdamW._update element by element, in
# their order and dtype, so the same bits; ~13 passes over the parameters become one). False,
# fewer than FUSED_ADAMW_MIN_SIZE elements in a run, or no Numba: the NumPy lines.
FUSED_ADAMW = True
FUSED_ADAMW_MIN_SIZE = 1 << 16


def _fused_adamw(params, grads, names, m) -> bool:
    if not FUSED_ADAMW or type(m) is not np.ndarray or m.size < FUSED_ADAMW_MIN_SIZE:
        return False
    from . import _fused
    for k in names:
        p, g = params[k], grads[k]
        if not (_fused.usable(p) and type(g) is np.ndarray and g.dtype == p.dtype and g.shape == p.shape):
            return False
    return _fused.more_kernels() is not None


def global_norm(grads: Dict[str, Array], workers: int = 1) -> float:
    """sqrt(sum of squares of every gradient), accumulated in float64.

    ``workers`` > 1 (NumPy arrays): each gradient's sum of squares in a thread of
    :func:`run_parallel`, added up in the dict's order as with one (the same bits)."""
    def sq(g):
        g64 = g.ravel().astype(np.float64, copy=False)
        return g64 @ g64                         # on a GPU a 0-d device array: read back once, below
    gs = list(grads.values())
    if workers > 1 and gs and array_module(gs[0]) is np:
        runs = _balanced_runs([g.size for g in gs], workers)
        parts = run_parallel([partial(lambda sl: [sq(g) for g in sl], gs[i:j]) for i, j in runs])
        squares = [s for part in parts for s in part]
    else:
        squares = [sq(g) for g in gs]
    total = 0.0
    for s in squares:
        total = total + s
    return math.sqrt(float(total))


def clip_grads(grads: Dict[str, Array], max_norm: float, workers: int = 1) -> float:
    """Scale every gradient by min(1, max_norm / norm) in place; returns the norm before.
    ``workers``: threads for the NumPy work (see :func:`global_norm`; the same result)."""
    norm = global_norm(grads, workers)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        gs = list(grads.values())

        def scale_run(sl):
            for g in sl:
                g *= g.dtype.type(scale)
        runs = (_balanced_runs([g.size for g in gs], workers) if workers > 1 and gs and array_module(gs[0]) is np
                else [(0, len(gs))])
        run_parallel([partial(scale_run, gs[i:j]) for i, j in runs])
    return norm


# ======================================================================================
# threads
# ======================================================================================
_POOLS: Dict[int, "ThreadPoolExecutor"] = {}
_PARALLEL_MIN = 1 << 16          # elements below which the optimizer's update stays on one thread


def run_parallel(tasks):
    """Run the callables ``tasks`` (no arguments) and return their results, in order.

    One task runs in the calling thread; more run in a persistent pool of that many
    threads (kept across calls: no thread start per training step), with BLAS held at one
    thread each meanwhile (:func:`~minisparse.runtime.blas_threads_limited`). NumPy and
    BLAS release the GIL, so the tasks' array work runs on as many cores. The first
    exception of a task is raised here, after every task has finished.
    """
    if len(tasks) == 1:
        return [tasks[0]()]
    from concurrent.futures import ThreadPoolExecutor
    pool = _POOLS.get(len(tasks))
    if pool is None:
        pool = _POOLS[len(tasks)] = ThreadPoolExecutor(len(tasks), thread_name_prefix="minisparse-train")
    with blas_threads_limited(1):
        futures = [pool.submit(t) for t in tasks]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]


def _balanced_runs(sizes, n: int):
    """At most ``n`` non-empty runs [(i, j), ...] of consecutive items covering all of
    ``sizes``, each of about sum(sizes) / n (a run ends at the first item that reaches its
    share)."""
    total, runs, start, acc = sum(sizes), [], 0, 0
    for idx, size in enumerate(sizes):
        acc += size
        if len(runs) < n - 1 and acc >= total * (len(runs) + 1) / n and idx + 1 < len(sizes):
            runs.append((start, idx + 1))
            start = idx + 1
    runs.append((start, len(sizes)))
    return runs


def accumulate_grads(model: Transformer, batches, l1: float = 0.0, workers: int = 1):
    """Mean loss, mean gradients and mean cross-entropy over micro-batches [(x, y), ...].

    With equal-size micro-batches this equals the loss and gradient of their concatenation.
    ``loss`` includes the MoE auxiliary losses and the l1 penalty; ``ce`` is the
    cross-entropy alone.

    ``workers`` > 1 splits each micro-batch's rows over that many threads, BLAS at one
    thread each (see :func:`minisparse.runtime.training_workers`, which :func:`train`
    passes), and combines the parts weighted by their rows: the same loss and gradient to
    rounding (a thread done with its rows computes weight-gradient products the others
    queued: the same bits). Used only where that is exact and safe -- a model on the host, no MoE layer
    (the load-balancing loss is not a mean over tokens), ``l1 == 0``, no ignored target, no
    :meth:`~minisparse.Transformer.wrap_ffn` wrapper -- else the batch runs whole.
    """
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a positive integer (threads to split each batch over), got {workers!r}")
    total, ce, acc = 0.0, 0.0, None
    for x, y in batches:
        if workers > 1 and _can_split(model, x, y, l1):
            loss, grads = _split_loss_and_grads(model, x, y, workers)
        else:
            loss, grads = model.loss_and_grads(x, y, l1=l1)
        total += loss
        ce += model.last_aux.get("ce_loss", loss)
        if acc is None:
            acc = grads
        else:
            for k, g in grads.items():
                acc[k] += g
    n = len(batches)
    if n > 1:
        for g in acc.values():
            g /= g.dtype.type(n)
    return total / n, acc, ce / n


def _can_split(model: Transformer, x, y, l1: float) -> bool:
    c = model.config
    return (array_module(next(iter(model.params.values()))) is np and not l1 and not model.ffn_wrappers
            and not any(c.is_moe_layer(i) for i in range(c.n_layers))
            and y is not None and len(x) >= 2 and bool((np.asarray(y) != -1).all()))


def _split_loss_and_grads(model: Transformer, x, y, workers: int):
    """loss_and_grads of the rows of (x, y) split over ``workers`` threads, combined with
    weights rows_i / B (every target counts: the loss is a mean over B x T tokens).

    The parts queue their attention and FFN weight-gradient products
    (:class:`~minisparse.layers.Deferred`) on one shared queue instead of computing them
    in place, and a thread that is done with its rows' backward takes products off the
    queue until every part is done: when one thread runs behind (another process shares
    its core), the other takes over part of its work. Each product is the same whichever
    thread computes it, so the result is bit for bit that of computing them in place."""
    import threading
    from collections import deque
    from .layers import Deferred
    parts = [r for r in np.array_split(np.arange(len(x)), workers) if len(r)]
    B = len(x)
    queue: deque = deque()
    cond = threading.Condition()
    state = {"producing": len(parts), "busy": 0}

    class Shared:                                 # what the backward appends its products to
        @staticmethod
        def append(d):
            with cond:
                queue.append(d)
                cond.notify()

    def drain():                                  # until nothing is queued, producing or running
        while True:
            with cond:
                while not queue and (state["producing"] or state["busy"]):
                    cond.wait()
                if not queue:
                    return
                task = queue.popleft()
                state["busy"] += 1
            try:
                task.run()
            finally:
                with cond:
                    state["busy"] -= 1
                    cond.notify_all()

    def part(r):                                  # a part's loss and gradients, times its weight
        try:
            loss, grads = model._loss_and_grads(x[r], y[r], defer=Shared)
        finally:
            with cond:
                state["producing"] -= 1
                cond.notify_all()
        drain()
        for k, g in grads.items():
            if isinstance(g, Deferred):
                g = grads[k] = g.value.astype(model.params[k].dtype, copy=False)
            g *= g.dtype.type(len(r) / B)
        return loss, grads
    results = run_parallel([partial(part, r) for r in parts])
    loss = sum(part_loss * (len(r) / B) for (part_loss, _), r in zip(results, parts))
    grads = results[0][1]
    keys = list(grads)

    def combine(ks):                              # fixed order: the same sum whichever thread ends first
        for k in ks:
            g = grads[k]
            for _, other in results[1:]:
                g += other[k]
    runs = _balanced_runs([grads[k].size for k in keys], len(parts))
    run_parallel([partial(combine, keys[i:j]) for i, j in runs])
    model.last_aux = {"ce_loss": loss}            # the parts' writes raced: the combined value
    return loss, grads


# ======================================================================================
# evaluation
# ======================================================================================
def evaluate(model: Transformer, corpus: Corpus, batch_size: int = 16, seq_len: int = 128,
             n_batches: int = 8, seed: int = 1234, ffn_hook=None, split: str = "val") -> float:
    """Mean cross-entropy (nats per token) on ``n_batches`` fixed batches of a split.

    The batches depend on ``seed`` only, so two calls (or two models) see the same text.
    ``ffn_hook`` is passed to the model (to evaluate a sparsification rule, say).
    """
    from . import layers as L
    rng = np.random.default_rng(seed)
    seq_len = min(seq_len, model.config.max_seq_len)
    losses = []
    for _ in range(n_batches):
        x, y = corpus.get_batch(split, batch_size, seq_len, rng)
        logits = model(x, ffn_hook=ffn_hook)                               # (B, T, V)
        loss, _ = L.cross_entropy_forward(logits.reshape(-1, logits.shape[-1]),
                                          to_device(y.reshape(-1), model.xp))
        losses.append(loss)
    return float(np.mean(losses))


def ffn_zero_fraction(model: Transformer, corpus: Corpus, batch_size: int = 8, seq_len: int = 128,
                      n_batches: int = 4, seed: int = 1234, split: str = "val") -> List[float]:
    """Per-layer fraction of FFN activations h that are exactly zero, on validation batches.

    Measured with the model's ``ffn_hook`` (for MoE layers, over every expert's h). For the
    ReLU family this is the sparsity the neuron-skipping kernels exploit.
    """
    zeros = np.zeros(model.config.n_layers)
    total = np.zeros(model.config.n_layers)

    def hook(layer, expert, h):
        zeros[layer] += int(np.count_nonzero(h == 0))
        total[layer] += h.size

    evaluate(model, corpus, batch_size, seq_len, n_batches, seed, ffn_hook=hook, split=split)
    return [float(z / t) if t else float("nan") for z, t in zip(zeros, total)]


# ======================================================================================
# records: progress, metrics.jsonl, loss curve
# ======================================================================================
class _Progress:
    """A tqdm bar when tqdm is installed, otherwise a plain line every ``log_every`` steps."""

    def __init__(self, total: int, initial: int, enabled: bool, log_every: int):
        self.enabled, self.log_every, self.bar = enabled, max(1, log_every), None
        self.total = total
        if enabled:
            try:
                from tqdm.auto import tqdm
                import sys
                # in a log file (CI, nohup) a bar redrawn every 0.1 s is megabytes of noise
                interval = 0.1 if sys.stderr.isatty() else 15.0
                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                                dynamic_ncols=True, leave=True, mininterval=interval)
            except ImportError:
                self.bar = None

    def update(self, rec: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}",
                    "lr": f"{rec['lr']:.2e}"}
            if "val_loss" in rec:
                post["val"] = f"{rec['val_loss']:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif (rec["step"] + 1) % self.log_every == 0 or rec["step"] + 1 == self.total or "val_loss" in rec:
            line = (f"step {rec['step'] + 1:>5}/{self.total}  loss {rec['loss']:.4f}  "
                    f"lr {rec['lr']:.2e}  {rec['tokens_per_s']:.0f} tok/s")
            if "val_loss" in rec:
                line += f"  val {rec['val_loss']:.4f}"
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_metrics(path, history: List[dict]) -> None:
    """One JSON object per line."""
    with open(path, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")


def read_metrics(path) -> List[dict]:
    """The records of a ``metrics.jsonl``. A torn last line (a run killed mid-write) is
    dropped with a warning; a bad line elsewhere raises ``ValueError`` naming the file and line."""
    with open(path) as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except (ValueError, RecursionError) as e:
            if i == len(lines) - 1:
                import warnings
                warnings.warn(f"{path}: dropped a torn last line ({len(line)} characters; the run was "
                              "interrupted while writing it)", stacklevel=2)
                break
            raise ValueError(f"{path}, line {i + 1}: not a metrics record ({e}); fix or delete that "
                             "line to resume") from None
        out.append(rec)
    return out


def plot_loss(history: List[dict], path, title: str = "training loss") -> Optional[Path]:
    """Loss (and validation loss) against step, as a PNG. Returns None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] + 1 for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in history], lw=1, label="train")
    ev = [r for r in history if "val_loss" in r]
    if ev:
        ax.plot([r["step"] + 1 for r in ev], [r["val_loss"] for r in ev], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ======================================================================================
# the loop
# ======================================================================================
@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: Transformer
    history: List[dict] = field(default_factory=list)   # one record per step (this run)
    final_val_loss: float = float("nan")
    optimizer: Optional[AdamW] = None
    checkpoint: Optional[Path] = None


# TrainConfig fields that change the numbers of a run (steps excluded: extending a run is fine,
# though it reshapes the cosine schedule)
_RUN_DEFINING = ("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "eps",
                 "grad_clip", "grad_accum", "seed", "l1")


def _check_resume(model: Transformer, state) -> None:
    if state.model.config != model.config:
        raise ValueError(f"cannot resume from {state.path}: the checkpoint's config "
                         f"{state.model.config} differs from the model's {model.config}")
    if state.model.dtype != model.dtype:
        raise ValueError(f"cannot resume from {state.path}: checkpoint dtype {state.model.dtype}, "
                         f"model dtype {model.dtype}")


def _check_inputs(model: Transformer, corpus: Corpus, cfg: TrainConfig) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"train() takes a minisparse Transformer, got {type(model).__name__}")
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len="
                         f"{model.config.max_seq_len}; lower seq_len or build the model with a larger max_seq_len")
    corpus.check_seq_len(cfg.seq_len, "train")
    if cfg.eval_batches and len(corpus.val) < cfg.seq_len + 1:
        corpus.check_seq_len(cfg.seq_len, "val")


def _open_metrics(out_dir: Optional[Path], past: List[dict]):
    """``metrics.jsonl`` rewritten with the records kept from before a resume, open for appending."""
    if out_dir is None:
        return None
    write_metrics(out_dir / "metrics.jsonl", past)
    return open(out_dir / "metrics.jsonl", "a")


def _resume_into(model: Transformer, opt: "AdamW", rng: np.random.Generator, cfg: TrainConfig,
                 resume, out_dir: Optional[Path]) -> Tuple[int, List[dict]]:
    """Load a checkpoint's weights, optimizer moments and batch-generator state into the
    fresh ``model``, ``opt`` and ``rng``; returns (the step to start from, the metrics
    records of the steps before it). Stray temporary files of the run are removed."""
    from .checkpoint import FILENAME, load_training_state, remove_stale_tmp
    state = load_training_state(resume)
    _check_resume(model, state)
    for k, v in state.model.params.items():
        model.params[k][...] = to_device(v, model.xp)
    if state.optimizer is None:
        raise ValueError(f"cannot resume from {state.path}: it holds no optimizer state "
                         "(it was saved for inference)")
    opt.load_state_dict(state.optimizer)
    if "rng_state" not in state.extra:
        raise ValueError(f"cannot resume from {state.path}: no batch-generator state recorded")
    rng.bit_generator.state = state.extra["rng_state"]
    start = int(state.step or 0)
    saved = state.extra.get("train_config") or {}
    changed = sorted(k for k in _RUN_DEFINING if k in saved and saved[k] != cfg.to_dict()[k])
    if changed:
        import warnings
        warnings.warn(f"resuming {state.path} with a different {', '.join(changed)} than the saved run: "
                      "the continuation will not be the run an uninterrupted training would give",
                      stacklevel=3)
    if start > cfg.steps:
        raise ValueError(f"the checkpoint is at step {start}, beyond cfg.steps={cfg.steps}; "
                         "raise steps to continue training")
    past: List[dict] = []
    if out_dir is not None:
        remove_stale_tmp(out_dir / FILENAME)
        if (out_dir / "metrics.jsonl").is_file():
            past = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["step"] < start]
    return start, past


class _Saver:
    """Writes the run's checkpoint; remembers the last good one, and names it when a save fails."""

    def __init__(self, model, opt, rng, cfg: TrainConfig, corpus: Corpus, out_dir: Optional[Path], resume):
        self.model, self.opt, self.rng, self.cfg, self.corpus, self.out_dir = model, opt, rng, cfg, corpus, out_dir
        self.last: Optional[Tuple[Path, int]] = None
        if resume is not None:
            from .checkpoint import checkpoint_path
            p = checkpoint_path(resume)
            self.last = (p, -1)

    def __call__(self, step_done: int) -> Optional[Path]:
        if self.out_dir is None:
            return None
        from .checkpoint import save
        extra = {"train_config": self.cfg.to_dict(), "rng_state": self.rng.bit_generator.state,
                 "corpus": {"name": self.corpus.name, **(self.corpus.source or {})}}
        target = self.out_dir / "checkpoint.safetensors"
        try:
            path = save(self.model, target, optimizer=self.opt, step=step_done, extra=extra)
        except OSError as e:
            if self.last is None:
                keep = "no earlier checkpoint of this run exists"
            else:
                at = "" if self.last[1] < 0 else f" (step {self.last[1]})"
                keep = f"the last good checkpoint is {self.last[0]}{at}, unchanged"
            raise OSError(e.errno, f"could not save step {step_done}: {e.strerror or e}; {keep}",
                          str(target)) from e
        self.last = (path, step_done)
        return path


def _train_step(model: Transformer, corpus: Corpus, cfg: TrainConfig, opt: "AdamW", rng, step: int,
                t_run: float) -> dict:
    """One optimizer step (with accumulation and clipping); returns its metrics record."""
    t0 = time.perf_counter()
    lr = lr_at(step, cfg)
    batches = [corpus.get_batch("train", cfg.batch_size, cfg.seq_len, rng) for _ in range(cfg.grad_accum)]
    loss, grads, ce = accumulate_grads(model, batches, cfg.l1, workers=training_workers())
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate "
                                 f"(lr={cfg.lr}) or raise warmup")
    workers = training_workers()
    gnorm = clip_grads(grads, cfg.grad_clip, workers)
    opt.step(model.params, grads, lr, workers)
    dt = time.perf_counter() - t0
    rec = {"step": step, "loss": float(loss), "ce_loss": float(ce), "lr": lr, "grad_norm": gnorm,
           "tokens": (step + 1) * cfg.tokens_per_step, "tokens_per_s": cfg.tokens_per_step / dt,
           "time_s": time.perf_counter() - t_run}
    if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
        rec["val_loss"] = evaluate(model, corpus, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    return rec


def train(model: Transformer, corpus: Corpus, cfg: Optional[TrainConfig] = None, *,
          resume: Optional[str] = None, callback: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Train ``model`` in place on ``corpus``.

    Parameters
    ----------
    model : Transformer (float32 or float64)
    corpus : Corpus
    cfg : TrainConfig
    resume : path of a checkpoint written by a run with the same model config
        Loads weights, optimizer moments, step and batch-generator state, then continues.
    callback : callable(step, record), optional
        Called after every step with the step's record.

    Returns
    -------
    TrainResult
        ``.history``: per-step dicts (step, loss, ce_loss, lr, grad_norm, tokens,
        tokens_per_s, time_s, and val_loss on evaluation steps); ``.final_val_loss``;
        ``.model`` (the same object, trained).

    With ``cfg.out_dir`` set, writes ``checkpoint.safetensors`` (at the end and every
    ``save_every`` steps), ``metrics.jsonl`` and ``loss.png`` (with matplotlib) there.

    Speed: calls :func:`minisparse.runtime.configure_training` (process-wide allocator and
    BLAS-thread settings; see there). With 2 or more threads chosen by minisparse (or by
    :func:`~minisparse.runtime.set_training_threads`), each step splits its batch rows over
    them (:func:`accumulate_grads`, ``workers``): the same loss and gradient to rounding;
    clipping and the AdamW update then run in the same threads (bit for bit as on one).

    Examples
    --------
    >>> import minisparse as ms
    >>> from minisparse.data import corpus_from_text
    >>> m = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
    >>> c = corpus_from_text("def f(x):\\n    return x + 1\\n" * 200)
    >>> r = train(m, c, TrainConfig(steps=5, batch_size=2, seq_len=32, warmup=1, progress=False))
    >>> len(r.history)
    5
    """
    cfg = cfg or TrainConfig()
    _check_inputs(model, corpus, cfg)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    configure_training()                               # allocator + BLAS threads (minisparse.runtime)

    opt = AdamW(model.params, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)              # the batch sampler: its state is checkpointed
    start, past = 0, []
    if resume is not None:
        start, past = _resume_into(model, opt, rng, cfg, resume, out_dir)
    save_ckpt = _Saver(model, opt, rng, cfg, corpus, out_dir, resume)

    history: List[dict] = []
    metrics_f = _open_metrics(out_dir, past)
    bar = _Progress(cfg.steps, start, cfg.progress, cfg.log_every)
    val_loss, t_run = float("nan"), time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            rec = _train_step(model, corpus, cfg, opt, rng, step, t_run)
            val_loss = rec.get("val_loss", val_loss)
            history.append(rec)
            if metrics_f is not None:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
            bar.update(rec)
            if callback is not None:
                callback(step, rec)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_ckpt(step + 1)
    finally:
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
    if start == cfg.steps:                       # resumed a finished run: just evaluate
        val_loss = evaluate(model, corpus, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    ckpt = save_ckpt(cfg.steps)                  # None without an out_dir
    if out_dir is not None:
        plot_loss(past + history, out_dir / "loss.png")
    return TrainResult(model=model, history=history, final_val_loss=val_loss, optimizer=opt, checkpoint=ckpt)


# ======================================================================================
# minisparse.train is this module AND its train() function
# ======================================================================================
class _CallableModule(types.ModuleType):
    """This module, callable: ``minisparse.train(model, corpus, cfg)`` calls :func:`train`.

    The package exports the function ``train`` and has this submodule of the same name.
    Python binds ``minisparse.train`` to the submodule whenever the submodule is first
    imported (``from minisparse.train import TrainConfig``), so ``ms.train`` would have been
    the function or the module depending on what was imported first: ``ms.train(...)`` then
    failed with "'module' object is not callable". Now it is always this module, and calling
    it trains; ``import minisparse.train as T; T.TrainConfig`` works as before."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(train)        # help and IDEs show train()'s arguments for ms.train
