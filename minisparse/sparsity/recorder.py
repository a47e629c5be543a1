"""Record FFN activations while a model runs, in bounded memory.

A :class:`Recorder` is an ``ffn_hook``: ``model(tokens, ffn_hook=recorder)`` calls
``recorder(layer, expert, h)`` with each FFN's intermediate activation ``h`` (N, F) (each
expert's, in MoE layers). It only *observes*: it returns ``None``, never writes into ``h``,
so the logits are bit-for-bit those of a plain forward (tested).

What it keeps, per (layer, expert) key -- every buffer has a size fixed at construction,
so memory does not grow with the number of tokens seen:

* counts of exact zeros and of ``|h| < eps`` for a few ``eps``;
* per-neuron activation counts (``|h| > active_eps``) and sums of ``|h|``;
* co-activation of consecutive tokens: how many of token t+1's active neurons were
  already active at token t (PowerInfer's / Deja Vu's reuse, "the active set drifts
  slowly"); only for dense layers, where rows are tokens in order;
* a reservoir sample (Vitter's Algorithm R) of ``|h|`` values, for quantiles and histograms;
* a reservoir sample of whole token rows of ``h``, for CETT and top-k analysis offline;
* optionally (``capture_inputs=True``) a reservoir of the FFN *inputs* ``x`` (the normed
  hidden state fed to the gate and up projections), for TEAL calibration.

The FFN input is not passed to ``ffn_hook``; :func:`ffn_input_tap` captures (or replaces)
it for the duration of a ``with`` block, through :meth:`minisparse.Transformer.wrap_ffn`.

Dimension key: N tokens, F FFN neurons, D model width, B batch, T time, R reservoir size.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..xp import array_module, to_device, to_numpy

Array = np.ndarray
Key = Tuple[int, Optional[int]]   # (layer, expert or None)

__all__ = ["Recorder", "LayerStats", "Reservoir", "ffn_input_tap"]


class Reservoir:
    """A uniform random sample of at most ``size`` items from a stream (Algorithm R).

    Items are rows of a (n, *item_shape) array; after ``seen`` items each has had the same
    chance ``size / seen`` of being kept. Vectorised: one random integer per new item.

    >>> r = Reservoir(3, (), np.float32, seed=0)
    >>> r.add(np.arange(10, dtype=np.float32)); r.seen, r.sample().shape
    (10, (3,))
    """

    def __init__(self, size: int, item_shape: tuple, dtype, seed: int = 0):
        if size < 1:
            raise ValueError(f"reservoir size must be >= 1, got {size}")
        self.size = int(size)
        self.buf = np.zeros((self.size, *item_shape), dtype=dtype)     # (R, *item)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, items: Array) -> None:
        """Offer rows ``items`` (n, *item_shape): NumPy, or CuPy (only the kept rows are copied
        to the host)."""
        if not hasattr(items, "shape"):
            items = np.asarray(items)
        n = len(items)
        if n == 0:
            return
        s, R = self.seen, self.size
        start = 0
        if s < R:                                   # still filling: take items in order
            take = min(R - s, n)
            self.buf[s:s + take] = to_numpy(items[:take])
            start = take
        if start < n:
            # item number i (0-based over the whole stream) replaces slot j ~ U{0..i} if j < R
            i = s + np.arange(start, n)                                  # (n - start,)
            j = self.rng.integers(0, i + 1)                              # (n - start,)
            keep = j < R
            if keep.any():
                # later items overwrite earlier ones drawn for the same slot, as in the serial loop
                slots, src = j[keep], np.arange(start, n)[keep]
                order = np.unique(slots[::-1], return_index=True)[1]     # last occurrence per slot
                last = len(slots) - 1 - order
                self.buf[slots[last]] = to_numpy(items[to_device(src[last], array_module(items))])
        self.seen = s + n

    def sample(self) -> Array:
        """The kept items, (min(seen, size), *item_shape)."""
        return self.buf[:min(self.seen, self.size)]

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)


class LayerStats:
    """Streaming statistics of one FFN (one layer, or one expert of a layer)."""

    def __init__(self, n_neurons: int, eps: Sequence[float], value_reservoir: int, row_reservoir: int,
                 active_eps: float, seed: int):
        F = int(n_neurons)
        self.n_neurons = F
        self.eps = tuple(float(e) for e in eps)
        self.active_eps = float(active_eps)
        self.n_tokens = 0
        self.n_zero = 0
        self.n_below = np.zeros(len(self.eps), dtype=np.int64)          # (len(eps),)
        self.neuron_active = np.zeros(F, dtype=np.int64)                # (F,) tokens where |h_f| > active_eps
        self.neuron_abs_sum = np.zeros(F, dtype=np.float64)             # (F,) sum of |h_f|
        self.reuse_shared = 0        # sum over consecutive pairs of |A_t ∩ A_{t+1}|
        self.reuse_next = 0          # sum over consecutive pairs of |A_{t+1}|
        self.n_pairs = 0
        self.values = Reservoir(value_reservoir, (), np.float32, seed)  # |h| samples
        self.rows = Reservoir(row_reservoir, (F,), np.float32, seed + 1)  # h rows (tokens)

    def update(self, h: Array, seq_len: Optional[int]) -> None:
        N, F = h.shape
        a = np.abs(h)                                                   # (N, F)
        self.n_tokens += N
        self.n_zero += int(np.count_nonzero(h == 0))
        for i, e in enumerate(self.eps):
            self.n_below[i] += int(np.count_nonzero(a < e))
        active = a > self.active_eps                                    # (N, F)
        # reductions run where h lives (NumPy or CuPy); only (F,) vectors come to the host
        self.neuron_active += to_numpy(active.sum(axis=0))
        self.neuron_abs_sum += to_numpy(a.sum(axis=0, dtype=np.float64))
        if seq_len is not None and N > 1:
            T = seq_len if (seq_len > 0 and N % seq_len == 0) else N
            act = active.reshape(N // T, T, F)                          # (B, T, F) tokens in order
            if T > 1:
                self.reuse_shared += int(np.count_nonzero(act[:, 1:] & act[:, :-1]))
                self.reuse_next += int(np.count_nonzero(act[:, 1:]))
                self.n_pairs += (N // T) * (T - 1)
        self.values.add(a.ravel().astype(np.float32, copy=False))
        self.rows.add(h.astype(np.float32, copy=False))

    # -- summaries -----------------------------------------------------------------------
    @property
    def n_values(self) -> int:
        return self.n_tokens * self.n_neurons

    def exact_zero_fraction(self) -> float:
        return self.n_zero / self.n_values if self.n_values else float("nan")

    def below_eps_fraction(self) -> Dict[float, float]:
        if not self.n_values:
            return {e: float("nan") for e in self.eps}
        return {e: float(c / self.n_values) for e, c in zip(self.eps, self.n_below)}

    def frequency(self) -> Array:
        """(F,) share of tokens on which each neuron was active (|h| > active_eps)."""
        return self.neuron_active / max(self.n_tokens, 1)

    def reuse(self) -> float:
        """Share of token t+1's active neurons that were active at token t (nan if unknown)."""
        return self.reuse_shared / self.reuse_next if self.reuse_next else float("nan")

    def quantiles(self, qs=(0.5, 0.9, 0.99)) -> Dict[float, float]:
        v = self.values.sample()
        if v.size == 0:
            return {float(q): float("nan") for q in qs}
        return {float(q): float(x) for q, x in zip(qs, np.quantile(v, qs))}

    @property
    def nbytes(self) -> int:
        return int(self.n_below.nbytes + self.neuron_active.nbytes + self.neuron_abs_sum.nbytes
                   + self.values.nbytes + self.rows.nbytes)


