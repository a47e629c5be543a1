"""Counting and routing statistics of a whole model: activated parameters, MoE load.

These sit *above* the model: they call its public API (``forward``, ``forward_cache``,
``ffn_keys``, ``ffn_weights``) and read its named caches, never its private state.

Dimension key: N tokens, D dim, E experts, k top_k, F ffn neurons per FFN.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from .xp import to_numpy

__all__ = ["count_parameters", "moe_stats", "format_moe_stats"]


def _ffn_sizes(model):
    """Per FFN (layer, expert): its neuron count F and number of weight matrices (2 or 3)."""
    n_mats = 3 if model.act.gated else 2
    return {key: (model.ffn_weights(*key).w_gate.shape[0], n_mats) for key in model.ffn_keys()}


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
    and, given ``tokens``, averaged over the tokens (see :func:`_measured_counts`):
        ``activated_gate_dense``, ``activated_ideal``, their ``*_non_embedding``
        variants, ``ffn_active_fraction``, ``dropped_slots`` and ``n_tokens``.

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
    sizes = _ffn_sizes(model)
    ffn_total = int(sum(F * n * D for (F, n) in sizes.values()))
    n_mats = 3 if model.act.gated else 2
    unused = sum((c.n_experts - c.top_k) * c.ffn_dim * n_mats * D
                 for i in range(c.n_layers) if c.is_moe_layer(i))
    out = {
        "total": total,
        "embedding": embedding,
        "ffn_total": ffn_total,
        "activated": total - unused,
        "activated_non_embedding": total - unused - embedding,
    }
    if tokens is not None:
        out.update(_measured_counts(model, tokens, non_ffn=total - ffn_total, embedding=embedding))
    return out


def _measured_counts(model, tokens, non_ffn: int, embedding: int) -> dict:
    """The sparsity-aware counts of :func:`count_parameters`, from one training-mode forward.

    ``activated_gate_dense``: the gate is computed for all neurons of the token's FFNs, the
    up rows only where the gate fired (a(g) != 0), the down rows only where h != 0 -- a
    sparse kernel without a predictor. ``activated_ideal``: only the gate, up and down rows
    of neurons with h != 0 -- a perfect predictor (the papers' "activated parameters").
    ``ffn_active_fraction``: mean fraction of a token's routed FFN neurons with h != 0;
    ``dropped_slots``: capacity drops (those slots cost nothing).
    """
    D = model.config.dim
    gated = model.act.gated
    n_mats = 3 if gated else 2
    gate_fn = model.act.gate_fn
    _, fwd = model.forward_cache(tokens)               # named caches: g and h of every FFN
    N = int(fwd.tokens.size)
    acc = dict(gate_dense=0.0, ideal=0.0, active=0.0, slots=0.0)
    dropped = 0

    def add(fc):                                       # fc: layers.FFNCache (x, g, u, h)
        n_tok, F = fc.g.shape
        nz_h = float(np.count_nonzero(fc.h))           # neuron-token pairs with h != 0
        up_rows = float(np.count_nonzero(gate_fn(fc.g))) if gated else 0.0  # a(g) != 0
        acc["gate_dense"] += n_tok * F * D + up_rows * D + nz_h * D
        acc["ideal"] += n_mats * nz_h * D
        acc["active"] += nz_h
        acc["slots"] += n_tok * F

    for blk in fwd.blocks:
        if blk.ffn.kind == "dense":
            add(blk.ffn.cache)
            continue
        mc = blk.ffn.cache                             # minisparse.moe.MoECache
        for ex in mc.experts:
            add(ex.ffn)
        dropped += int(mc.router.idx.size) - sum(int(ex.rows.size) for ex in mc.experts)
        if mc.shared is not None:
            add(mc.shared)
    out = {"activated_gate_dense": non_ffn + acc["gate_dense"] / N,
           "activated_ideal": non_ffn + acc["ideal"] / N}
    out["activated_gate_dense_non_embedding"] = out["activated_gate_dense"] - embedding
    out["activated_ideal_non_embedding"] = out["activated_ideal"] - embedding
    out["ffn_active_fraction"] = acc["active"] / acc["slots"] if acc["slots"] else 0.0
    out["dropped_slots"] = int(dropped)
    out["n_tokens"] = N
    return out


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

    model.forward(tokens, ffn_hook=hook)
    aux = {k: list(v) for k, v in model.last_aux.items()}
    layers = []
    j = 0                                   # index into the per-MoE-layer aux lists
    for i in range(c.n_layers):
        entry: dict = {"layer": i, "moe": c.is_moe_layer(i)}
        keys = sorted((k for k in rec if k[0] == i), key=lambda k: (-2 if k[1] is None else k[1]))
        entry["neuron_sparsity"], entry["dead_neurons"] = {}, {}
        for key in keys:
            h = np.concatenate(rec[key], axis=0)                     # (N_e, F)
            entry["neuron_sparsity"][key[1]] = float(np.mean(h == 0))
            entry["dead_neurons"][key[1]] = float(np.mean(np.all(h == 0, axis=0)))
        if entry["moe"]:
            tpe = aux["tokens_per_expert"][j]
            entry["tokens_per_expert"] = tpe
            entry["dropped_tokens"] = aux["dropped_tokens"][j]
            entry["router_entropy"] = aux["router_entropy"][j]
            entry["lb_loss"] = aux["lb_loss"][j]
            entry["load_ratio"] = (max(tpe) / min(tpe)) if min(tpe) > 0 else float("inf")
            j += 1
        layers.append(entry)
    return {"layers": layers, "n_tokens": int(to_numpy(tokens).size)}


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
