"""Mixture-of-Experts FFN: router (top-k gating), dispatch / combine, auxiliary losses.

A MoE layer replaces the dense FFN of a block by E expert FFNs and a router. Each token
goes to the top-k experts by router logit; the layer output is the gate-weighted sum of
those experts' outputs (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch
Transformer, Fedus et al. 2021; Mixtral, Jiang et al. 2024)::

    logits = x @ W_router                                 (N, E)
    idx    = top_k(logits)                                (N, k)   ties -> lowest expert index
    gates  = normalise(logits, idx)                       (N, k)   see ``router`` below
    y[n]   = sum_j gates[n, j] * FFN_{idx[n, j]}(x[n])    (+ shared(x[n]) when configured)

Router normalisations (``ModelConfig.router``):

    topk_softmax       softmax over the k selected logits          (Mixtral)
    softmax_topk       softmax over all E logits, keep the top k    (Switch, GShard; no renorm)
    softmax_topk_norm  softmax over all E, top k, renormalised      (Qwen-MoE ``norm_topk_prob``)

``topk_softmax`` and ``softmax_topk_norm`` are equal in exact arithmetic
(p_j / sum_sel p = exp(l_j) / sum_sel exp(l)); both are kept because checkpoints name one
or the other, and the tests check that they agree. With k = 1 both give gate 1, so the
router then learns only from the auxiliary losses (use ``softmax_topk`` for Switch-style
top-1 routing).

Experts are ordinary FFNs stored neuron-major like the dense FFN, stacked on a leading
expert axis, with any registry activation (``drelu`` included, as TurboSparse-Mixtral,
Song et al. 2024). Shared experts (Qwen-MoE, DeepSeek-MoE, Dai et al. 2024) are one wide
always-on FFN of ``n_shared_experts * shared_ffn_dim`` neurons, added with weight 1.

Parameter names (prefix e.g. ``"layers.3.feed_forward."``)::

    {prefix}router            (D, E)       logits = x @ router
    {prefix}experts.w_gate    (E, F, D)    row [e, f] = neuron f of expert e
    {prefix}experts.w_up      (E, F, D)    gated activations only
    {prefix}experts.w_down    (E, F, D)
    {prefix}shared.w_gate     (Fs, D)      Fs = n_shared_experts * shared_ffn_dim
    {prefix}shared.w_up       (Fs, D)      gated activations only
    {prefix}shared.w_down     (Fs, D)

Auxiliary losses, added to the training loss by ``Transformer.loss_and_grads``:

    Switch load balancing  lb = E * sum_i f_i * P_i      f_i: fraction of the N*k routed slots
                                                         that chose expert i (before any capacity
                                                         drop; a constant for the gradient),
                                                         P_i: mean over tokens of softmax_i(logits)
    ST-MoE z-loss          z  = mean_n logsumexp(logits_n)^2          (Zoph et al. 2022)
    aux_loss = router_aux_loss_coef * lb + router_z_loss_coef * z

With perfectly uniform routing lb = 1 (its minimum for any k, since sum_i f_i = 1).

Capacity (``capacity_factor``): each expert takes at most ceil(cf * N * k / E) tokens, in
token order; the overflow slots contribute nothing (the residual stream carries the token
past the layer) and are *counted* in ``aux["dropped_tokens"]``. ``None``: nothing is ever
dropped. Capacity depends on N, so a forward with a KV cache (N = new tokens) and the full
forward agree only with ``capacity_factor=None``.

Hook: ``hook(layer, e, h)`` sees each expert's intermediate activation h (N_e, F) and may
return a replacement, exactly like the dense ``ffn_hook(layer, None, h)``. The shared
experts are reported as expert index ``-1``. Experts that receive no token are not
reported.

Dimension key: N tokens, D dim, E experts, k top_k, F ffn neurons per expert,
Fs shared neurons, N_e tokens routed to expert e.
"""
from __future__ import annotations

import inspect
import math
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from . import layers as L
from .activations import Activation, get_activation
from .config import ROUTERS, ModelConfig
from .xp import array_module

Array = np.ndarray

