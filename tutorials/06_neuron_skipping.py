# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Neuron skipping: from the NumPy reference to Numba and CuPy kernels
#
# **The idea:** with a ReLU-family activation, a neuron whose gate is zero contributes
# nothing, so its rows of $W_{up}$ and $W_{down}$ need never be read. Decoding one token is
# memory-bound (time ≈ bytes read / bandwidth), so reading fewer rows is what makes it
# faster. We write the idea in ten lines of NumPy, check that `minisparse.sparse_ffn`
# computes the same thing on every backend, time it against dense BLAS, and compare with
# the ideal speed-up $3/(1+2a)$ (dense gate) and $3/(3a)$ (a given active set).
#
# The CuPy (GPU) part runs only where CuPy and a GPU are found, and says so otherwise.
# Quick mode uses a small layer and few repetitions; the full mode a Mistral-7B-sized
# layer (D = 4096, F = 14336: 704 MB of float32 weights).

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import minisparse as ms
from minisparse.kernels.testing import dense_ffn, make_ffn

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
D, F = (512, 1536) if QUICK else (4096, 14336)
REPEATS = 30 if QUICK else 30
print("usable backends here:", ms.backends())
# timings depend on threads: BLAS reads OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, Numba NUMBA_NUM_THREADS
print("threads: BLAS", os.environ.get("OPENBLAS_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "default")),
      "| Numba", os.environ.get("NUMBA_NUM_THREADS", "default"), "| CPU cores", os.cpu_count())

# %% [markdown]
# ## The idea in NumPy
#
# A layer with an exactly known set of active neurons: `make_ffn` builds weights whose
# gate is negative for every token except on a chosen 10% of the neurons.

# %%
prob = make_ffn(D, F, tokens=1, sparsity=0.9, activation="drelu", seed=0)
x = prob["x"][0]                                                 # (D,)
w_gate, w_up, w_down = prob["w_gate"], prob["w_up"], prob["w_down"]   # (F, D) each, neuron-major
print("x", x.shape, " w_gate / w_up / w_down", w_gate.shape, " gate-active neurons:", prob["active"].size)


def skipping_ffn(x, w_gate, w_up, w_down):
    """dReLU FFN for one token that reads W_up and W_down rows of active neurons only."""
    a = np.maximum(w_gate @ x, 0)                                # (F,)  the gate: every neuron
    idx = np.flatnonzero(a)                                      # (A,)  neurons with a(g) != 0
    u = np.maximum(w_up[idx] @ x, 0)                             # (A,)  A rows of W_up
    h = a[idx] * u                                               # (A,)
    return h @ w_down[idx]                                       # (D,)  A rows of W_down


y_ref = dense_ffn(x[None], w_gate, w_up, w_down, "drelu")[0]    # (D,) float64, nothing skipped
y_skip = skipping_ffn(x, w_gate, w_up, w_down)                   # (D,)
print(f"max |skipping - dense| = {np.max(np.abs(y_skip - y_ref)):.2e}  (float32 rounding only)")

# %% [markdown]
# ## One interface, several backends
#
# `ms.sparse_ffn(x, w_gate, w_up, w_down, activation, backend=...)` does the same, on the
# backend you name. The NumPy backend is the *definition*; the others are held to it. A
# backend that cannot run here raises with its install command: there is no silent
# fallback. `stats` says which path ran and how many neurons were read.

# %%
outputs = {}
for backend in ms.backends():
    st = {}
    y = ms.sparse_ffn(x, w_gate, w_up, w_down, "drelu", backend=backend, stats=st)
    y = y.get() if hasattr(y, "get") else y                      # CuPy -> NumPy
    outputs[backend] = y
    print(f"{backend:<6s} path={st['path']:<6s} active={st['n_active']:>5d}/{st['ffn_dim']} "
          f"max |y - dense| = {np.max(np.abs(y - y_ref)):.2e}")
if "cupy" not in ms.backends():
    print("cupy   skipped: CuPy or a GPU is not available here (see the 'Run on a GPU' how-to)")

# %% [markdown]
# With a predictor (tutorial 7) the active set is known *before* the FFN runs, and the
# gate too is computed for those neurons only: pass `active=`.

# %%
for backend in ms.backends():
    st = {}
    y = ms.sparse_ffn(x, w_gate, w_up, w_down, "drelu", backend=backend, active=prob["active"], stats=st)
    y = y.get() if hasattr(y, "get") else y
    print(f"{backend:<6s} active= given ({st['n_active']} neurons): max |y - dense| = "
          f"{np.max(np.abs(y - y_ref)):.2e}")

# %% [markdown]
# ## Timing: dense BLAS vs skipping, against the ideal
#
# Dense is NumPy's BLAS: three matrix-vector products over every neuron. For each
# sparsity we time the Numba kernel that skips gate-derived zeros ("numba") and the one
# given the active set ("numba+active"), and print the ideal speed-ups $3/(1+2a)$ and
# $3/(3a)$, with $a$ the active fraction.


# %%
def best_time(fn, repeats=REPEATS):
    fn()                                                         # warm up (and JIT compile)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def dense_numpy(x, w_gate, w_up, w_down):
    g = w_gate @ x                                               # (F,)
    u = w_up @ x                                                 # (F,)
    return (np.maximum(g, 0) * np.maximum(u, 0)) @ w_down        # (D,)


has_numba = "numba" in ms.backends()
rows = []
for sparsity in (0.0, 0.5, 0.8, 0.9, 0.95, 0.99):
    pb = make_ffn(D, F, tokens=1, sparsity=sparsity, activation="drelu", seed=1)
    xs, wg, wu, wd, act_idx = pb["x"][0], pb["w_gate"], pb["w_up"], pb["w_down"], pb["active"]
    a = act_idx.size / F
    row = dict(sparsity=sparsity, a=a, dense=best_time(lambda: dense_numpy(xs, wg, wu, wd)))
    if has_numba:
        row["numba"] = best_time(lambda: ms.sparse_ffn(xs, wg, wu, wd, "drelu", backend="numba"))
        row["numba+active"] = best_time(
            lambda: ms.sparse_ffn(xs, wg, wu, wd, "drelu", backend="numba", active=act_idx))
    rows.append(row)

print(f"layer D={D}, F={F}, float32, batch 1; best of {REPEATS}")
print(f"{'sparsity':>8s} {'dense ms':>9s} {'numba ms':>9s} {'speed-up':>8s} {'ideal':>6s}"
      f" {'+active ms':>10s} {'speed-up':>8s} {'ideal':>6s}")
for r in rows:
    line = f"{r['sparsity']:8.0%} {1e3 * r['dense']:9.3f}"
    if has_numba:
        ideal_gate, ideal_active = 3 / (1 + 2 * r["a"]), 3 / max(3 * r["a"], 1e-9)
        line += (f" {1e3 * r['numba']:9.3f} {r['dense'] / r['numba']:7.2f}x {ideal_gate:5.2f}x"
                 f" {1e3 * r['numba+active']:10.3f} {r['dense'] / r['numba+active']:7.2f}x {ideal_active:5.1f}x")
    print(line)

# %%
if has_numba:
    s = np.array([r["sparsity"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(s, [r["dense"] / r["numba"] for r in rows], "o-", label="numba (gate dense)")
    ax.plot(s, [r["dense"] / r["numba+active"] for r in rows], "s-", label="numba (active set given)")
    a_grid = np.linspace(0.01, 1, 200)
    ax.plot(1 - a_grid, 3 / (1 + 2 * a_grid), "C0--", lw=1, label="ideal 3/(1+2a)")
    ax.plot(1 - a_grid, np.minimum(1 / a_grid, 100), "C1--", lw=1, label="ideal 1/a")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of neurons that are zero)")
    ax.set_ylabel("speed-up over dense NumPy (BLAS)")
    ax.set_title(f"one FFN layer, D={D}, F={F}, batch 1")
    ax.grid(alpha=0.3)
    ax.legend()
    plt.tight_layout()
    show_figure("06_speedup_vs_sparsity")

# %% [markdown]
# How to read it: at 0% sparsity the skipping kernel does the same work as dense plus
# some bookkeeping; as sparsity rises, it reads fewer rows and the speed-up follows the
# ideal curve from below. Beware of the last rows: at 99% sparsity the few active rows
# (here a few MB) fit in the CPU's cache, and a benchmark that repeats the same call
# re-reads them from the cache, faster than from memory, so the measured speed-up can
# exceed the memory-bound "ideal". A real decode step reads other rows for each token.
# And on a machine shared with other work, single timings jump around: read the trend,
# and see `bench/ffn_sparse.py` for measurements that repeat, validate and report GB/s. The gap to the ideal is the kernel's inefficiency (threads,
# scattered rows, the cache), and on a small layer that fits in the CPU caches the
# memory-bound argument holds only loosely: look at the full-mode run (Mistral-sized layer)
# for the real picture, and at the Benchmarks page of the docs for recorded numbers.
#
# ## The GPU kernel (CuPy)

# %%
if "cupy" in ms.backends():
    import cupy as cp

    wg16, wu16, wd16 = (cp.asarray(w.astype(np.float16)) for w in (w_gate, w_up, w_down))
    x_d = cp.asarray(x)
    y16 = ms.sparse_ffn(x_d, wg16, wu16, wd16, "drelu", backend="cupy").get()
    y_np16 = ms.sparse_ffn(x, w_gate.astype(np.float16), w_up.astype(np.float16),
                           w_down.astype(np.float16), "drelu", backend="numpy")
    print(f"cupy fp16 vs numpy fp16 reference: max |diff| = {np.max(np.abs(y16 - y_np16)):.2e}")
else:
    print("skipped: no usable CuPy backend here. On a machine with an NVIDIA GPU, "
          "`pip install cupy-cuda12x` (or cupy-cuda13x) and re-run.")

# %% [markdown]
# ## The whole model on the GPU (measured)
#
# One kernel is not a model. `model.to("cupy")` moves every parameter to the GPU once, and the
# same readable code (attention, FFN, sampling, KV cache) then runs on CuPy arrays; the
# `GraphDecoder` captures a whole decode step in one CUDA graph. Measured on one NVIDIA H200
# (`bench/decode_device.py`: 2 Mistral-sized drelu blocks, float32, ~90% exact zeros, greedy
# tokens identical on every row):
#
# | path | tokens/s |
# | --- | ---: |
# | NumPy on the host CPU | 33.7 |
# | host weights + `backend="cupy"` (weights copied every call) | 5.6 |
# | `model.to("cupy")`, eager | 199.4 |
# | `GraphDecoder`, dense / skipping | 1153 / 1673 |
#
# and for a Mistral-7B-shaped model (32 layers, float16, `bench/decode_gpu.py`, round 13): dense
# 280 tokens/s (95% of the bytes floor), skipping 477 (1.701x), given the true active set 751
# (2.68x); transformers' eager `generate` ran at 45.3 tokens/s in the same run. The "Run on a
# GPU" how-to shows the calls.

# %% [markdown]
# ## A whole model, decoding through a backend
#
# `Transformer(..., backend=...)` (or `generate(..., backend=...)`) runs each inference FFN
# through `sparse_ffn`. For a ReLU-family model greedy decoding gives exactly the dense
# model's tokens. With several tokens at once (the prefill of a prompt), the rows read are
# the *union* of the tokens' active neurons, which is much less sparse: this untrained
# dReLU model has about 75% zeros per token, yet almost every neuron is active for some
# token of the prompt.

# %%
model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
prompt = ms.ByteTokenizer().encode("def main():")
dense_tokens = ms.generate(model, prompt, max_new_tokens=16, temperature=0)
per_backend = {}
for backend in ms.backends():
    per_backend[backend] = ms.generate(model, prompt, max_new_tokens=16, temperature=0, backend=backend)
    print(f"{backend:<6s} identical to dense: {per_backend[backend] == dense_tokens}")
    # model.ffn_stats: one dict per layer for the last forward (here: the last decoded token)
    print("       last decode step, per layer:",
          [(s["layer"], s["path"], f"{s['n_active']}/{s['ffn_dim']}") for s in model.ffn_stats])
model.backend = "numpy"
model(np.array([prompt]))                                        # a prefill of len(prompt) tokens
print(f"prefill of {len(prompt)} tokens, per layer:",
      [(s["layer"], s["path"], f"{s['n_active']}/{s['ffn_dim']}") for s in model.ffn_stats])
model.backend = None

# %% [markdown]
# ## What this tutorial claims, checked

# %%
assert np.allclose(y_skip, y_ref, rtol=1e-4, atol=1e-5)                 # the ten-line idea is exact
for backend, y in outputs.items():
    assert np.allclose(y, y_ref, rtol=1e-4, atol=1e-5), backend           # every backend equals dense
    assert np.allclose(y, outputs["numpy"], rtol=1e-4, atol=1e-5), backend  # ... and the reference
for backend, toks in per_backend.items():
    assert toks == dense_tokens, backend                                  # greedy decoding unchanged
assert all(s["path"] in ("sparse", "dense") for s in model.ffn_stats)
for r in rows:
    assert abs(r["a"] - (1 - r["sparsity"])) < 0.01                       # the layers had the sparsity we asked
print("all checks passed")
