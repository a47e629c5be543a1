"""The decoder: parameters as a flat dict of named arrays, forward, loss and gradients, KV cache.

Architecture (Llama 2 / Mistral / Gemma family, Touvron et al. 2023):

    x = embed(tokens)                       (* sqrt(D) for Gemma)
    for each block:
        x = x + attention(rms_norm(x))      rotary embeddings, causal mask, GQA
        x = x + ffn(rms_norm(x))            gated FFN (any registry activation) or MoE
    logits = rms_norm(x) @ W_out^T          W_out = tok_embeddings when tied

Parameter names (shapes; D dim, V vocab, H heads, K kv heads, Dh head dim, F ffn, E experts):

    tok_embeddings                       (V, D)
    layers.{i}.attention_norm            (D,)
    layers.{i}.attention.wq              (D, H*Dh)    projections are (in, out): y = x @ w
    layers.{i}.attention.wk, .wv         (D, K*Dh)
    layers.{i}.attention.wo              (H*Dh, D)
    layers.{i}.attention.bq/.bk/.bv      (H*Dh,) / (K*Dh,)   only with qkv_bias (Qwen2)
    layers.{i}.ffn_norm                  (D,)
    layers.{i}.feed_forward.w_gate       (F, D)       FFN weights are neuron-major: row f = neuron f
    layers.{i}.feed_forward.w_up         (F, D)       (gated activations only)
    layers.{i}.feed_forward.w_down       (F, D)
    layers.{i}.feed_forward.router, .experts.*, .shared.*   MoE layers (see minisparse.moe)
    norm                                 (D,)
    output                               (V, D)       absent when tie_embeddings
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

import numpy as np

from . import layers as L
from .activations import get_activation
from .config import ModelConfig
from .xp import array_module, device_name, get_module, to_device, to_numpy

Array = np.ndarray
# ffn_hook(layer, expert, h) -> None | new h      (expert is None for a dense FFN)
# In MoE layers a hook that takes a fourth argument also gets ``rows``: the token rows of
# x2 routed to that expert (the routing, so that nobody has to run the router again).
FFNHook = Callable[[int, Optional[int], Array], Optional[Array]]


class FFNWeights(NamedTuple):
    """One FFN's weights, each (F, D) neuron-major; ``w_up`` is None for plain activations."""
    w_gate: Array
    w_up: Optional[Array]
    w_down: Array


class FFNOut(NamedTuple):
    """What an FFN call returns besides y: its kind, the backward's cache, and the routing.

    kind    "dense" (reference FFN), "moe" (minisparse.moe layer) or "kernel" (sparse_ffn)
    cache   layers.FFNCache (dense), moe.MoECache (moe; its experts' caches are None when
            a kernel backend ran them) or None (kernel: inference only)
    routing MoE layers: {expert: token rows of x2 (N_e,)}; None for dense FFNs
    """
    kind: str
    cache: object
    routing: Optional[Dict[int, Array]] = None


class BlockCache(NamedTuple):
    """One block's intermediates of the training forward, as the backward reads them."""
    attention_norm: tuple       # rms_norm cache of the attention input
    attention: tuple            # attention cache
    ffn_norm: tuple             # rms_norm cache of the FFN input
    ffn: FFNOut


class ForwardCache(NamedTuple):
    """Everything :meth:`Transformer.loss_and_grads` needs from the forward pass."""
    blocks: List[BlockCache]
    xf: Array                   # (B, T, D) final normalised hidden states
    final_norm: tuple           # rms_norm cache of the final norm
    tokens: Array               # (B, T) the input ids, on the model's device