__all__ = [
    "moe_param_shapes", "moe_forward", "moe_backward", "router_forward", "router_backward",
    "top_k_indices", "load_balancing_loss", "load_balancing_backward", "z_loss", "z_loss_backward",
    "expert_capacity", "moe_l1", "RouterCache", "ExpertCache", "MoECache",
]


class RouterCache(NamedTuple):
    """What :func:`router_backward` needs from :func:`router_forward`."""
    logits: Array               # (N, E) router logits
    probs: Array                # (N, E) softmax over all experts
    idx: Array                  # (N, k) chosen experts, best first
    gates: Array                # (N, k) gate weights
    denom: Optional[Array]      # (N, 1) renormaliser (softmax_topk_norm), else None
    router: str                 # the normalisation's name


class ExpertCache(NamedTuple):
    """One expert's share of a MoE forward."""
    expert: int
    rows: Array                 # (N_e,) token rows of x2 routed here (after capacity)
    slots: Array                # (N_e,) which of the token's k choices this is
    y: Array                    # (N_e, D) the expert's output, before its gate
    ffn: Optional[L.FFNCache]   # the expert FFN's cache (None when a kernel backend ran it)


class MoECache(NamedTuple):
    """What :func:`moe_backward` needs from :func:`moe_forward` (and what instruments read)."""
    x2: Array                   # (N, D) layer input
    router: RouterCache
    experts: List[ExpertCache]  # experts that received tokens, in expert order
    shared: Optional[L.FFNCache]  # shared experts' FFN cache (None: none, or a kernel ran them)
    f: Array                    # (E,) fraction of routed slots per expert (load balancing)
    lse: Array                  # (N,) logsumexp of the router logits (z-loss)
    routing: Dict[int, Array]   # {expert: rows}, the same rows as ``experts`` (shared experts: all rows)


# ======================================================================================
# parameters
# ======================================================================================
def moe_param_shapes(cfg: ModelConfig, prefix: str) -> Dict[str, tuple]:
    """Name -> shape of one MoE layer's parameters (see the module docstring).

    >>> from minisparse import preset
    >>> moe_param_shapes(preset("nano", n_experts=4, top_k=2), "layers.0.feed_forward.")["layers.0.feed_forward.experts.w_gate"]
    (4, 172, 64)
    """
    if cfg.n_experts < 1:
        raise ValueError(f"moe_param_shapes: config has n_experts={cfg.n_experts}; a MoE layer needs "
                         "n_experts >= 1 (n_experts=0 means every FFN is dense)")
    D, F, E = cfg.dim, cfg.ffn_dim, cfg.n_experts
    act = get_activation(cfg.activation)
    shapes = {prefix + "router": (D, E),
              prefix + "experts.w_gate": (E, F, D)}
    if act.gated:
        shapes[prefix + "experts.w_up"] = (E, F, D)
    shapes[prefix + "experts.w_down"] = (E, F, D)
    if cfg.n_shared_experts > 0:
        Fs = cfg.n_shared_experts * cfg.shared_ffn_dim
        shapes[prefix + "shared.w_gate"] = (Fs, D)
        if act.gated:
            shapes[prefix + "shared.w_up"] = (Fs, D)
        shapes[prefix + "shared.w_down"] = (Fs, D)
    return shapes