class Recorder:
    """Streaming statistics of every FFN activation of a model, used as its ``ffn_hook``.

    Parameters
    ----------
    eps : thresholds for the ``|h| < eps`` counts.
    value_reservoir : number of ``|h|`` values sampled per FFN (quantiles, histograms).
    row_reservoir : number of token rows of ``h`` kept per FFN (CETT, top-k analysis).
    active_eps : a neuron counts as active on a token when ``|h| > active_eps`` (0: nonzero).
    capture_inputs : also keep a reservoir of FFN inputs per layer; requires running the
        model through :meth:`run` / :meth:`record` (which install :func:`ffn_input_tap`).
    seed : seed of the reservoirs' sampling.

    Examples
    --------
    >>> import numpy as np, minisparse as ms
    >>> model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
    >>> rec = Recorder()
    >>> _ = rec.run(model, np.arange(1, 17)[None, :])
    >>> sorted(rec.stats)[:2]
    [(0, None), (1, None)]
    >>> 0.3 < rec.stats[(0, None)].exact_zero_fraction() < 0.9
    True
    """

    def __init__(self, eps: Sequence[float] = (1e-3, 1e-2, 1e-1), value_reservoir: int = 20000,
                 row_reservoir: int = 512, active_eps: float = 0.0, capture_inputs: bool = False,
                 seed: int = 0):
        self.eps = tuple(eps)
        self.value_reservoir = int(value_reservoir)
        self.row_reservoir = int(row_reservoir)
        self.active_eps = float(active_eps)
        self.capture_inputs = bool(capture_inputs)
        self.seed = int(seed)
        self.seq_len: Optional[int] = None   # set by run(); rows of a dense h are (B*T) tokens in order
        self.stats: Dict[Key, LayerStats] = {}
        self.inputs: Dict[int, Reservoir] = {}   # layer -> reservoir of FFN input rows x (D,)

    # -- the hook ------------------------------------------------------------------------
    def __call__(self, layer: int, expert: Optional[int], h: Array) -> None:
        if not hasattr(h, "ndim"):
            h = np.asarray(h)
        if h.ndim != 2:
            raise ValueError(f"ffn_hook expects h of shape (tokens, neurons), got {h.shape}")
        key = (int(layer), None if expert is None else int(expert))
        st = self.stats.get(key)
        if st is None:
            seed = self.seed + 1000 * key[0] + 10 * (0 if expert is None else key[1] + 1)
            st = self.stats[key] = LayerStats(h.shape[1], self.eps, self.value_reservoir,
                                              self.row_reservoir, self.active_eps, seed)
        # consecutive rows are consecutive tokens only in a dense FFN or the shared expert
        # (-1); a routed expert sees a subset of the tokens
        st.update(h, self.seq_len if expert in (None, -1) else None)
        return None

    def _record_input(self, layer: int, x2: Array) -> None:
        r = self.inputs.get(layer)
        if r is None:
            r = self.inputs[layer] = Reservoir(self.row_reservoir, (x2.shape[1],), np.float32,
                                               self.seed + 7919 * (layer + 1))
        r.add(x2.astype(np.float32, copy=False))

    # -- driving a model -----------------------------------------------------------------
    def run(self, model, tokens) -> Array:
        """``model(tokens, ffn_hook=self)``, telling the recorder the sequence length."""
        tokens = np.asarray(tokens)
        self.seq_len = int(tokens.shape[-1]) if tokens.ndim == 2 else None
        try:
            if self.capture_inputs:
                with ffn_input_tap(model, lambda layer, x2: self._record_input(layer, x2)):
                    return model(tokens, ffn_hook=self)
            return model(tokens, ffn_hook=self)
        finally:
            self.seq_len = None

    def record(self, model, corpus, *, split: str = "val", n_batches: int = 8, batch_size: int = 16,
               seq_len: int = 128, seed: int = 1234, progress: bool = False) -> "Recorder":
        """Run ``model`` over ``n_batches`` fixed batches of ``corpus`` (a minisparse Corpus)."""
        seq_len = min(seq_len, model.config.max_seq_len)
        rng = np.random.default_rng(seed)
        it = range(n_batches)
        if progress:
            it = _progress(it, desc="recording")
        for _ in it:
            x, _y = corpus.get_batch(split, batch_size, seq_len, rng)
            self.run(model, x)
        return self

    # -- summaries -----------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of all state (constant once every FFN has been seen once)."""
        return int(sum(s.nbytes for s in self.stats.values()) + sum(r.nbytes for r in self.inputs.values()))

    def keys(self):
        return sorted(self.stats, key=lambda k: (k[0], -1 if k[1] is None else k[1]))

    def summary(self, model=None, cett_target: Optional[float] = 0.2) -> list:
        """One dict per FFN: tokens, exact-zero and below-eps fractions, reuse, quantiles,
        ``neurons_80``: the smallest share of neurons (hottest first) that accounts for 80% of
        the activations (PowerInfer's statistic; a model without exact zeros gives 80% by
        construction), dead neurons, and (given the model) the CETT-``cett_target``
        output-norm threshold ``eps`` and the sparsity it gives (ReLU² Wins)."""
        from .metrics import cett_threshold
        from .neurons import neurons_for_coverage

        rows = []
        for key in self.keys():
            st = self.stats[key]
            row = dict(layer=key[0], expert=key[1], tokens=st.n_tokens, neurons=st.n_neurons,
                       exact_zero=st.exact_zero_fraction())
            for e, f in st.below_eps_fraction().items():
                row[f"below_{e:g}"] = f
            row["reuse"] = st.reuse()
            row["neurons_80"] = (neurons_for_coverage(st.neuron_active, 0.8) if st.neuron_active.sum()
                                 else float("nan"))
            row["dead_neurons"] = int(np.count_nonzero(st.neuron_active == 0))
            q = st.quantiles((0.5, 0.9, 0.99))
            row.update(p50=q[0.5], p90=q[0.9], p99=q[0.99])
            if model is not None and cett_target is not None:
                w_down = to_numpy(model.ffn_weights(key[0], key[1]).w_down)
                t, s, _ = cett_threshold(st.rows.sample(), w_down, cett_target)
                row["cett_threshold"], row["cett_sparsity"] = t, s
            rows.append(row)
        return rows

    def mean_exact_zero(self) -> float:
        """Exact-zero fraction over all recorded values of every FFN."""
        tot = sum(s.n_values for s in self.stats.values())
        return sum(s.n_zero for s in self.stats.values()) / tot if tot else float("nan")


def _progress(it, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety: no tqdm, no bar
        return it
    return tqdm(it, desc=desc, leave=False)


@contextlib.contextmanager
def ffn_input_tap(model, fn: Callable[[int, Array], Optional[Array]]) -> Iterator[None]:
    """Within the block, ``fn(layer, x2)`` sees every FFN's input x2 (N, D) and may return
    a replacement (e.g. TEAL's thresholded input).

    Built on :meth:`minisparse.Transformer.wrap_ffn`; the model is restored on exit, even
    after an exception.

    >>> import numpy as np, minisparse as ms
    >>> model = ms.Transformer(ms.preset("nano"), seed=0)
    >>> seen = []
    >>> with ffn_input_tap(model, lambda i, x: seen.append((i, x.shape))):
    ...     _ = model(np.array([[1, 2, 3]]))
    >>> seen
    [(0, (3, 64)), (1, (3, 64))]
    """
    def tapped(ffn, i, x2, hook, train):
        x_new = fn(i, x2)
        return ffn(i, x2 if x_new is None else x_new, hook, train)

    with model.wrap_ffn(tapped):
        yield
