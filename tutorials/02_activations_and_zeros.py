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
# # 2. Activation functions, and where zeros come from
#
# **The idea:** a neuron can be skipped only when its output is *exactly* zero. ReLU
# outputs exact zeros for every negative input; SiLU and GELU (inside SwiGLU and GeGLU, the
# activations of most open models) are small for negative inputs but not zero. We check
# this first on the functions themselves, then on the **real activations** of four small
# models trained briefly on the same text: SwiGLU, GeGLU, ReGLU and dReLU.
#
# Quick mode (`MINISPARSE_QUICK=1`) trains for a few steps only; the claims about exact
# zeros do not depend on how long the models train.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import minisparse as ms
from minisparse.data import load_corpus
from minisparse.sparsity import ffn_input_tap
from minisparse.train import TrainConfig, evaluate, train

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
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## The functions near zero
#
# Evaluate each plain activation on a grid of negative inputs and count exact zeros.

# %%
x = -np.logspace(-3, 1.5, 10_000).astype(np.float32)             # (10000,) from -0.001 to -31.6
for name in ("relu", "relu2", "silu", "gelu", "gelu_tanh"):
    y = ms.get_activation(name).forward(x)                       # (10000,)
    print(f"{name:<10s} f(-1) = {ms.get_activation(name).forward(np.float32(-1.0)):+.4f}   "
          f"exact zeros on x < 0: {np.mean(y == 0):6.1%}   smallest |f(x)| that is not 0: "
          f"{np.min(np.abs(y[y != 0])) if np.any(y != 0) else float('nan'):.1e}")

# %% [markdown]
# ReLU and squared ReLU are zero on the whole negative half-line. SiLU is never zero here;
# GELU only becomes exactly 0 through rounding, for inputs below about -5.5 in float32
# (where $1 + \mathrm{erf}(x/\sqrt2)$ rounds to 0), which a trained model's
# pre-activations rarely reach.
#
# The gated activations multiply a gate and an "up" value: $h = a(g)\,b(u)$.

# %%
for name in ("swiglu", "geglu", "reglu", "drelu", "relu2glu"):
    act = ms.get_activation(name)
    print(f"{name:<9s} gated={act.gated}  gate={act.gate_kind:<6s} up={act.up_kind:<8s} "
          f"exact_zeros={act.exact_zeros}")

# %% [markdown]
# `exact_zeros` is what the sparse kernels look at: only then does the gate alone tell
# which neurons can be skipped.
#
# ## Four small models, trained on the same text
#
# The embedded corpus is the Python standard library's own source code (no download).
# Each model has the same shape, seed, data and steps; only the activation differs.

# %%
corpus = load_corpus(max_bytes=400_000 if QUICK else 2_000_000)
print(corpus)
ACTS = ["swiglu", "geglu", "reglu", "drelu"]
tcfg = TrainConfig(steps=25 if QUICK else 400, batch_size=8 if QUICK else 16, seq_len=64,
                   lr=3e-3, warmup=5 if QUICK else 40, eval_every=0, eval_batches=2 if QUICK else 8,
                   progress=False, log_every=1000)
models, histories = {}, {}
for act in ACTS:
    t0 = time.perf_counter()
    model = ms.Transformer(ms.preset("nano", activation=act), seed=0)
    result = train(model, corpus, tcfg)
    models[act], histories[act] = model, result.history
    print(f"{act:<7s} {tcfg.steps} steps in {time.perf_counter() - t0:5.1f} s, "
          f"validation loss {result.final_val_loss:.3f} nats/byte")

# %% [markdown]
# ## Recording the real activations
#
# `model(tokens, ffn_hook=hook)` calls `hook(layer, expert, h)` with every FFN's
# intermediate activation `h` (tokens, F). Returning `None` leaves the model unchanged. We
# also capture the FFN *input* with `ffn_input_tap`, to recompute the gate and up
# pre-activations $g = x W_{gate}^\top$, $u = x W_{up}^\top$ and see where the zeros come from.

# %%
rng = np.random.default_rng(1234)
tokens, _ = corpus.get_batch("val", 4 if QUICK else 16, 64, rng)   # (B, T) held-out text
records = {}
for act, model in models.items():
    hs, xs = {}, {}

    def hook(layer, expert, h):
        hs[layer] = h.copy()                                     # (N, F)

    def tap(layer, x2):
        xs[layer] = x2.copy()                                    # (N, D)

    with ffn_input_tap(model, tap):
        model(tokens, ffn_hook=hook)
    records[act] = (hs, xs)

F = ms.preset("nano").ffn_dim
print("h of layer 0:", records["drelu"][0][0].shape, " (tokens, F) with F =", F)

# %% [markdown]
# ## How many exact zeros?

# %%
rows = []
print(f"{'activation':<10s} {'layer':>5s} {'exact 0':>8s} {'|h|<1e-3':>9s} {'|h|<1e-2':>9s}  "
      f"{'g<=0':>6s} {'g<=0 or u<=0':>13s}")
