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
# # 4. ReLUfication: from a trained SwiGLU model to ReGLU and to dReLU
#
# **The idea:** most open models use SwiGLU, which gives no exact zeros. *ReLUfication*
# (Mirzadeh et al. 2023) keeps every trained weight, swaps $\mathrm{silu}(g)\,u$ for
# $\mathrm{relu}(g)\,u$ (ReGLU), and trains a little more so the model recovers.
# TurboSparse (Song et al. 2024) swaps to dReLU instead, $\mathrm{relu}(g)\,\mathrm{relu}(u)$,
# for many more zeros. We do both to a small SwiGLU model and measure validation loss and
# exact-zero sparsity **before** the swap, **right after** it, and **after recovery** —
# next to a SwiGLU model trained for the same extra steps, the fair baseline.
#
# Quick mode trains for a few dozen steps (the numbers are then rough); the full mode
# trains the SwiGLU model for 800 steps and recovers for 300.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import minisparse as ms
from minisparse.data import load_corpus
from minisparse.sparsity import format_report, measure, relufy
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
PRETRAIN, RECOVER = (40, 20) if QUICK else (800, 300)
EVAL = dict(batch_size=8, seq_len=64, n_batches=2 if QUICK else 8)   # fixed held-out batches

# %% [markdown]
# ## A trained SwiGLU model

# %%
corpus = load_corpus(max_bytes=400_000 if QUICK else 2_000_000)
base_cfg = TrainConfig(steps=PRETRAIN, batch_size=8 if QUICK else 16, seq_len=64, lr=3e-3,
                       warmup=5 if QUICK else 50, eval_every=0, eval_batches=EVAL["n_batches"],
                       progress=False, log_every=1000)
t0 = time.perf_counter()
swiglu = ms.Transformer(ms.preset("nano", activation="swiglu"), seed=0)
pre = train(swiglu, corpus, base_cfg)
print(f"SwiGLU: {PRETRAIN} steps in {time.perf_counter() - t0:.1f} s")
print("before:", measure(swiglu, corpus, **EVAL))

# %% [markdown]
# ## The swap alone
#
# `relufy(model, to=...)` returns a *copy* with the same weights and the new activation
# (the original is left unchanged). Without a corpus it only swaps.

# %%
swapped = relufy(swiglu, to="drelu").model
print("activation:", swiglu.config.activation, "->", swapped.config.activation)
same = all(np.array_equal(swiglu.params[k], swapped.params[k]) for k in swiglu.params)
print("every weight unchanged:", same)

# %% [markdown]
# ## Swap, then recover
#
# With a corpus and `steps`, `relufy` measures each stage and trains the new model on the
# training split. Recovery uses a lower learning rate than pre-training, as the papers do.
# The baseline continues training the SwiGLU model with the same settings.

# %%
rec_cfg = TrainConfig(steps=RECOVER, batch_size=base_cfg.batch_size, seq_len=64, lr=1e-3,
                      warmup=max(1, RECOVER // 10), eval_every=0, eval_batches=EVAL["n_batches"],
                      progress=False, log_every=1000, seed=1)
ev = dict(eval_batches=EVAL["n_batches"], eval_batch_size=EVAL["batch_size"], eval_seq_len=EVAL["seq_len"])
results = {}
for target in ("reglu", "drelu"):
    t0 = time.perf_counter()
    results[target] = relufy(swiglu, to=target, corpus=corpus, steps=RECOVER, train_config=rec_cfg, **ev)
    print(f"\n{format_report(results[target].report)}\n({time.perf_counter() - t0:.1f} s)")

baseline = ms.Transformer(swiglu.config, params={k: v.copy() for k, v in swiglu.params.items()})
base_hist = train(baseline, corpus, rec_cfg).history
after_baseline = measure(baseline, corpus, **EVAL)
print(f"\nSwiGLU trained {RECOVER} more steps (baseline): val loss {after_baseline['val_loss']:.4f}, "
      f"exact zeros {after_baseline['exact_zero']:.1%}")

# %% [markdown]
# ## Before / after, side by side

# %%
stages = ["before", "swapped", "recovered"]
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for j, (target, res) in enumerate(results.items()):
    st = res.report["stages"]
    off = (j - 0.5) * 0.35
    axes[0].bar(np.arange(3) + off, [st[s]["val_loss"] for s in stages], 0.35, label=target)
    axes[1].bar(np.arange(3) + off, [st[s]["exact_zero"] for s in stages], 0.35, label=target)
axes[0].axhline(after_baseline["val_loss"], color="k", ls="--", lw=1, label="SwiGLU, same extra steps")
axes[0].set_ylim(min(after_baseline["val_loss"], min(r.report["stages"]["recovered"]["val_loss"]
                                                    for r in results.values())) * 0.9, None)
for ax, title in ((axes[0], "validation loss (nats/byte)"), (axes[1], "exact zeros in h")):
    ax.set_xticks(range(3))
    ax.set_xticklabels(stages)
    ax.set_title(title)
    ax.legend()


def smooth(v, k=10):
    v = np.asarray(v, dtype=float)
    return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v


for target, res in results.items():
    axes[2].plot(smooth([r["loss"] for r in res.history]), label=f"{target} recovery")
axes[2].plot(smooth([r["loss"] for r in base_hist]), "k--", label="SwiGLU continued")
axes[2].set_xlabel("recovery step")
axes[2].set_title("training loss during recovery")
axes[2].legend()
plt.tight_layout()
show_figure("04_relufication")

# %% [markdown]
# What to read in the numbers:
#
# * **swapped**: zeros appear at once (ReGLU: the negative gates; dReLU: the negative gates
#   *or* ups), and the loss jumps, more for dReLU, which also cuts the negative half of the
#   up projection that the trained weights relied on;
# * **recovered**: training with the new activation brings the loss back down, while the
#   zeros stay; compare with the dashed SwiGLU baseline trained for the same extra steps.
#   How close the recovered models get is a question of the recovery budget — the papers
#   use billions of tokens (see the concept page on ReLUfication and its limits).
#
# ## What this tutorial claims, checked

# %%
before = results["reglu"].report["stages"]["before"]
assert same                                                                   # the swap keeps every weight
assert swiglu.config.activation == "swiglu"                                   # and leaves the original alone
assert before["exact_zero"] < 0.01                                            # SwiGLU: no exact zeros
for target, res in results.items():
    st = res.report["stages"]
    assert st["swapped"]["exact_zero"] > 0.3, (target, st["swapped"])         # zeros appear with the swap
    assert st["recovered"]["exact_zero"] > 0.3, (target, st["recovered"])     # ... and stay after recovery
    assert st["recovered"]["val_loss"] < st["swapped"]["val_loss"], target    # recovery recovers
    assert res.model.config.activation == target
# with the same weights, dReLU's zeros include ReGLU's (a zero gate zeroes both)
assert (results["drelu"].report["stages"]["swapped"]["exact_zero"]
        >= results["reglu"].report["stages"]["swapped"]["exact_zero"])
print("all checks passed")