class KVCache:
    """Keys and values of past positions, per layer: (B, K, max_len, Dh) buffers.

    ``pos`` is the number of positions already written; a forward pass with a cache
    writes its T new positions at ``pos`` and advances it. For a model on the GPU make the
    cache with ``model.new_cache(...)`` (or ``xp=cupy``): the buffers then live there.

    Parameters
    ----------
    config : ModelConfig
        Gives the number of layers, KV heads K and head width Dh.
    batch_size : int
        B, the batch of the forward passes that will use the cache.
    dtype : float32 or float64
        Should match the model's dtype.
    max_len : int, optional
        Positions to allocate (default ``config.max_seq_len``).
    xp : module, optional
        ``numpy`` (default) or ``cupy``: where the buffers live.

    Examples
    --------
    >>> import numpy as np, minisparse as ms
    >>> model = ms.Transformer(ms.preset("nano"), seed=0)
    >>> cache = KVCache(model.config)
    >>> _ = model(np.array([[256, 104]]), cache=cache)       # prefill two positions
    >>> model(np.array([[105]]), cache=cache).shape, cache.pos   # then one at a time
    ((1, 1, 258), 3)
    """

    def __init__(self, config: ModelConfig, batch_size: int = 1, dtype=np.float32,
                 max_len: Optional[int] = None, xp=np):
        self.max_len = int(max_len or config.max_seq_len)
        shape = (batch_size, config.n_kv_heads, self.max_len, config.head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.batch_size = batch_size
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def check_room(self, n_new: int) -> None:
        """Raise ValueError unless ``n_new`` more positions fit in the buffers."""
        if self.pos + n_new > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} positions written + {n_new} new > max_len="
                             f"{self.max_len}; make the cache with a larger max_len (at most the "
                             f"config's max_seq_len) or call cache.reset() to start over")


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