for act, (hs, xs) in records.items():
    for layer in sorted(hs):
        h, x2 = hs[layer], xs[layer]                             # (N, F), (N, D)
        p = models[act].params
        g = x2 @ p[f"layers.{layer}.feed_forward.w_gate"].T      # (N, F)
        u = x2 @ p[f"layers.{layer}.feed_forward.w_up"].T        # (N, F)
        row = dict(act=act, layer=layer, zero=np.mean(h == 0), e3=np.mean(np.abs(h) < 1e-3),
                   e2=np.mean(np.abs(h) < 1e-2), g_neg=np.mean(g <= 0), gu_neg=np.mean((g <= 0) | (u <= 0)))
        rows.append(row)
        print(f"{act:<10s} {layer:>5d} {row['zero']:8.1%} {row['e3']:9.1%} {row['e2']:9.1%}  "
              f"{row['g_neg']:6.1%} {row['gu_neg']:13.1%}")

# %% [markdown]
# Read the table column by column:
#
# * **exact 0**: SwiGLU and GeGLU have (almost) none. ReGLU's zeros are exactly the
#   neurons with a non-positive gate (`g<=0`); dReLU's are those with a non-positive gate
#   **or** up value, which is why dReLU is sparser.
# * **|h| < eps**: SwiGLU has many *small* values; skipping them is an approximation whose
#   cost must be measured (top-k, CETT: see tutorial 4 and `minisparse.sparsity`).
#
# ## Histograms of real activations

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
bins = np.linspace(-0.3, 0.3, 121)
for act, (hs, _) in records.items():
    h = np.concatenate([hs[i].ravel() for i in sorted(hs)])     # all layers
    axes[0].hist(np.clip(h, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.3, label=act)
axes[0].set_yscale("log")
axes[0].set_xlabel("h (clipped to ±0.3)")
axes[0].set_ylabel("count (log)")
axes[0].set_title("intermediate activations h, all layers")
axes[0].legend()

eps = np.logspace(-8, 0, 100)
for act, (hs, _) in records.items():
    a = np.sort(np.abs(np.concatenate([hs[i].ravel() for i in sorted(hs)])))
    frac = np.searchsorted(a, eps, side="left") / a.size         # fraction with |h| < eps
    axes[1].semilogx(eps, frac, lw=1.5, label=f"{act} (exact zeros {np.mean(a == 0):.0%})")
axes[1].set_xlabel("eps")
axes[1].set_ylabel("fraction of |h| < eps")
axes[1].set_title("as eps -> 0, only exact zeros remain")
axes[1].legend()
plt.tight_layout()
show_figure("02_activations_and_zeros")

# %% [markdown]
# The left plot shows the ReLU-family spike: a huge bin at exactly 0 (drawn at the centre).
# The right plot is the clearest: as the threshold `eps` shrinks, the SwiGLU and GeGLU
# curves fall to zero — their "sparsity" is an artefact of the threshold — while ReGLU and
# dReLU level off at their exact-zero fraction, which a kernel can skip at no cost at all.
#
# ## Does sparsity cost quality?
#
# A fair comparison of quality needs longer training (tutorial 3); here we only check that
# all four models learned something from the same budget.

# %%
for act, model in models.items():
    # the same fixed held-out batches as the trainer's evaluation
    val = evaluate(model, corpus, batch_size=tcfg.batch_size, seq_len=tcfg.seq_len, n_batches=tcfg.eval_batches)
    print(f"{act:<7s} validation loss {val:.3f} nats/byte   (a uniform guess: ln(258) = {np.log(258):.3f})")

# %% [markdown]
# ## What this tutorial claims, checked

# %%
by = {(r["act"], r["layer"]): r for r in rows}
for layer in range(ms.preset("nano").n_layers):
    for act in ("swiglu", "geglu"):
        assert by[act, layer]["zero"] < 0.01, (act, layer, by[act, layer]["zero"])     # (almost) no exact zeros
    for act in ("reglu", "drelu"):
        assert by[act, layer]["zero"] > 0.3, (act, layer, by[act, layer]["zero"])      # many exact zeros
    # where the zeros come from: ReGLU's are the non-positive gates, dReLU's are g<=0 or u<=0
    assert abs(by["reglu", layer]["zero"] - by["reglu", layer]["g_neg"]) < 1e-3
    assert abs(by["drelu", layer]["zero"] - by["drelu", layer]["gu_neg"]) < 1e-3
    assert by["drelu", layer]["gu_neg"] >= by["drelu", layer]["g_neg"]
# SiLU has no exact zeros on the negative grid, ReLU is zero on all of it
assert np.all(ms.get_activation("silu").forward(x) != 0)
assert np.all(ms.get_activation("relu").forward(x) == 0)
# every model learned: validation loss well below the uniform ln(258)
for act in ACTS:
    assert histories[act][-1]["loss"] < np.log(258) - 0.5, (act, histories[act][-1]["loss"])
print("all checks passed")
