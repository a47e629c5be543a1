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

import math
from typing import Dict, List, Optional

import numpy as np

from . import layers as L
from .activations import Activation, get_activation
from .config import ROUTERS, ModelConfig

Array = np.ndarray

__all__ = [
    "moe_param_shapes", "moe_forward", "moe_backward", "router_forward", "router_backward",
    "top_k_indices", "load_balancing_loss", "load_balancing_backward", "z_loss", "z_loss_backward",
    "expert_capacity", "count_parameters", "moe_stats", "format_moe_stats",
]


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
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]         # (N, k)


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
    return gates, idx, (logits, probs, idx, gates, denom, router)


def router_backward(dgates: Array, cache) -> Array:
    """dL/dgates (N, k) -> dL/dlogits (N, E), for each normalisation."""
    logits, probs, idx, gates, denom, router = cache
    dlogits = np.zeros_like(logits)                                  # (N, E)
    if router == "topk_softmax":
        dsel = _softmax_backward(dgates, gates)                      # (N, k) through softmax(l_sel)
        np.put_along_axis(dlogits, idx, dsel, axis=1)                # idx distinct per row
        return dlogits
    if router == "softmax_topk_norm":
        # gates = q / S, q = p_sel, S = sum q:  dq = (dg - <gates, dg>) / S
        dq = (dgates - (gates * dgates).sum(axis=1, keepdims=True)) / denom  # (N, k)
    else:
        dq = dgates                                                  # (N, k)
    dprobs = np.zeros_like(probs)                                    # (N, E)
    np.put_along_axis(dprobs, idx, dq, axis=1)
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
    logits, probs = c_router[0], c_router[1]                         # (N, E) each
    cap = expert_capacity(N, k, E, cfg.capacity_factor)

    # 2. dispatch: each expert runs on its tokens; 3. combine weighted by the gate
    y = np.zeros_like(x2)                                            # (N, D)
    experts = []                                                     # (e, rows, slots, y_e, ffn cache)
    dropped = np.zeros(E, dtype=np.int64)                            # (E,)
    for e in range(E):
        rows, slots = np.nonzero(idx == e)                           # (N_e,) each; rows ascending = token order
        if cap is not None and rows.size > cap:
            dropped[e] = rows.size - cap                             # overflow slots, reported
            rows, slots = rows[:cap], slots[:cap]
        if rows.size == 0:
            continue
        x_e = x2[rows]                                               # (N_e, D)
        w_up_e = wu[e] if wu is not None else None                   # (F, D)
        if use_kernel:
            st: dict = {}
            y_e = sparse_ffn(x_e, wg[e], w_up_e, wd[e], act, backend=backend, stats=st)  # (N_e, D)
            ffn_stats.append(dict(expert=e, **st))
            c_e = None
        else:
            h_hook = (lambda h, e=e: hook(layer, e, h)) if hook is not None else None
            y_e, c_e = L.ffn_forward(x_e, wg[e], w_up_e, wd[e], act, hook=h_hook)  # (N_e, D)
        g_e = gates[rows, slots][:, None]                            # (N_e, 1)
        y[rows] += g_e * y_e                                         # rows distinct within an expert
        experts.append((e, rows, slots, y_e, c_e))

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
            s_hook = (lambda h: hook(layer, -1, h)) if hook is not None else None
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
        "dropped_tokens": int(dropped.sum()),
        "router_entropy": router_entropy(logits, probs),
    }
    if use_kernel:
        aux["ffn_stats"] = ffn_stats
        return y, None, aux
    cache = (x2, c_router, experts, c_shared, f, lse)
    return y, cache, aux


def moe_l1(cache) -> float:
    """Sum over the experts (and the shared FFN) of mean(|h|): the ProSparse activation
    penalty of one MoE layer, before its coefficient (``Transformer.loss_and_grads(l1=...)``)."""
    _, _, experts, c_shared, _, _ = cache
    total = sum(float(np.abs(c_e[3]).mean()) for *_, c_e in experts if c_e[3].size)
    if c_shared is not None:
        total += float(np.abs(c_shared[3]).mean())
    return total


def moe_backward(dy: Array, cache, params: Dict[str, Array], prefix: str, cfg: ModelConfig,
                 act: Activation, l1: float = 0.0):
    """Backward of :func:`moe_forward` (including its aux losses) -> (dx (N, D), grads).

    ``grads`` is keyed by full parameter names (router, experts.*, shared.*). The
    auxiliary losses' gradients are included with their coefficients, because
    ``Transformer.loss_and_grads`` adds ``aux_loss`` to the loss it differentiates.
    ``l1`` adds the gradient of ``l1 * moe_l1(cache)`` (ProSparse's penalty, per expert).
    """
    if cache is None:
        raise ValueError("moe_backward: no cache (the forward ran with a kernel backend, which is "
                         "inference-only); run the forward with backend=None to train")
    x2, c_router, experts, c_shared, f, lse = cache
    logits, probs, idx, gates = c_router[:4]
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
                                                     wd[e], act, l1=l1)  # dx_e (N_e, D)
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
        dx_s, dsg, dsu, dsd = L.ffn_backward(dy, c_shared, sg, su, sd, act, l1=l1)  # dx_s (N, D)
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