class Transformer:
    """A decoder-only transformer in NumPy (Llama 2 / Mistral / Gemma / Qwen2 / Mixtral family).

    ``model.params`` is a flat dict of named arrays (names and shapes in the module
    docstring above; FFN weights neuron-major, (F, D) each). ``model(tokens)`` runs the
    forward pass; ``model.loss_and_grads(tokens)`` the hand-written backward.
    ``model.to("cupy")`` moves the parameters to the GPU once; the same code then runs
    there (see :mod:`minisparse.xp`), and ``model.to("numpy")`` brings them back.

    Parameters
    ----------
    config : ModelConfig
    seed : int
        Seed of the initialisation (normal(0, 0.02); output projections scaled by
        1/sqrt(2 n_layers), as in GPT-2).
    dtype : float32 (default) or float64.
    backend : None or a kernel backend name ("numpy", "numba", "cupy")
        The default of :meth:`forward`'s ``backend``: when set, inference (not training)
        runs each FFN through :func:`minisparse.sparse_ffn` with that backend, skipping
        inactive neurons; per-FFN statistics of the last forward are then in
        ``model.ffn_stats``.
    params : dict of str to array, optional
        Use these arrays (checked against the config's names and shapes) instead of a
        fresh initialisation; NumPy arrays, or CuPy arrays for a model on the GPU.

    Attributes
    ----------
    params : dict of str to ndarray
        The parameters, float32 or float64, all on one device.
    config : ModelConfig
    act : Activation
        The FFN activation of the config.
    ffn_stats : list of dict
        With a backend: per-FFN statistics of the last inference forward, one dict per
        kernel call with ``layer`` and, in MoE layers, ``expert`` (-1: shared experts).
    last_aux : dict of str to list
        MoE layers: auxiliary losses and router statistics of the last forward.

    Examples
    --------
    >>> import numpy as np, minisparse as ms
    >>> model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
    >>> model(np.array([[1, 2, 3]])).shape
    (1, 3, 258)
    """

    def __init__(self, config: ModelConfig, seed: int = 0, dtype=np.float32,
                 backend: Optional[str] = None, params: Optional[Dict[str, Array]] = None):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = _check_dtype(dtype)
        self.act = get_activation(config.activation)
        self.params: Dict[str, Array] = params if params is not None else self.init_params(config, seed, self.dtype)
        if params is not None:
            self._check_params()
            self.dtype = np.dtype(next(iter(self.params.values())).dtype)
        self.backend = _check_backend(backend)
        self.ffn_stats: list = []           # per-FFN kernel stats of the last inference forward
        self.last_aux: dict = {}            # auxiliary losses / router stats of the last forward
        self._ffn_wrappers: list = []       # wrap_ffn's stack, innermost first
        rope = L.rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, self.dtype)
        self._rope = tuple(to_device(t, self.xp) for t in rope)   # cos, sin (max_seq_len, Dh)

    # ------------------------------------------------------------------------------------
    # parameters
    # ------------------------------------------------------------------------------------
    @staticmethod
    def param_shapes(config: ModelConfig) -> Dict[str, tuple]:
        """Name -> shape of every parameter, in a fixed order."""
        c = config
        D, Dh, H, K, F, V = c.dim, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size
        act = get_activation(c.activation)
        shapes = {"tok_embeddings": (V, D)}
        for i in range(c.n_layers):
            p = f"layers.{i}."
            shapes[p + "attention_norm"] = (D,)
            shapes[p + "attention.wq"] = (D, H * Dh)
            shapes[p + "attention.wk"] = (D, K * Dh)
            shapes[p + "attention.wv"] = (D, K * Dh)
            shapes[p + "attention.wo"] = (H * Dh, D)
            if c.qkv_bias:
                shapes[p + "attention.bq"] = (H * Dh,)
                shapes[p + "attention.bk"] = (K * Dh,)
                shapes[p + "attention.bv"] = (K * Dh,)
            shapes[p + "ffn_norm"] = (D,)
            if c.is_moe_layer(i):
                from .moe import moe_param_shapes
                shapes.update(moe_param_shapes(c, p + "feed_forward."))
            else:
                shapes[p + "feed_forward.w_gate"] = (F, D)
                if act.gated:
                    shapes[p + "feed_forward.w_up"] = (F, D)
                shapes[p + "feed_forward.w_down"] = (F, D)
        shapes["norm"] = (D,)
        if not c.tie_embeddings:
            shapes["output"] = (V, D)
        return shapes

    @classmethod
    def init_params(cls, config: ModelConfig, seed: int = 0, dtype=np.float32) -> Dict[str, Array]:
        rng = np.random.default_rng(seed)
        std = 0.02
        out_std = std / math.sqrt(2 * config.n_layers)
        params = {}
        for name, shape in cls.param_shapes(config).items():
            if name.endswith("norm"):
                w = np.zeros(shape) if config.norm_offset else np.ones(shape)
            elif name.split(".")[-1] in ("bq", "bk", "bv"):
                w = np.zeros(shape)
            elif name.endswith("wo") or name.endswith("w_down"):
                w = rng.normal(0.0, out_std, shape)
            else:
                w = rng.normal(0.0, std, shape)
            params[name] = w.astype(dtype)
        return params

    def _check_params(self) -> None:
        want = self.param_shapes(self.config)
        missing = sorted(set(want) - set(self.params))
        extra = sorted(set(self.params) - set(want))
        if missing or extra:
            raise ValueError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
        for name, shape in want.items():
            if tuple(self.params[name].shape) != tuple(shape):
                raise ValueError(f"parameter {name!r}: expected shape {shape}, found {self.params[name].shape}")
        dts = {a.dtype for a in self.params.values()}
        if len(dts) != 1:
            raise ValueError(f"parameters mix dtypes {sorted(map(str, dts))}; cast them to one")
        _check_dtype(dts.pop())

    def num_parameters(self) -> int:
        """Total number of scalars in ``params``."""
        return int(sum(a.size for a in self.params.values()))

    def astype(self, dtype) -> "Transformer":
        """A copy of the model with parameters cast to ``dtype`` (on the same device)."""
        dt = _check_dtype(dtype)
        return Transformer(self.config, dtype=dt, backend=self.backend,
                           params={k: v.astype(dt) for k, v in self.params.items()})

    # ------------------------------------------------------------------------------------
    # device: where the arrays live (minisparse.xp)
    # ------------------------------------------------------------------------------------
    @property
    def xp(self):
        """The array module of the parameters: ``numpy``, or ``cupy`` after ``to("cupy")``."""
        return array_module(self.params["tok_embeddings"])

    @property
    def device(self) -> str:
        """``"numpy"`` (host) or ``"cupy"`` (GPU)."""
        return device_name(self.xp)

    def to(self, device: str) -> "Transformer":
        """Move every parameter to ``device`` ("numpy"/"cpu" or "cupy"/"gpu"), in place.

        The one way to put a model on the GPU: after ``model.to("cupy")`` the parameters
        are CuPy arrays, and forward, generate, loss_and_grads, train, the recorders and
        the predictors run there with the same code. Moving back and forth keeps every
        value bit for bit. Returns the model, so ``Transformer(cfg).to("cupy")`` works.

        Raises ValueError for an unknown device name and ImportError (with the install
        command) when CuPy or a GPU is missing.

        >>> import minisparse as ms
        >>> ms.Transformer(ms.preset("nano"), seed=0).to("numpy").device
        'numpy'
        """
        xp = get_module(device)
        for k in list(self.params):
            self.params[k] = to_device(self.params[k], xp)
        self._rope = tuple(to_device(t, xp) for t in self._rope)
        return self

    def host_params(self) -> Dict[str, np.ndarray]:
        """The parameters as NumPy arrays (copies from the GPU; the arrays themselves on the host)."""
        return {k: to_numpy(v) for k, v in self.params.items()}

    def new_cache(self, batch_size: int = 1, max_len: Optional[int] = None) -> KVCache:
        """A :class:`KVCache` for this model: its dtype, on its device."""
        return KVCache(self.config, batch_size, self.dtype, max_len=max_len, xp=self.xp)

    def ffn_weights(self, layer: int, expert: Optional[int] = None) -> FFNWeights:
        """The weights of one FFN: block ``layer``'s dense FFN, or expert ``expert`` of a MoE block.

        ``expert`` is None for a dense FFN, ``0..n_experts-1`` for a routed expert and
        ``-1`` for the shared experts (one wide FFN). The one owner of the parameter names
        ``layers.{i}.feed_forward.*``: instruments ask here instead of building names.

        >>> import minisparse as ms
        >>> m = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
        >>> tuple(w.shape for w in m.ffn_weights(0))
        ((172, 64), (172, 64), (172, 64))
        """
        c = self.config
        if not (isinstance(layer, (int, np.integer)) and 0 <= layer < c.n_layers):
            raise ValueError(f"layer must be an int in [0, n_layers={c.n_layers}), got {layer!r}")
        pre = f"layers.{layer}.feed_forward."
        p = self.params
        if not c.is_moe_layer(layer):
            if expert is not None:
                raise ValueError(f"layer {layer} has a dense FFN: pass expert=None, not {expert!r}")
            return FFNWeights(p[pre + "w_gate"], p.get(pre + "w_up"), p[pre + "w_down"])
        if expert == -1:
            if c.n_shared_experts < 1:
                raise ValueError(f"layer {layer} has no shared experts (n_shared_experts=0)")
            return FFNWeights(p[pre + "shared.w_gate"], p.get(pre + "shared.w_up"), p[pre + "shared.w_down"])
        if not (isinstance(expert, (int, np.integer)) and 0 <= expert < c.n_experts):
            raise ValueError(f"layer {layer} is a MoE layer: expert must be in [0, n_experts={c.n_experts}) "
                             f"or -1 (shared experts), got {expert!r}")
        wu = p.get(pre + "experts.w_up")
        return FFNWeights(p[pre + "experts.w_gate"][expert], None if wu is None else wu[expert],
                          p[pre + "experts.w_down"][expert])

    def ffn_keys(self):
        """Every FFN of the model as (layer, expert) pairs, in forward order (see :meth:`ffn_weights`)."""
        c = self.config
        keys = []
        for i in range(c.n_layers):
            if c.is_moe_layer(i):
                keys += [(i, e) for e in range(c.n_experts)]
                if c.n_shared_experts > 0:
                    keys.append((i, -1))
            else:
                keys.append((i, None))
        return keys

    # ------------------------------------------------------------------------------------
    # input checks
    # ------------------------------------------------------------------------------------
    def _check_tokens(self, tokens, name: str = "tokens", start: int = 0) -> Array:
        t = to_numpy(tokens)
        if t.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got dtype {t.dtype} "
                            "(token ids are ints; did you pass embeddings or floats?)")
        if t.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, time), got shape {t.shape}; "
                             "for one sequence use tokens[None, :]")
        if t.shape[1] == 0:
            raise ValueError(f"{name} is empty (time dimension 0)")
        if t.size and (t.min() < 0 or t.max() >= self.config.vocab_size):
            bad = t[(t < 0) | (t >= self.config.vocab_size)][0]
            raise ValueError(f"{name} contains id {int(bad)} outside [0, vocab_size={self.config.vocab_size})")
        if start + t.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + t.shape[1]} positions exceeds max_seq_len="
                             f"{self.config.max_seq_len}; shorten it or raise max_seq_len in the config")
        return t

    # ------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------
    def forward(self, tokens, *, cache: Optional[KVCache] = None, ffn_hook: Optional[FFNHook] = None,
                backend: Optional[str] = None) -> Array:
        """Logits (B, T, V) for int tokens (B, T).

        Parameters
        ----------
        tokens : (B, T) int array
            Token ids in ``[0, vocab_size)``; one sequence is ``tokens[None, :]``.
        cache : KVCache, optional
            ``tokens`` are then the next T positions after the ``cache.pos`` already seen
            (incremental decoding); the cache is advanced by T.
        ffn_hook : callable, optional
            ``ffn_hook(layer, expert, h)`` sees every FFN's intermediate activation
            h (N, F), N = B*T (``expert`` is None for a dense FFN, the expert index in
            MoE layers, -1 for shared experts) and may return a replacement array of the
            same shape. In MoE layers a hook with a fourth parameter also receives
            ``rows``, the token rows routed to that expert. Used by the sparsity recorder
            and the sparsification rules; the logits are unchanged when it returns None.
        backend : str, optional
            Run the FFNs through :func:`minisparse.sparse_ffn` with this backend for this
            call (default: the model's ``backend``); ignored while a hook is given.

        Returns
        -------
        (B, T, V) float array, the model's dtype, on the model's device.

        Raises
        ------
        TypeError, ValueError
            Tokens that are not integers, not 2-D, out of the vocabulary, or longer than
            ``max_seq_len``; a cache of the wrong batch or without room.

        Examples
        --------
        >>> import numpy as np, minisparse as ms
        >>> model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
        >>> zeros = []
        >>> logits = model(np.array([[256, 100, 101, 102]]),
        ...                ffn_hook=lambda layer, expert, h: zeros.append(float((h == 0).mean())))
        >>> logits.shape, len(zeros)
        ((1, 4, 258), 2)
        """
        start = cache.pos if cache is not None else 0
        tokens = self._check_tokens(tokens, start=start)
        if cache is not None:
            if cache.batch_size != tokens.shape[0]:
                raise ValueError(f"cache was made for batch {cache.batch_size}, tokens have batch {tokens.shape[0]}")
            cache.check_room(tokens.shape[1])
        backend = self.backend if backend is None else _check_backend(backend)
        logits, _ = self._forward(tokens, cache=cache, ffn_hook=ffn_hook, train=False, backend=backend)
        if cache is not None:
            cache.pos += tokens.shape[1]
        return logits

    __call__ = forward

    def forward_cache(self, tokens):
        """The training forward of int tokens (B, T): ``(logits, ForwardCache)``.

        The cache holds, per block, named intermediates (``blocks[i].ffn.cache.g`` is a
        dense FFN's gate pre-activation, ``.h`` its activation; MoE blocks hold a
        :class:`minisparse.moe.MoECache`). Instruments read it (e.g.
        :func:`minisparse.stats.count_parameters`); :meth:`loss_and_grads` differentiates it.
        """
        tokens = self._check_tokens(tokens)
        return self._forward(tokens, None, None, train=True, backend=None)

    @contextmanager
    def wrap_ffn(self, wrapper) -> Iterator["Transformer"]:
        """Route every FFN call through ``wrapper`` inside a ``with`` block (nestable).

        ``wrapper(ffn, layer, x2, hook, train) -> (y, out)`` receives the FFN it wraps,
        ``ffn(layer, x2, hook, train) -> (y, FFNOut)``, and the block's input x2 (N, D). It
        may look at x2 (recorders, TEAL calibration, predictor training), change it, or
        compute the FFN another way (decoding with predicted masks). ``out.routing`` gives
        a MoE layer's token rows per expert. Wrappers form an explicit stack
        (``model.ffn_wrappers``): the last one entered is outermost; each is removed on
        exit, even after an exception. This is the one extension point for FFN *inputs*;
        the ``ffn_hook`` argument of :meth:`forward` sees the intermediate activation h.

        >>> import numpy as np, minisparse as ms
        >>> m = ms.Transformer(ms.preset("nano"), seed=0)
        >>> seen = []
        >>> def spy(ffn, i, x2, hook, train):
        ...     seen.append((i, x2.shape))
        ...     return ffn(i, x2, hook, train)
        >>> with m.wrap_ffn(spy):
        ...     _ = m(np.array([[1, 2, 3]]))
        >>> seen
        [(0, (3, 64)), (1, (3, 64))]
        """
        self._ffn_wrappers.append(wrapper)
        try:
            yield self
        finally:
            # remove this very wrapper (not whatever is last), so a misnested exit stays correct
            for j in range(len(self._ffn_wrappers) - 1, -1, -1):
                if self._ffn_wrappers[j] is wrapper:
                    del self._ffn_wrappers[j]
                    break

    @property
    def ffn_wrappers(self) -> tuple:
        """The active :meth:`wrap_ffn` wrappers, innermost first."""
        return tuple(self._ffn_wrappers)

    def _run_ffn(self, i: int, x2: Array, hook, train: bool, backend: Optional[str]):
        """FFN of block i through the wrapper stack -> (y (N, D), FFNOut or None)."""
        def ffn(i, x2, hook, train):
            return self._ffn(i, x2, hook, train, backend)
        for wrapper in self._ffn_wrappers:                            # innermost first
            ffn = partial(wrapper, ffn)                               # wrapper(inner, i, x2, hook, train)
        return ffn(i, x2, hook, train)

    def _ffn(self, i: int, x2: Array, hook, train: bool, backend: Optional[str]):
        """FFN of block i on tokens x2 (N, D) -> y (N, D), FFNOut."""
        c = self.config
        use_kernel = backend is not None and not train and hook is None
        if c.is_moe_layer(i):
            from .moe import moe_forward
            y, cache, aux = moe_forward(x2, self.params, f"layers.{i}.feed_forward.", c, self.act, layer=i,
                                        hook=hook, backend=backend if use_kernel else None)
            if use_kernel:
                self._warn_host_weights(backend)                      # after the backend ran: it exists
            for st in aux.pop("ffn_stats", []):
                self.ffn_stats.append(dict(layer=i, **st))
            for k, v in aux.items():
                self.last_aux.setdefault(k, []).append(v)
            return y, FFNOut("moe", cache, cache.routing)
        wg, wu, wd = self.ffn_weights(i)
        if use_kernel:
            from .kernels import sparse_ffn
            stats: dict = {}
            y = sparse_ffn(x2, wg, wu, wd, self.act, backend=backend, stats=stats)
            self._warn_host_weights(backend)
            self.ffn_stats.append(dict(layer=i, **stats))
            return y, FFNOut("kernel", None)
        h_hook = (lambda h: hook(i, None, h)) if hook is not None else None
        y, cache = L.ffn_forward(x2, wg, wu, wd, self.act, hook=h_hook)
        return y, FFNOut("dense", cache)

    def _warn_host_weights(self, backend: str) -> None:
        """Once per model: the GPU backend on host parameters copies every FFN at every call."""
        if backend == "cupy" and self.device == "numpy" and not getattr(self, "_warned_host", False):
            import warnings
            self._warned_host = True
            warnings.warn("backend='cupy' on a model whose parameters are NumPy arrays: every FFN's weights "
                          "are copied to the GPU at every call, which is slower than the CPU. Move the model "
                          "once with model.to('cupy').", stacklevel=7)     # the caller of forward

    def _forward(self, tokens: Array, cache: Optional[KVCache], ffn_hook, train: bool,
                 backend: Optional[str] = None):
        c, p = self.config, self.params
        xp = self.xp
        B, T = tokens.shape
        D = c.dim
        start = cache.pos if cache is not None else 0
        cos, sin = self._rope[0][start:start + T], self._rope[1][start:start + T]  # (T, Dh)
        self.ffn_stats = []
        self.last_aux = {}
        tokens = to_device(tokens, xp)                                      # (B, T) ids on the model's device
        x = L.embedding_forward(p["tok_embeddings"], tokens)                # (B, T, D), a fresh array: the
        if c.embed_scale:                                                   # residual stream, updated in place
            x = x * x.dtype.type(math.sqrt(D))
        blocks = []
        for i in range(c.n_layers):
            pre = f"layers.{i}."
            hn, c_n1 = L.rms_norm_forward(x, p[pre + "attention_norm"], c.norm_eps, c.norm_offset)
            if c.norm_relu:                                                 # ReLU Strikes Back, stage 2
                hn = xp.maximum(hn, 0)
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            a, c_att = L.attention_forward(
                hn, p[pre + "attention.wq"], p[pre + "attention.wk"], p[pre + "attention.wv"],
                p[pre + "attention.wo"], cos, sin, c.n_heads, c.n_kv_heads,
                p.get(pre + "attention.bq"), p.get(pre + "attention.bk"), p.get(pre + "attention.bv"),
                kv_cache=kv, start_pos=start)                               # (B, T, D)
            x += a
            hn2, c_n2 = L.rms_norm_forward(x, p[pre + "ffn_norm"], c.norm_eps, c.norm_offset)
            if c.norm_relu:
                hn2 = xp.maximum(hn2, 0)
            f, c_ffn = self._run_ffn(i, hn2.reshape(B * T, D), ffn_hook, train, backend)  # (N, D)
            x += f.reshape(B, T, D)
            if train:
                blocks.append(BlockCache(c_n1, c_att, c_n2, c_ffn))
        xf, c_nf = L.rms_norm_forward(x, p["norm"], c.norm_eps, c.norm_offset)  # (B, T, D)
        w_out = p["tok_embeddings"] if c.tie_embeddings else p["output"]        # (V, D)
        logits = xf @ w_out.T                                                   # (B, T, V)
        return logits, (ForwardCache(blocks, xf, c_nf, tokens) if train else None)

    # ------------------------------------------------------------------------------------
    # loss and gradients (hand-written backward)
    # ------------------------------------------------------------------------------------
    def loss(self, tokens, targets=None) -> float:
        """Mean next-token cross-entropy (no gradients). See :meth:`loss_and_grads`."""
        inputs, targets = self._inputs_targets(tokens, targets)
        logits, _ = self._forward(inputs, None, None, train=False)
        loss, _ = L.cross_entropy_forward(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss

    def _inputs_targets(self, tokens, targets):
        """Checked (inputs on the host, targets on the model's device)."""
        if targets is None:
            t = to_numpy(tokens)
            if t.ndim != 2 or t.shape[1] < 2:
                raise ValueError(f"without targets, tokens must be (batch, time>=2) and are shifted by one; "
                                 f"got shape {t.shape}")
            inputs, targets = t[:, :-1], t[:, 1:]
        else:
            inputs = tokens
        inputs = self._check_tokens(inputs)
        targets = to_numpy(targets)
        if targets.shape != inputs.shape:
            raise ValueError(f"targets shape {targets.shape} must equal tokens shape {inputs.shape}")
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
        if ((targets < -1) | (targets >= self.config.vocab_size)).any():
            raise ValueError(f"targets must lie in [0, {self.config.vocab_size}) or be -1 (ignored)")
        if (targets == -1).all():
            raise ValueError("every target is -1 (ignored): there is no token to compute a loss on")
        return inputs, to_device(targets, self.xp)

    def _l1_penalty(self, blocks: List[BlockCache], l1: float) -> float:
        """ProSparse's activation penalty over every FFN (dense and MoE), before the backward."""
        total = 0.0
        for blk in blocks:
            kind, fc = blk.ffn.kind, blk.ffn.cache
            if kind == "dense":
                total += l1 * float(np.abs(fc.h).sum()) / fc.h.shape[0]     # sum over neurons, mean over tokens
            else:
                from .moe import moe_l1
                total += l1 * moe_l1(fc)
        return total

    def loss_and_grads(self, tokens, targets=None, *, l1: float = 0.0):
        """Cross-entropy loss and the gradient of every parameter (hand-written backward).

        Parameters
        ----------
        tokens : (B, T) int array
            With ``targets=None`` the model predicts ``tokens[:, 1:]`` from
            ``tokens[:, :-1]``.
        targets : (B, T) int array, optional
            Next-token targets for ``tokens`` (-1 = ignored).
        l1 : float
            Adds ``l1 * sum|h|`` per token (summed over the FFN's neurons, averaged over
            tokens) for every FFN layer; in MoE layers the sum runs over the token's routed
            experts and the shared FFN (ProSparse's activation penalty, Song et al. 2024).

        Returns
        -------
        loss : float
            Mean cross-entropy (nats per token) plus the MoE auxiliary losses with their
            coefficients and the L1 penalty.
        grads : dict of str to ndarray
            Keyed exactly like ``params``, same shapes, dtype and device.

        Examples
        --------
        >>> import numpy as np, minisparse as ms
        >>> model = ms.Transformer(ms.preset("nano"), seed=0, dtype=np.float64)
        >>> loss, grads = model.loss_and_grads(np.array([[256, 100, 101, 102, 103]]))
        >>> sorted(grads) == sorted(model.params), round(loss, 1)   # about ln(258) = 5.55
        (True, 5.6)
        """
        return self._loss_and_grads(tokens, targets, l1)

    def _loss_and_grads(self, tokens, targets=None, l1: float = 0.0, defer: Optional[list] = None):
        """:meth:`loss_and_grads`; with ``defer`` (a list, dense FFNs only) the attention and
        FFN weight gradients are :class:`~minisparse.layers.Deferred` entries queued there
        (uncast), for another thread to compute (minisparse.train's batch split)."""
        c, p = self.config, self.params
        inputs, targets = self._inputs_targets(tokens, targets)
        B, T = inputs.shape
        D, V = c.dim, c.vocab_size
        logits, fwd = self._forward(inputs, None, None, train=True)
        # the loss stays a 0-d array until the backward is queued: reading it is a host sync on a GPU
        loss, ce_cache = L.cross_entropy_forward(logits.reshape(-1, V), targets.reshape(-1), read=False)
        penalty = self._l1_penalty(fwd.blocks, l1) if l1 else 0.0
        grads: Dict[str, Array] = {}

        dlogits = L.cross_entropy_backward(ce_cache).reshape(B, T, V)  # (B, T, V)
        w_out = p["tok_embeddings"] if c.tie_embeddings else p["output"]
        dw_out = dlogits.reshape(-1, V).T @ fwd.xf.reshape(-1, D)              # (V, D)
        dxf = dlogits @ w_out                                                  # (B, T, D)
        dx, grads["norm"] = L.rms_norm_backward(dxf, fwd.final_norm)
        for i in reversed(range(c.n_layers)):
            dx = self._block_backward(i, dx, fwd.blocks[i], grads, l1, defer)
        if c.embed_scale:
            dx = dx * dx.dtype.type(math.sqrt(D))
        demb = L.embedding_backward(dx, fwd.tokens, V)
        if c.tie_embeddings:
            grads["tok_embeddings"] = demb + dw_out
        else:
            grads["tok_embeddings"] = demb
            grads["output"] = dw_out
        grads = {k: grads[k] if isinstance(grads[k], L.Deferred) else grads[k].astype(p[k].dtype, copy=False)
                 for k in p}
        loss = float(loss)                                                     # the step's one read of the loss
        self.last_aux["ce_loss"] = loss
        total = loss + float(np.sum(self.last_aux.get("aux_loss", [])))
        if l1:
            total += penalty
        return total, grads

    def _block_backward(self, i: int, dx: Array, blk: BlockCache, grads: Dict[str, Array], l1: float,
                        defer: Optional[list] = None) -> Array:
        """Backward through block i (FFN branch, then attention branch); fills ``grads``."""
        c, p = self.config, self.params
        B, T, D = dx.shape
        pre = f"layers.{i}."
        # FFN residual branch
        df = dx.reshape(B * T, D)
        if blk.ffn.kind == "moe":
            from .moe import moe_backward
            dhn2, g_moe = moe_backward(df, blk.ffn.cache, p, pre + "feed_forward.", c, self.act, l1=l1)
            grads.update(g_moe)
        else:
            q = pre + "feed_forward."
            wg, wu, wd = self.ffn_weights(i)
            dhn2, dwg, dwu, dwd = L.ffn_backward(df, blk.ffn.cache, wg, wu, wd, self.act, l1=l1, defer=defer)
            grads[q + "w_gate"], grads[q + "w_down"] = dwg, dwd
            if dwu is not None:
                grads[q + "w_up"] = dwu
        dhn2 = dhn2.reshape(B, T, D)
        if c.norm_relu:                              # through relu(norm(x)): the norm's output was xhat * scale
            dhn2 = dhn2 * (blk.ffn_norm[0] * blk.ffn_norm[2] > 0)
        dxn, grads[pre + "ffn_norm"] = L.rms_norm_backward(dhn2, blk.ffn_norm)
        dx += dxn                                    # dx: a fresh array of this backward, updated in place
        # attention residual branch
        dhn, g_att = L.attention_backward(dx, blk.attention, p[pre + "attention.wq"], p[pre + "attention.wk"],
                                          p[pre + "attention.wv"], p[pre + "attention.wo"], defer=defer)
        for k in ("wq", "wk", "wv", "wo") + (("bq", "bk", "bv") if c.qkv_bias else ()):
            grads[pre + "attention." + k] = g_att[k]
        if c.norm_relu:
            dhn = dhn * (blk.attention_norm[0] * blk.attention_norm[2] > 0)
        dxn, grads[pre + "attention_norm"] = L.rms_norm_backward(dhn, blk.attention_norm)
        dx += dxn
        return dx


def _check_backend(backend: Optional[str]) -> Optional[str]:
    """None, or a registered kernel backend name (checked now, not at the first forward)."""
    if backend is None:
        return None
    from .kernels import registered_backends
    if not isinstance(backend, str) or backend.strip().lower() not in registered_backends():
        raise ValueError(f"unknown backend {backend!r}; choose one of {registered_backends()} or None "
                         "(the dense NumPy reference); minisparse.backends() lists those usable here")
    return backend.strip().lower()
