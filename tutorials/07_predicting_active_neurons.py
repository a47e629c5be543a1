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
# # 7. Predicting active neurons before computing them
#
# **The idea:** with a dense gate, a sparse kernel still reads all of $W_{gate}$ to find
# out which neurons fire, which caps the speed-up at $3/(1+2a)$. Deja Vu (Liu et al. 2023)
# and PowerInfer (Song et al. 2023) put a small low-rank MLP,
# $p(x) = \sigma(\mathrm{fc2}(\mathrm{relu}(\mathrm{fc1}(x))))$, in front of each FFN to
# guess the active neurons from the FFN's input; then gate, up and down are read only for
# those, and the ideal becomes $3/(3a + c)$ with $c$ the predictor's cost. We record a
# trained dReLU model's activations, compare a learned predictor with the simplest
# baseline (always take the most frequently active, "hot", neurons), tune the threshold
# for recall, and measure what the predicted masks cost in validation loss.
#
# Quick mode trains and records little; the full mode enough for the predictors to learn.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import minisparse as ms
from minisparse.data import load_corpus
from minisparse.predictor import (evaluate, fit_predictors, loss_change, predicted_decoding, record,
                                  train_predictor, tune_threshold)
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
STEPS, N_BATCHES, RANK, EPOCHS = (30, 6, 16, 8) if QUICK else (600, 32, 32, 20)

# %% [markdown]
# ## A trained dReLU model

# %%
corpus = load_corpus(max_bytes=400_000 if QUICK else 2_000_000)
model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
t0 = time.perf_counter()
res = train(model, corpus, TrainConfig(steps=STEPS, batch_size=8 if QUICK else 16, seq_len=64,
                                       warmup=5 if QUICK else 30, eval_every=0, eval_batches=2,
                                       progress=False, log_every=1000))
print(f"{STEPS} steps in {time.perf_counter() - t0:.1f} s, validation loss {res.final_val_loss:.3f}")

# %% [markdown]
# ## Recording what each FFN sees and which neurons fire
#
# `record(model, batches)` runs the model and returns, per FFN (key `(layer, expert)`,
# expert `None` for a dense FFN), its inputs `x` (N, D) and labels `y` (N, F): neuron f
# is non-zero for token n. We record training text for fitting and held-out text for
# testing.

