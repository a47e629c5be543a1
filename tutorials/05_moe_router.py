# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. The Mixture-of-Experts router: routing, load balance, specialisation
#
# **The idea:** an MoE layer has E expert FFNs and a router, a (D, E) matrix that scores
# the experts for each token; the token goes to its top-k experts, and their outputs are
# mixed with softmax weights (Mixtral: softmax over the k chosen logits). Left alone, a
# router tends to overload a few experts; the Switch Transformer's load-balancing loss
# $E\sum_i f_i P_i$ keeps the load even. We route by hand, train two small MoE models
# (with and without that loss), look at how tokens spread over experts and what each
# expert specialises in, and count total vs activated parameters with dReLU experts.
#
# Quick mode trains for a few steps only; the full mode trains long enough for the
# experts to specialise.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import minisparse as ms
from minisparse.data import load_corpus
from minisparse.moe import router_forward
from minisparse.stats import count_parameters, format_moe_stats, moe_stats
from minisparse.sparsity import ffn_input_tap
from minisparse.train import TrainConfig, train

QUICK = os.environ.get("MINISPARSE_QUICK", "0") == "1"


def show_figure(name):
    """Show the figure in a notebook or a window; without a display (a script under a
    non-interactive backend such as Agg) save it as runs/tutorials/NAME.png instead."""
    if plt.get_backend().lower() in ("agg", "pdf", "ps", "svg", "pgf", "cairo", "template"):
        path = os.path.abspath(os.path.join("runs", "tutorials", f"{name}.png"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plt.savefig(path, dpi=100)
        plt.close()
        print(f"no display: figure saved to {path}")
    else:
        plt.show()
np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## Routing by hand
#
# A nano-sized model with 4 experts per layer (8 in full mode), top-2 routing, dReLU
# experts. Its parameters: a router (D, E) and the experts' weights stacked on a leading
# expert axis, (E, F, D) each, neuron-major like the dense FFN.

# %%
E, K = (4, 2) if QUICK else (8, 2)
cfg = ms.preset("nano", n_experts=E, top_k=K, activation="drelu")
model = ms.Transformer(cfg, seed=0)
for name, w in model.params.items():
    if name.startswith("layers.0.feed_forward"):
        print(f"{name:<36s} {w.shape}")

# %%
rng = np.random.default_rng(0)
x = rng.normal(size=(5, cfg.dim)).astype(np.float32)            # (N=5, D) five tokens' FFN inputs
w_router = model.params["layers.0.feed_forward.router"]          # (D, E)
logits = x @ w_router                                            # (N, E) one score per expert
idx = np.argsort(-logits, axis=1, kind="stable")[:, :K]          # (N, k) the top-k experts
sel = np.take_along_axis(logits, idx, axis=1)                    # (N, k) their logits
gates = np.exp(sel - sel.max(1, keepdims=True))
gates /= gates.sum(1, keepdims=True)                             # (N, k) softmax over the chosen k (Mixtral)
for n in range(len(x)):
    print(f"token {n}: logits {logits[n]} -> experts {idx[n]} with weights {gates[n]}")

lib_gates, lib_idx, _ = router_forward(x, w_router, K, "topk_softmax")
print("same as minisparse.moe.router_forward:", np.array_equal(lib_idx, idx) and np.allclose(lib_gates, gates))

# %% [markdown]
# The layer output is $y = \sum_{j} \text{gate}_j \cdot \mathrm{FFN}_{idx_j}(x)$. The
# router's choice is discrete: the gradient reaches the router only through the gate
# weights of the chosen experts, and through the auxiliary loss.
#
# ## Training with and without the load-balancing loss
#
# Same data, seed and steps; one model with `router_aux_loss_coef=0.01` (Switch's value),
# one with 0.

# %%
corpus = load_corpus(max_bytes=400_000 if QUICK else 2_000_000)
tcfg = TrainConfig(steps=30 if QUICK else 600, batch_size=8 if QUICK else 16, seq_len=64, lr=3e-3,
                   warmup=5 if QUICK else 50, eval_every=0, eval_batches=2 if QUICK else 8,
                   progress=False, log_every=1000)
trained, histories = {}, {}
for coef in (0.01, 0.0):
    t0 = time.perf_counter()
    m = ms.Transformer(cfg.replace(router_aux_loss_coef=coef), seed=0)
    lb_trace = []
    res = train(m, corpus, tcfg, callback=lambda step, rec, m=m, tr=lb_trace: tr.append(np.mean(m.last_aux["lb_loss"])))
    trained[coef], histories[coef] = m, (res.history, lb_trace)
    print(f"aux coef {coef:<5}: {tcfg.steps} steps in {time.perf_counter() - t0:5.1f} s, "
          f"validation loss {res.final_val_loss:.3f}, final load-balancing loss {lb_trace[-1]:.3f} (1 = uniform)")

# %% [markdown]
# ## How tokens spread over the experts
#
# `moe_stats` runs one forward pass and reports, per layer, the routed slots per expert,
# the router's entropy (ln E = perfectly undecided), the ratio of the busiest to the
# idlest expert, and the fraction of zeros in each expert's dReLU activations.

# %%
tokens, _ = corpus.get_batch("val", 8 if QUICK else 32, 64, np.random.default_rng(7))   # (B, T)
stats = {}
for coef, m in trained.items():
    stats[coef] = moe_stats(m, tokens)
    print(f"--- router_aux_loss_coef = {coef}")
    print(format_moe_stats(stats[coef]))

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for coef, (hist, lb) in histories.items():
    axes[0].plot(lb, label=f"aux coef {coef}")
axes[0].axhline(1.0, color="0.5", lw=0.8, ls="--")
axes[0].set_xlabel("step")
axes[0].set_ylabel("E * sum f_i P_i (mean over layers)")
axes[0].set_title("load-balancing loss during training")
axes[0].legend()
width = 0.4
for j, (coef, st) in enumerate(stats.items()):
    tpe = np.array(st["layers"][0]["tokens_per_expert"])
    axes[1].bar(np.arange(E) + (j - 0.5) * width, tpe / tpe.sum(), width, label=f"aux coef {coef}")
axes[1].axhline(1 / E, color="0.5", lw=0.8, ls="--")
axes[1].set_xlabel("expert")
axes[1].set_ylabel("share of routed slots, layer 0")
axes[1].set_title("expert load (dashed: uniform)")
axes[1].legend()
plt.tight_layout()
show_figure("05_router_load")

# %% [markdown]
# ## What do the experts specialise in?
#
# Capture each MoE layer's input with `ffn_input_tap`, route it, and count which expert
# the tokens of each byte class (letters, digits, spaces, newlines, punctuation ...) go to.

# %%
m = trained[0.01]
inputs = {}
with ffn_input_tap(m, lambda layer, x2: inputs.__setitem__(layer, x2.copy())):
    m(tokens)
classes = {"lowercase": lambda b: (b >= 97) & (b <= 122), "uppercase": lambda b: (b >= 65) & (b <= 90),
           "digit": lambda b: (b >= 48) & (b <= 57), "space": lambda b: b == 32, "newline": lambda b: b == 10,
           "punctuation": lambda b: np.isin(b, list(b"()[]{}:.,=_'\"#+-*/<>"))}
byte = tokens.reshape(-1)                                        # (N,) the token each row belongs to
layer = cfg.n_layers - 1
_, chosen, _ = router_forward(inputs[layer], m.params[f"layers.{layer}.feed_forward.router"], K, cfg.router)
share = np.zeros((len(classes), E))                              # (classes, E)
for c, (cname, is_c) in enumerate(classes.items()):
    rows = chosen[is_c(byte)]                                    # (n_c, k) experts of that class's tokens
    share[c] = np.bincount(rows.reshape(-1), minlength=E) / max(rows.size, 1)
print(f"layer {layer}: share of each byte class's routing slots per expert")
print(f"{'class':<12s}" + "".join(f"  e{e:<4d}" for e in range(E)))
for cname, row in zip(classes, share):
    print(f"{cname:<12s}" + "".join(f"  {v:5.2f}" for v in row))
plt.figure(figsize=(7, 3.2))
plt.imshow(share, cmap="viridis", aspect="auto")
plt.yticks(range(len(classes)), list(classes))
plt.xticks(range(E), [f"expert {e}" for e in range(E)])
plt.colorbar(label="share of the class's slots")
plt.title(f"expert specialisation, layer {layer}")
plt.tight_layout()
show_figure("05_expert_specialisation")

# %% [markdown]
# Each row sums to 1; a uniform router would put $1/E$ everywhere. Rows far from uniform
# mean the router learned to send that kind of token to particular experts.
#
# ## Total vs activated parameters
#
# `count_parameters` reports every parameter (`total`), those a token touches through
# routing (`activated`: k of E experts), and, measured on real tokens with dReLU experts,
# those it needs once zero neurons are skipped: `activated_gate_dense` (gate rows for all
# neurons of the chosen experts, up and down rows only for active ones: a kernel without
# predictor) and `activated_ideal` (a perfect predictor; the figure papers report).

# %%
counts = count_parameters(m, tokens)
for key in ("total", "activated", "activated_gate_dense", "activated_ideal", "embedding"):
    print(f"{key:<22s} {counts[key]:>12,.0f}  ({counts[key] / counts['total']:.0%} of total)")
print(f"fraction of active neurons inside the chosen experts: {counts['ffn_active_fraction']:.1%}")

# %% [markdown]
# ## What this tutorial claims, checked

# %%
assert np.array_equal(lib_idx, idx) and np.allclose(lib_gates, gates, atol=1e-6)   # routing by hand == library
assert np.allclose(gates.sum(1), 1)                                             # top-k softmax weights sum to 1
N = tokens.size
for coef, st in stats.items():
    for entry in st["layers"]:
        assert sum(entry["tokens_per_expert"]) == N * K                          # no token dropped, k slots each
        assert 0 <= entry["router_entropy"] <= np.log(E) + 1e-9
        assert all(v > 0.3 for v in entry["neuron_sparsity"].values())           # dReLU experts are sparse
# the load-balancing loss keeps every expert in use, and balances better than no loss
lb_with = np.mean([e["lb_loss"] for e in stats[0.01]["layers"]])
lb_without = np.mean([e["lb_loss"] for e in stats[0.0]["layers"]])
print(f"load-balancing loss on held-out tokens: with aux {lb_with:.3f}, without {lb_without:.3f}")
assert all(min(e["tokens_per_expert"]) > 0 for e in stats[0.01]["layers"])
assert lb_with <= lb_without + 0.05
assert np.allclose(share.sum(1)[share.sum(1) > 0], 1)
assert counts["activated_ideal"] < counts["activated"] < counts["total"]          # routing, then zeros, cut the count
print("all checks passed")