# ======================================================================================
# parameter counts ("total" vs "activated")
# ======================================================================================
def _ffn_groups(model):
    """Per layer, the FFN weight groups: list of (layer, expert, F, n_mats) and the router size.

    expert is None (dense), e >= 0 (routed expert) or -1 (shared experts).
    """
    c = model.config
    act = model.act
    n_mats = 3 if act.gated else 2
    out = []
    for i in range(c.n_layers):
        if c.is_moe_layer(i):
            for e in range(c.n_experts):
                out.append((i, e, c.ffn_dim, n_mats))
            if c.n_shared_experts > 0:
                out.append((i, -1, c.n_shared_experts * c.shared_ffn_dim, n_mats))
        else:
            out.append((i, None, c.ffn_dim, n_mats))
    return out


def count_parameters(model, tokens=None) -> dict:
    """Total and *activated* parameter counts of a model (dense or MoE).

    Convention (the papers'): Mixtral's "12.9B active of 46.7B" and TurboSparse-Mixtral's
    "4.3B of 47B" count every non-expert parameter -- embeddings, LM head, attention, norms,
    routers -- as touched by every token, plus the experts the token is routed to. We
    report that figure and, separately, the ``*_non_embedding`` variants (Kaplan et al.'s
    convention: without ``tok_embeddings`` and ``output``), since the embedding *lookup*
    costs no compute.

    Parameters
    ----------
    model : Transformer
    tokens : optional int array (B, T): measures which FFN neurons are zero on these
        tokens (one forward pass, no gradients) and adds the sparsity-aware figures.

    Returns
    -------
    dict with
        ``total``: every scalar in ``model.params``;
        ``embedding``: tok_embeddings (+ output when untied);
        ``ffn_total``: all dense-FFN, expert and shared-expert weights (routers excluded);
        ``activated``: parameters a token touches through routing = total minus the
        (E - k) experts it does not use in each MoE layer (= total for dense models);
        ``activated_non_embedding``: the same without embeddings / LM head;
    and, given ``tokens``, averaged over the tokens:
        ``activated_gate_dense``: the gate is computed for all neurons of the token's FFNs,
        the up rows only where the gate fired (a(g) != 0), the down rows only where
        h != 0 -- a sparse kernel without a predictor;
        ``activated_ideal``: only the gate, up and down rows of neurons with h != 0 -- a
        perfect predictor (the papers' "activated parameters");
        ``*_non_embedding`` variants of both, ``ffn_active_fraction`` (mean fraction of a
        token's routed FFN neurons with h != 0) and ``dropped_slots`` (capacity drops:
        those slots cost nothing).

    Examples
    --------
    >>> import minisparse as ms
    >>> m = ms.Transformer(ms.ModelConfig(dim=8, n_layers=1, n_heads=2, ffn_dim=4,
    ...                    vocab_size=10, activation="relu"), seed=0)
    >>> count_parameters(m)["total"]      # emb 80 + norms 16 + attn 4*64 + ffn 2*32 + final norm 8
    424
    """
    c = model.config
    D = c.dim
    p = model.params
    total = int(sum(a.size for a in p.values()))
    embedding = int(p["tok_embeddings"].size + (p["output"].size if "output" in p else 0))
    groups = _ffn_groups(model)
    ffn_total = int(sum(F * n * D for (_, _, F, n) in groups))
    unused = 0
    for i in range(c.n_layers):
        if c.is_moe_layer(i):
            n_mats = 3 if model.act.gated else 2
            unused += (c.n_experts - c.top_k) * c.ffn_dim * n_mats * D
    out = {
        "total": total,
        "embedding": embedding,
        "ffn_total": ffn_total,
        "activated": total - unused,
        "activated_non_embedding": total - unused - embedding,
    }
    if tokens is None:
        return out

    # measure: one inference forward with a hook recording, per FFN call, its h and the
    # number of gate-fired neurons. The hook sees h only, so the gate count is recomputed
    # from the pre-activation through the layer's cache instead: run the training-mode
    # forward (no backward) to get g for every FFN.
    tokens = model._check_tokens(tokens)
    N = tokens.size
    _, (caches, _, _, _) = model._forward(tokens, None, None, train=True)
    gate_fn = model.act.gate_fn
    non_ffn = total - ffn_total            # attention, norms, routers, embeddings: every token
    gate_dense = 0.0
    ideal = 0.0
    active = 0.0
    slots_neurons = 0.0
    dropped = 0

    def add(g, h, F, n_mats):
        nonlocal gate_dense, ideal, active, slots_neurons
        nz_h = float(np.count_nonzero(h))                              # neuron-token pairs with h != 0
        if n_mats == 3:
            nz_gate = float(np.count_nonzero(gate_fn(g)))             # up rows needed: a(g) != 0
            gate_dense += g.shape[0] * F * D + nz_gate * D + nz_h * D
        else:
            gate_dense += g.shape[0] * F * D + nz_h * D
        ideal += n_mats * nz_h * D
        active += nz_h
        slots_neurons += g.shape[0] * F

    n_mats = 3 if model.act.gated else 2
    for i, (_, _, _, (kind, fc)) in enumerate(caches):
        if kind == "dense":
            x, g, u, h = fc
            add(g, h, c.ffn_dim, n_mats)
        else:
            x2, c_router, experts, c_shared, _, _ = fc
            routed = c_router[2].size
            kept = 0
            for (e, rows, slots, y_e, c_e) in experts:
                add(c_e[1], c_e[3], c.ffn_dim, n_mats)
                kept += rows.size
            dropped += routed - kept
            if c_shared is not None:
                add(c_shared[1], c_shared[3], c.n_shared_experts * c.shared_ffn_dim, n_mats)
    out["activated_gate_dense"] = non_ffn + gate_dense / N
    out["activated_ideal"] = non_ffn + ideal / N
    out["activated_gate_dense_non_embedding"] = out["activated_gate_dense"] - embedding
    out["activated_ideal_non_embedding"] = out["activated_ideal"] - embedding
    out["ffn_active_fraction"] = active / slots_neurons if slots_neurons else 0.0
    out["dropped_slots"] = int(dropped)
    out["n_tokens"] = int(N)
    return out