# ======================================================================================
# router: logits -> top-k experts and their gate weights
# ======================================================================================
def _softmax(z: Array) -> Array:
    """Softmax over the last axis (max subtracted first, so exp never overflows)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_backward(dp: Array, p: Array) -> Array:
    """Given dL/dp for p = softmax(z) (last axis), return dL/dz = p * (dp - <p, dp>)."""
    return p * (dp - (p * dp).sum(axis=-1, keepdims=True))


def _logsumexp(z: Array) -> Array:
    m = z.max(axis=-1, keepdims=True)                                # (N, 1)
    return (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]  # (N,)


def top_k_indices(scores: Array, k: int) -> Array:
    """Indices (N, k) of the k largest scores per row, largest first.

    Ties go to the lowest expert index: a *stable* sort of ``-scores`` keeps equal scores
    in index order, so routing is deterministic whatever the platform.

    >>> top_k_indices(np.array([[1.0, 3.0, 3.0, 0.0]]), 2)
    array([[1, 2]])
    """
    xp = array_module(scores)
    if xp is np:
        return np.argsort(-scores, axis=-1, kind="stable")[:, :k]     # (N, k)
    return xp.argsort(-scores, axis=-1)[:, :k]                        # CuPy's sort is stable (radix)


def router_forward(x: Array, w_router: Array, top_k: int, router: str = "topk_softmax"):
    """Route tokens x (N, D) with w_router (D, E) -> gates (N, k), idx (N, k), cache.

    The experts are chosen on the logits (the softmax is monotonic, so every
    normalisation picks the same experts); only the gate weights differ.
    """
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose one of {ROUTERS}")
    logits = x @ w_router                                            # (N, E)
    probs = _softmax(logits)                                         # (N, E) softmax over all experts
    idx = top_k_indices(logits, top_k)                               # (N, k)
    if router == "topk_softmax":
        # Mixtral: softmax over the k selected logits
        gates = _softmax(np.take_along_axis(logits, idx, axis=1))    # (N, k)
        denom = None
    else:
        p_sel = np.take_along_axis(probs, idx, axis=1)               # (N, k)
        if router == "softmax_topk":
            gates, denom = p_sel, None                               # Switch / GShard: no renorm
        else:
            denom = p_sel.sum(axis=1, keepdims=True)                 # (N, 1)
            gates = p_sel / denom                                    # (N, k) renormalised
    return gates, idx, RouterCache(logits, probs, idx, gates, denom, router)


def router_backward(dgates: Array, cache) -> Array:
    """dL/dgates (N, k) -> dL/dlogits (N, E), for each normalisation."""
    logits, probs, idx, gates, denom, router = cache
    n = array_module(idx).arange(idx.shape[0])[:, None]              # (N, 1) row of each idx entry
    dlogits = np.zeros_like(logits)                                  # (N, E)
    if router == "topk_softmax":
        dsel = _softmax_backward(dgates, gates)                      # (N, k) through softmax(l_sel)
        dlogits[n, idx] = dsel                                       # idx distinct per row
        return dlogits
    if router == "softmax_topk_norm":
        # gates = q / S, q = p_sel, S = sum q:  dq = (dg - <gates, dg>) / S
        dq = (dgates - (gates * dgates).sum(axis=1, keepdims=True)) / denom  # (N, k)
    else:
        dq = dgates                                                  # (N, k)
    dprobs = np.zeros_like(probs)                                    # (N, E)
    dprobs[n, idx] = dq
    return _softmax_backward(dprobs, probs)                          # (N, E) through the full softmax


# ======================================================================================
# auxiliary losses
# ======================================================================================
def load_balancing_loss(probs: Array, idx: Array, n_experts: int):
    """Switch load-balancing loss lb = E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4).

    probs (N, E): softmax over all experts; idx (N, k): the routed experts.
    f_i = fraction of the N*k routed slots that chose expert i (sum_i f_i = 1);
    P_i = mean_n probs[n, i]. Returns (lb, f (E,), P (E,)); lb = 1 when routing is uniform.
    """
    N, k = idx.shape
    counts = np.bincount(idx.reshape(-1), minlength=n_experts)       # (E,)
    f = counts / float(N * k)                                        # (E,)
    P = probs.mean(axis=0)                                           # (E,)
    return float(n_experts * np.dot(f, P)), f, P


def load_balancing_backward(probs: Array, f: Array, n_experts: int) -> Array:
    """d lb / d logits (N, E), with f held constant (as in Switch: f is not differentiable)."""
    N = probs.shape[0]
    dP = n_experts * f.astype(probs.dtype)                           # (E,)
    dprobs = np.broadcast_to(dP / N, probs.shape)                    # (N, E)
    return _softmax_backward(dprobs, probs)                          # (N, E)


def z_loss(logits: Array):
    """ST-MoE router z-loss z = mean_n logsumexp(logits_n)^2 (Zoph et al. 2022, eq. 5).

    Returns (z, lse (N,)).
    """
    lse = _logsumexp(logits)                                         # (N,)
    return float(np.mean(lse * lse)), lse


def z_loss_backward(probs: Array, lse: Array) -> Array:
    """d z / d logits (N, E) = 2 * lse_n * softmax(logits_n) / N."""
    N = probs.shape[0]
    return (2.0 / N) * lse[:, None] * probs                          # (N, E)


def router_entropy(logits: Array, probs: Array) -> float:
    """Mean over tokens of the entropy (nats) of softmax(logits): H = lse - <p, logits>."""
    H = _logsumexp(logits) - (probs * logits).sum(axis=-1)           # (N,) no log(0) anywhere
    return float(np.mean(H))


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: Optional[float]):
    """Tokens one expert may take: ceil(cf * N * k / E); None when cf is None (no limit)."""
    if capacity_factor is None:
        return None
    return int(math.ceil(capacity_factor * n_tokens * top_k / n_experts))


# ======================================================================================
# the MoE layer
# ======================================================================================
def _sparse_ffn():
    try:
        from .kernels import sparse_ffn
    except ImportError as e:  # the kernels package is optional for training, needed for backends
        raise ImportError(f"a sparse-kernel backend was requested for a MoE layer but "
                          f"minisparse.kernels could not be imported ({e})") from e
    return sparse_ffn


def moe_forward(x2: Array, params: Dict[str, Array], prefix: str, cfg: ModelConfig, act: Activation,
                layer: int = 0, hook=None, backend: Optional[str] = None):
    """MoE FFN on tokens x2 (N, D) -> (y (N, D), cache, aux).

    Parameters
    ----------
    x2 : (N, D) normalised hidden states of N tokens.
    params : the model's flat parameter dict; this layer's names start with ``prefix``.
    cfg : ModelConfig (n_experts, top_k, router, coefficients, shared experts, capacity).
    act : the experts' activation (from :func:`minisparse.get_activation`).
    layer : block index, passed to ``hook``.
    hook : optional ``hook(layer, e, h)``; sees h (N_e, F) of every expert that got tokens,
        and h (N, Fs) of the shared experts as e = -1; may return a replacement h.
    backend : None (NumPy reference, differentiable) or a kernel backend name: each expert
        then runs through ``minisparse.kernels.sparse_ffn`` (inference only; no cache).

    Returns
    -------
    y : (N, D)
    cache : what :func:`moe_backward` needs (None with a backend).
    aux : dict: ``aux_loss`` (coefficient-weighted, added to the training loss),
        ``lb_loss``, ``z_loss`` (unweighted), ``tokens_per_expert`` (list of E ints: routed
        slots before capacity), ``dropped_tokens`` (slots dropped by capacity),
        ``router_entropy`` (nats, mean over tokens); with a backend also ``ffn_stats``
        (list of the kernels' stats dicts, each with ``expert``).

    Examples
    --------
    >>> import numpy as np, minisparse as ms
    >>> cfg = ms.preset("nano", n_experts=4, top_k=2)
    >>> m = ms.Transformer(cfg, seed=0)
    >>> x = np.random.default_rng(0).normal(size=(5, cfg.dim)).astype(np.float32)
    >>> y, cache, aux = moe_forward(x, m.params, "layers.0.feed_forward.", cfg, m.act)
    >>> y.shape, sum(aux["tokens_per_expert"])
    ((5, 64), 10)
    """
    if x2.ndim != 2 or x2.shape[1] != cfg.dim:
        raise ValueError(f"moe_forward: x2 must be (N, dim={cfg.dim}), got shape {x2.shape}")
    if cfg.n_experts < 1:
        raise ValueError("moe_forward: config has n_experts=0 (dense FFN); set n_experts >= 1")
    if not 1 <= cfg.top_k <= cfg.n_experts:
        raise ValueError(f"moe_forward: top_k={cfg.top_k} must be between 1 and n_experts={cfg.n_experts}")
    N, D = x2.shape
    E, k = cfg.n_experts, cfg.top_k
    w_router = params[prefix + "router"]                             # (D, E)
    wg, wd = params[prefix + "experts.w_gate"], params[prefix + "experts.w_down"]  # (E, F, D)
    wu = params[prefix + "experts.w_up"] if act.gated else None      # (E, F, D)
    use_kernel = backend is not None and hook is None
    sparse_ffn = _sparse_ffn() if use_kernel else None
    ffn_stats: List[dict] = []

    # 1. route
    gates, idx, c_router = router_forward(x2, w_router, k, cfg.router)  # (N, k), (N, k)
    logits, probs = c_router.logits, c_router.probs                  # (N, E) each
    cap = expert_capacity(N, k, E, cfg.capacity_factor)

    # 2. dispatch: each expert runs on its tokens; 3. combine weighted by the gate
    y = np.zeros_like(x2)                                            # (N, D)
    experts: List[ExpertCache] = []
    routing: Dict[int, Array] = {}
    dropped = 0
    with_rows = hook is not None and _takes_rows(hook)
    for e in range(E):
        rows, slots = np.nonzero(idx == e)                           # (N_e,) each; rows ascending = token order
        if cap is not None and rows.size > cap:
            dropped += rows.size - cap                               # overflow slots, reported
            rows, slots = rows[:cap], slots[:cap]
        if rows.size == 0:
            continue
        routing[e] = rows
        x_e = x2[rows]                                               # (N_e, D)
        w_up_e = wu[e] if wu is not None else None                   # (F, D)
        if use_kernel:
            st: dict = {}
            y_e = sparse_ffn(x_e, wg[e], w_up_e, wd[e], act, backend=backend, stats=st)  # (N_e, D)
            ffn_stats.append(dict(expert=e, **st))
            c_e = None
        else:
            h_hook = _expert_hook(hook, layer, e, rows, with_rows)
            y_e, c_e = L.ffn_forward(x_e, wg[e], w_up_e, wd[e], act, hook=h_hook)  # (N_e, D)
        g_e = gates[rows, slots][:, None]                            # (N_e, 1)
        y[rows] += g_e * y_e                                         # rows distinct within an expert
        experts.append(ExpertCache(e, rows, slots, y_e, c_e))

    # shared experts: one wide always-on FFN, weight 1
    c_shared = None
    if cfg.n_shared_experts > 0:
        sg, sd = params[prefix + "shared.w_gate"], params[prefix + "shared.w_down"]  # (Fs, D)
        su = params[prefix + "shared.w_up"] if act.gated else None   # (Fs, D)
        if use_kernel:
            st = {}
            y_s = sparse_ffn(x2, sg, su, sd, act, backend=backend, stats=st)  # (N, D)
            ffn_stats.append(dict(expert=-1, **st))
        else:
            all_rows = array_module(x2).arange(N)
            s_hook = _expert_hook(hook, layer, -1, all_rows, with_rows)
            y_s, c_shared = L.ffn_forward(x2, sg, su, sd, act, hook=s_hook)  # (N, D)
        y += y_s

    # auxiliary losses and statistics
    lb, f, _ = load_balancing_loss(probs, idx, E)
    z, lse = z_loss(logits)
    aux = {
        "aux_loss": float(cfg.router_aux_loss_coef * lb + cfg.router_z_loss_coef * z),
        "lb_loss": lb,
        "z_loss": z,
        "tokens_per_expert": np.bincount(idx.reshape(-1), minlength=E).tolist(),
        "dropped_tokens": int(dropped),
        "router_entropy": router_entropy(logits, probs),
    }
    if use_kernel:
        aux["ffn_stats"] = ffn_stats
    return y, MoECache(x2, c_router, experts, c_shared, f, lse, routing), aux


def _takes_rows(hook) -> bool:
    """True when a hook accepts a fourth positional argument, ``rows`` (the routing)."""
    try:
        ps = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in ps):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in ps) >= 4


def _expert_hook(hook, layer: int, e: int, rows: Array, with_rows: bool):
    """The ``h -> h'`` hook of expert e: ``hook(layer, e, h)``, plus ``rows`` when it takes them."""
    if hook is None:
        return None
    if with_rows:
        return lambda h: hook(layer, e, h, rows)
    return lambda h: hook(layer, e, h)


def moe_l1(cache: MoECache) -> float:
    """ProSparse activation penalty of one MoE layer, before its coefficient
    (``Transformer.loss_and_grads(l1=...)``): per token, sum(|h|) over the neurons of its
    routed experts (and the shared FFN), averaged over the layer's N tokens. Per token, not
    per expert: a rarely routed expert's neurons cost what a busy expert's cost."""
    total = sum(float(np.abs(ex.ffn.h).sum()) for ex in cache.experts if ex.ffn.h.size)
    if cache.shared is not None:
        total += float(np.abs(cache.shared.h).sum())
    return total / cache.x2.shape[0]


def moe_backward(dy: Array, cache, params: Dict[str, Array], prefix: str, cfg: ModelConfig,
                 act: Activation, l1: float = 0.0):
    """Backward of :func:`moe_forward` (including its aux losses) -> (dx (N, D), grads).

    ``grads`` is keyed by full parameter names (router, experts.*, shared.*). The
    auxiliary losses' gradients are included with their coefficients, because
    ``Transformer.loss_and_grads`` adds ``aux_loss`` to the loss it differentiates.
    ``l1`` adds the gradient of ``l1 * moe_l1(cache)`` (ProSparse's penalty, per token).
    """
    if cache is None or any(ex.ffn is None for ex in cache.experts):
        raise ValueError("moe_backward: no expert caches (the forward ran with a kernel backend, which is "
                         "inference-only); run the forward with backend=None to train")
    x2, c_router, experts, c_shared, f, lse = cache[:6]
    probs, gates = c_router.probs, c_router.gates
    E = cfg.n_experts
    wg, wd = params[prefix + "experts.w_gate"], params[prefix + "experts.w_down"]  # (E, F, D)
    wu = params[prefix + "experts.w_up"] if act.gated else None
    dx = np.zeros_like(x2)                                           # (N, D)
    dwg, dwd = np.zeros_like(wg), np.zeros_like(wd)                  # (E, F, D)
    dwu = np.zeros_like(wu) if wu is not None else None
    dgates = np.zeros_like(gates)                                    # (N, k); 0 for dropped slots

    # experts: y[rows] += g_e * y_e
    for e, rows, slots, y_e, c_e in experts:
        g_e = gates[rows, slots][:, None]                            # (N_e, 1)
        dy_e = dy[rows]                                              # (N_e, D)
        dgates[rows, slots] = (dy_e * y_e).sum(axis=1)               # (N_e,) dL/dgate
        dx_e, dwg[e], dwu_e, dwd[e] = L.ffn_backward(g_e * dy_e, c_e, wg[e], wu[e] if wu is not None else None,
                                                     wd[e], act, l1=l1, l1_tokens=len(x2))  # dx_e (N_e, D)
        if dwu_e is not None:
            dwu[e] = dwu_e
        dx[rows] += dx_e
    grads = {prefix + "experts.w_gate": dwg, prefix + "experts.w_down": dwd}
    if dwu is not None:
        grads[prefix + "experts.w_up"] = dwu

    # shared experts
    if c_shared is not None:
        sg, sd = params[prefix + "shared.w_gate"], params[prefix + "shared.w_down"]
        su = params[prefix + "shared.w_up"] if act.gated else None
        dx_s, dsg, dsu, dsd = L.ffn_backward(dy, c_shared, sg, su, sd, act, l1=l1, l1_tokens=len(x2))  # (N, D)
        dx += dx_s
        grads[prefix + "shared.w_gate"], grads[prefix + "shared.w_down"] = dsg, dsd
        if dsu is not None:
            grads[prefix + "shared.w_up"] = dsu

    # router: gates, then the aux losses (both differentiate the logits)
    dlogits = router_backward(dgates, c_router)                      # (N, E)
    if cfg.router_aux_loss_coef:
        dlogits += cfg.router_aux_loss_coef * load_balancing_backward(probs, f, E)
    if cfg.router_z_loss_coef:
        dlogits += cfg.router_z_loss_coef * z_loss_backward(probs, lse)
    w_router = params[prefix + "router"]                             # (D, E)
    grads[prefix + "router"] = x2.T @ dlogits                        # (D, E)
    dx += dlogits @ w_router.T                                       # (N, D)
    return dx, grads