# %%
rng = np.random.default_rng(0)
train_batches = [corpus.get_batch("train", 8, 64, rng)[0] for _ in range(N_BATCHES)]   # each (8, 64)
test_batches = [corpus.get_batch("val", 8, 64, rng)[0] for _ in range(max(2, N_BATCHES // 4))]
data = record(model, train_batches)
test = record(model, test_batches)
for key, (x, y) in data.items():
    print(f"layer {key[0]}: x {x.shape}, y {y.shape}, fraction of neurons active {y.mean():.1%}")

# %% [markdown]
# ## Hot neurons: how skewed is activation frequency?
#
# PowerInfer observed that a few "hot" neurons fire for most tokens and the rest rarely.
# The simplest predictor follows: always compute the neurons that fire most often.

# %%
x0, y0 = data[(0, None)]                                         # layer 0: (N, D), (N, F)
xt, yt = test[(0, None)]                                         # held-out
freq = y0.mean(axis=0)                                           # (F,) activation frequency per neuron
order = np.argsort(-freq)                                        # hottest first
F = y0.shape[1]
print("activation frequency of the 5 hottest neurons:", np.round(freq[order[:5]], 3))
print("... and of the 5 coldest:", np.round(freq[order[-5:]], 3))


def hot_set_recall(k):
    """Recall on held-out tokens when the k hottest neurons are always computed."""
    chosen = np.zeros(F, dtype=bool)
    chosen[order[:k]] = True
    return (yt & chosen).sum() / max(yt.sum(), 1)


# %% [markdown]
# ## A learned predictor for one layer
#
# `train_predictor(x, y, rank=...)` fits $\mathrm{fc2}(\mathrm{relu}(\mathrm{fc1}(x)))$
# with a class-weighted binary cross-entropy (most labels are 0: without weights it would
# learn "never active"). Its output is a probability per neuron; the threshold trades
# **recall** (a missed active neuron changes the output) for **precision** (an extra
# neuron only costs time).

# %%
t0 = time.perf_counter()
pred = train_predictor(x0, y0, rank=RANK, epochs=EPOCHS, lr=3e-3)
print(f"trained in {time.perf_counter() - t0:.1f} s: rank {pred.rank}, cost {pred.cost():.3f} "
      f"(weights read per token, in units of one F x D matrix)")
print(f"{'threshold':>9s} {'recall':>7s} {'precision':>9s} {'predicted active':>16s}")
sweep = []
for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
    m = evaluate(pred, xt, yt, threshold=t)
    sweep.append(m)
    print(f"{t:9.2f} {m['recall']:7.3f} {m['precision']:9.3f} {1 - m['predicted_sparsity']:16.1%}")

# %% [markdown]
# Learned vs hot neurons, at equal recall: how many neurons must be computed?

# %%
probs = pred.predict_proba(xt)                                   # (N, F) held-out probabilities
curve_learned, curve_hot = [], []
for t in np.linspace(0.01, 0.99, 60):
    m = probs > t
    curve_learned.append(((m & yt).sum() / yt.sum(), m.mean()))  # (recall, active fraction)
for k in range(1, F + 1, max(1, F // 60)):
    curve_hot.append((hot_set_recall(k), k / F))
plt.figure(figsize=(6.5, 4))
plt.plot(*zip(*[(a, r) for r, a in curve_learned]), "o-", ms=3, label=f"learned predictor (rank {pred.rank})")
plt.plot(*zip(*[(a, r) for r, a in curve_hot]), "s-", ms=3, label="always the k hottest neurons")
plt.axvline(yt.mean(), color="0.5", ls="--", lw=1, label=f"truly active: {yt.mean():.0%}")
plt.xlabel("fraction of neurons computed")
plt.ylabel("recall of the truly active neurons")
plt.title("layer 0, held-out tokens")
plt.legend()
plt.grid(alpha=0.3)
plt.tight_layout()
show_figure("07_predictor")


def active_fraction_at(curve, recall):
    """Smallest fraction of neurons computed that reaches ``recall`` on a (recall, fraction) curve."""
    ok = [a for r, a in curve if r >= recall]
    return min(ok) if ok else 1.0


for r in (0.9, 0.95, 0.99):
    print(f"recall {r:.2f}: learned computes {active_fraction_at(curve_learned, r):.1%} of the neurons, "
          f"hot-neuron rule {active_fraction_at(curve_hot, r):.1%}")

# %% [markdown]
# ## Every layer, threshold tuned for 99% recall
#
# `fit_predictors` records, trains one predictor per FFN, and tunes each threshold on
# held-out tokens to keep 99% of the active neurons. Then the ideal speed-ups: with a
# dense gate $3/(1+2a)$, $a$ the true active fraction; with the predictor $3/(3a_p + c)$,
# $a_p$ the predicted active fraction and $c$ its cost.

# %%
preds = fit_predictors(model, train_batches, rank=RANK, epochs=EPOCHS, target_recall=0.99)
print(f"{'layer':>5s} {'recall':>7s} {'precision':>9s} {'true a':>7s} {'pred a':>7s} {'cost':>6s} "
      f"{'3/(1+2a)':>9s} {'3/(3a+c)':>9s}")
for row in preds.report():
    a, ap, c = 1 - row["true_sparsity"], 1 - row["predicted_sparsity"], row["cost"]
    print(f"{row['layer']:>5d} {row['recall']:7.3f} {row['precision']:9.3f} {a:7.1%} {ap:7.1%} {c:6.3f} "
          f"{3 / (1 + 2 * a):8.2f}x {3 / (3 * ap + c):8.2f}x")

# %% [markdown]
# On a model this small the predictor is not cheap: its cost $c = r/F + r/D$ is large when
# D = 64 (for a Mistral-7B layer, D = 4096 and F = 14336, a rank-256 predictor costs
# 0.08). The point here is the mechanism; the arithmetic at scale is in the concept page on
# memory-bound decoding.
#
# ## What the predicted masks cost in validation loss

# %%
val_tokens = np.concatenate(test_batches)                        # (B, T)
lc = loss_change(model, preds, val_tokens)
print(f"validation loss: dense {lc['dense']:.4f}, with predicted masks {lc['predicted']:.4f} "
      f"(change {lc['delta']:+.4f})")

# %% [markdown]
# ## Decoding with the predictors
#
# Inside `predicted_decoding(model, predictors, backend)`, every FFN runs
# `sparse_ffn(..., active=predicted)`: gate, up and down only for the predicted rows.

# %%
prompt = ms.ByteTokenizer().encode("def ")
dense_out = ms.generate(model, prompt, max_new_tokens=24, temperature=0)
backend = "numba" if "numba" in ms.backends() else "numpy"
with predicted_decoding(model, preds, backend=backend):
    pred_out = ms.generate(model, prompt, max_new_tokens=24, temperature=0)
    last = [(s["layer"], s["n_active"], s["predicted"]) for s in model.ffn_stats]
same = sum(a == b for a, b in zip(dense_out, pred_out))
print(f"greedy tokens identical to dense decoding: {same}/{len(dense_out)} (backend {backend})")
print("last decode step, per layer (layer, neurons computed, predicted):", last)
print("dense:    ", repr(ms.ByteTokenizer().decode(dense_out)))
print("predicted:", repr(ms.ByteTokenizer().decode(pred_out)))

# %% [markdown]
# ## What this tutorial claims, checked

# %%
for row in preds.report():
    assert row["recall"] >= 0.98, row                            # the tuned threshold keeps ~99% recall
    assert row["predicted_sparsity"] > 0.2, row                  # ... while skipping neurons
tuned = evaluate(pred, xt, yt, threshold=tune_threshold(pred, xt, yt, 0.95))
assert tuned["recall"] >= 0.95 - 1e-3                            # tune_threshold does what it says
recalls = [m["recall"] for m in sweep]
assert all(a >= b for a, b in zip(recalls, recalls[1:]))        # a higher threshold never raises recall
assert abs(lc["delta"]) < (0.1 if QUICK else 0.05), lc           # predicted masks barely move the loss
assert all(p for _, _, p in last)                                # decoding really used the predicted sets
if not QUICK:  # the learned predictor beats the frequency baseline once it has data to learn from
    assert active_fraction_at(curve_learned, 0.95) < active_fraction_at(curve_hot, 0.95)
print("all checks passed")