# ======================================================================================
# statistics
# ======================================================================================
def moe_stats(model, tokens) -> dict:
    """Routing and sparsity statistics of one inference forward on tokens (B, T).

    Returns ``{"layers": [...], "n_tokens": N}``, one entry per block:
        ``layer``, ``moe`` (bool); for MoE blocks ``tokens_per_expert`` (routed slots),
        ``dropped_tokens``, ``router_entropy`` (nats; max ln E), ``lb_loss``,
        ``load_ratio`` (max/min tokens per expert; inf if an expert got none);
        ``neuron_sparsity``: per expert (key e, -1 = shared, None = dense FFN) the fraction
        of zero entries of h on the tokens it received (ReLU-family activations; for others
        it is ~0), and ``dead_neurons``: per expert the fraction of its neurons that were
        zero for every token it received.

    >>> import numpy as np, minisparse as ms
    >>> m = ms.Transformer(ms.preset("nano", n_experts=4, top_k=2, activation="drelu"), seed=0)
    >>> s = moe_stats(m, np.arange(16)[None, :])
    >>> len(s["layers"][0]["tokens_per_expert"])
    4
    """
    c = model.config
    rec: Dict[tuple, list] = {}

    def hook(layer, e, h):
        rec.setdefault((layer, e), []).append(h)
        return None

    model.forward(np.asarray(tokens), ffn_hook=hook)
    aux = {k: list(v) for k, v in model.last_aux.items()}
    layers = []
    j = 0                                   # index into the per-MoE-layer aux lists
    for i in range(c.n_layers):
        entry: dict = {"layer": i, "moe": c.is_moe_layer(i)}
        keys = sorted((k for k in rec if k[0] == i), key=lambda k: (-2 if k[1] is None else k[1]))
        sp, dead = {}, {}
        for key in keys:
            h = np.concatenate(rec[key], axis=0)                     # (N_e, F)
            sp[key[1]] = float(np.mean(h == 0))
            dead[key[1]] = float(np.mean(np.all(h == 0, axis=0)))
        entry["neuron_sparsity"] = sp
        entry["dead_neurons"] = dead
        if entry["moe"]:
            tpe = aux["tokens_per_expert"][j]
            entry["tokens_per_expert"] = tpe
            entry["dropped_tokens"] = aux["dropped_tokens"][j]
            entry["router_entropy"] = aux["router_entropy"][j]
            entry["lb_loss"] = aux["lb_loss"][j]
            entry["load_ratio"] = (max(tpe) / min(tpe)) if min(tpe) > 0 else float("inf")
            j += 1
        layers.append(entry)
    return {"layers": layers, "n_tokens": int(np.asarray(tokens).size)}


def format_moe_stats(stats: dict) -> str:
    """A plain-text table of :func:`moe_stats` output, one line per layer."""
    lines = [f"{'layer':>5} {'kind':>5} {'tokens/expert':<40} {'H(router)':>9} {'max/min':>7} {'zeros in h':>10}"]
    for s in stats["layers"]:
        sp = s["neuron_sparsity"]
        mean_sp = float(np.mean(list(sp.values()))) if sp else float("nan")
        if s["moe"]:
            lines.append(f"{s['layer']:>5} {'moe':>5} {str(s['tokens_per_expert']):<40} "
                         f"{s['router_entropy']:>9.3f} {s['load_ratio']:>7.2f} {mean_sp:>10.1%}")
        else:
            lines.append(f"{s['layer']:>5} {'dense':>5} {'-':<40} {'-':>9} {'-':>7} {mean_sp:>10.1%}")
    return "\n".join(lines)
