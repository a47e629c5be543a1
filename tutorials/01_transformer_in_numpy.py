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
# # 1. A transformer in NumPy, layer by layer
#
# **The idea:** a Llama-style decoder is a short list of equations: embed, then for each
# block `x += attention(rms_norm(x))` and `x += ffn(rms_norm(x))`, then a final norm and a
# matrix product with the vocabulary. Here we write every one of them again, by hand, with
# the shape of every array printed, and check that the result equals `minisparse`'s
# `Transformer` to the last bits of float64.
#
# Everything below needs NumPy only (plus matplotlib for two pictures).
#
# Quick mode (`MINISPARSE_QUICK=1`, what CI runs) uses the `nano` preset; the full mode
# uses `tiny`. The maths is the same.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import minisparse as ms

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


def show(name, a):
    """Print an array's name, shape and dtype: the habit of this tutorial."""
    print(f"{name:<28s} {str(a.shape):<18s} {a.dtype}")


# %% [markdown]
# ## The configuration and the parameters
#
# A `ModelConfig` is a frozen dataclass; `preset("nano")` is a tiny one. We use float64
# so that our hand-written forward can be compared with the model's *exactly*
# (to ~1e-12), and the `swiglu` activation of Llama and Mistral.

# %%
cfg = ms.preset("nano" if QUICK else "tiny", activation="swiglu")
model = ms.Transformer(cfg, seed=0, dtype=np.float64)
p = model.params
print(cfg)
print(f"\n{model.num_parameters():,} parameters in {len(p)} named arrays; the first few:")
for name in list(p)[:12]:
    show(name, p[name])

# %% [markdown]
# Dimension key, used in every comment below: **B** batch, **T** time, **D** model width,
# **H** query heads, **K** key/value heads (grouped-query attention: K divides H),
# **Dh** head width, **F** FFN neurons, **V** vocabulary.
#
# Note the FFN weights: `w_gate`, `w_up` and `w_down` are all **(F, D)**, one row per
# neuron. This *neuron-major* layout is what lets a sparse kernel read only the rows of
# the neurons that fire (tutorial 6).

# %%
B, T = 2, 12
D, H, K, Dh, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
print(dict(B=B, T=T, D=D, H=H, K=K, Dh=Dh, F=F, V=V))

tok = ms.ByteTokenizer()
texts = ["def add(a, b):", "import numpy a"]
tokens = np.array([tok.encode(t)[:T] for t in texts])            # (B, T) int
show("tokens", tokens)
print(tokens)

# %% [markdown]
# ## Embedding
#
# Each token id picks a row of the (V, D) table.

# %%
x = p["tok_embeddings"][tokens]                                  # (B, T, D)
show("x = embed(tokens)", x)

# %% [markdown]
# ## RMSNorm
#
# $\mathrm{rms\_norm}(x) = \dfrac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \odot w$
# (Zhang & Sennrich 2019): no mean subtraction, no bias.


# %%
def rms_norm(x, w, eps=cfg.norm_eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w   # (..., D)


xn = rms_norm(x, p["layers.0.attention_norm"])                   # (B, T, D)
show("rms_norm(x)", xn)
print("root-mean-square of the first normalised rows:", np.sqrt((xn ** 2).mean(-1))[0, :4])
print("(close to 1, not exactly: eps = 1e-5 is not negligible next to mean(x^2) ~ 4e-4 of fresh embeddings)")

# %% [markdown]
# ## Rotary position embeddings
#
# Attention itself is blind to order; RoPE (Su et al. 2021) rotates each pair of
# coordinates of q and k by an angle proportional to the position, so that
# $q_i \cdot k_j$ depends on $i - j$. We use the "rotate-half" layout of Hugging Face's Llama:
# coordinate $c$ is paired with $c + D_h/2$.

# %%
inv_freq = cfg.rope_theta ** (-np.arange(0, Dh, 2) / Dh)          # (Dh/2,)
angles = np.outer(np.arange(T), inv_freq)                        # (T, Dh/2)
cos = np.cos(np.concatenate([angles, angles], axis=-1))          # (T, Dh)
sin = np.sin(np.concatenate([angles, angles], axis=-1))          # (T, Dh)
show("cos, sin", cos)


def rotate_half(a):
    return np.concatenate([-a[..., Dh // 2:], a[..., :Dh // 2]], axis=-1)


def rope(a):
    return a * cos + rotate_half(a) * sin                        # (B, heads, T, Dh)


# %% [markdown]
# ## Causal self-attention with grouped-query heads
#
# $\mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{D_h}} + \text{mask}\right)V$, where the mask
# hides the future. With GQA, each of the K key/value heads serves H/K query heads
# (Ainslie et al. 2023): we simply repeat them.


# %%
def attention(xn, i):
    pre = f"layers.{i}.attention."
    q = (xn @ p[pre + "wq"]).reshape(B, T, H, Dh).transpose(0, 2, 1, 3)   # (B, H, T, Dh)
    k = (xn @ p[pre + "wk"]).reshape(B, T, K, Dh).transpose(0, 2, 1, 3)   # (B, K, T, Dh)
    v = (xn @ p[pre + "wv"]).reshape(B, T, K, Dh).transpose(0, 2, 1, 3)   # (B, K, T, Dh)
    q, k = rope(q), rope(k)
    k = np.repeat(k, H // K, axis=1)                                       # (B, H, T, Dh)
    v = np.repeat(v, H // K, axis=1)                                       # (B, H, T, Dh)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(Dh)                     # (B, H, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)                     # (T, T) True above the diagonal
    scores = np.where(future, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))                 # subtract the max: no overflow
    probs /= probs.sum(-1, keepdims=True)                                  # (B, H, T, T)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, H * Dh)         # (B, T, H*Dh)
    return out @ p[pre + "wo"], probs                                      # (B, T, D)


a0, probs0 = attention(xn, 0)
show("attention(rms_norm(x))", a0)
show("attention probabilities", probs0)

# %% [markdown]
# ## The gated FFN
#
# $\mathrm{FFN}(x) = \big(\mathrm{act}(x W_{gate}^\top,\ x W_{up}^\top)\big)\, W_{down}$
# with SwiGLU $= \mathrm{silu}(g) \odot u$ (Shazeer 2020). `h` is the **intermediate
# activation**, (tokens, F): one number per neuron per token. Everything about
# activation sparsity is about how many entries of `h` are zero.


# %%
def silu(z):
    return z / (1.0 + np.exp(-z))


def ffn(xn, i):
    pre = f"layers.{i}.feed_forward."
    g = xn @ p[pre + "w_gate"].T                                 # (B, T, F)
    u = xn @ p[pre + "w_up"].T                                   # (B, T, F)
    h = silu(g) * u                                              # (B, T, F)  SwiGLU
    return h @ p[pre + "w_down"], h                              # (B, T, D)


f0, h0 = ffn(rms_norm(x + a0, p["layers.0.ffn_norm"]), 0)
show("ffn(...)", f0)
show("h (intermediate activation)", h0)
print(f"exact zeros in h: {np.mean(h0 == 0):.1%}  (SwiGLU almost never outputs an exact 0)")

# %% [markdown]
# ## The whole forward pass
#
# Stack the blocks with residual connections, normalise, and project onto the vocabulary
# (the LM head is tied to the embedding table in these presets).

# %%
x = p["tok_embeddings"][tokens]                                  # (B, T, D)
all_probs, all_h = [], []
for i in range(cfg.n_layers):
    a, probs = attention(rms_norm(x, p[f"layers.{i}.attention_norm"]), i)
    x = x + a                                                    # (B, T, D)
    f, h = ffn(rms_norm(x, p[f"layers.{i}.ffn_norm"]), i)
    x = x + f                                                    # (B, T, D)
    all_probs.append(probs)
    all_h.append(h)
    show(f"after block {i}", x)
w_out = p["tok_embeddings"] if cfg.tie_embeddings else p["output"]  # (V, D)
logits = rms_norm(x, p["norm"]) @ w_out.T                        # (B, T, V)
show("logits", logits)

# %% [markdown]
# ## Check: our equations equal the library's model

# %%
ref = model(tokens)                                              # (B, T, V)
err = np.max(np.abs(logits - ref))
print(f"max |ours - model(tokens)| = {err:.2e}")

# %% [markdown]
# ## The KV cache: decoding one token at a time gives the same logits
#
# During generation, keys and values of past positions are kept in a `KVCache`, so that
# each new token costs one row of work instead of recomputing the prefix.

# %%
cache = ms.KVCache(cfg, batch_size=B, dtype=np.float64)
steps = [model(tokens[:, t:t + 1], cache=cache) for t in range(T)]   # each (B, 1, V)
inc = np.concatenate(steps, axis=1)                              # (B, T, V)
err_cache = np.max(np.abs(inc - ref))
print(f"max |incremental - full| = {err_cache:.2e}, cache.pos = {cache.pos}")

# %% [markdown]
# ## Pictures: where attention looks, and where the parameters are

# %%
groups = {}
for name, arr in p.items():
    key = ("attention" if ".attention." in name else "ffn" if "feed_forward" in name
           else "norms" if name.endswith("norm") else "embedding / head")
    groups[key] = groups.get(key, 0) + arr.size
for k_, n_ in groups.items():
    print(f"{k_:<18s} {n_:>9,d} parameters  ({n_ / model.num_parameters():.0%})")

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
axes[0].imshow(all_probs[-1][0, 0], cmap="viridis")
axes[0].set_title(f"attention probabilities, last block, head 0\n(causal: nothing above the diagonal)")
axes[0].set_xlabel("key position")
axes[0].set_ylabel("query position")
axes[1].bar(list(groups), list(groups.values()), color=["C0", "C1", "C2", "C3"][:len(groups)])
axes[1].set_title("parameters by component")
plt.tight_layout()
show_figure("01_attention_and_parameters")

# %% [markdown]
# The FFN holds most of the weights of each block (here about two thirds of a block, as in
# Llama-scale models): that is why skipping FFN neurons pays off at decode time.

# %% [markdown]
# ## What this tutorial claims, checked

# %%
assert logits.shape == (B, T, V)
assert err < 1e-10, err                                          # our equations == the model
assert err_cache < 1e-10, err_cache                              # KV-cache decoding == full forward
assert np.allclose(np.triu(all_probs[0][0, 0], k=1), 0)          # causal: no weight on the future
assert np.allclose(all_probs[0].sum(-1), 1)                      # each row of attention is a distribution
assert np.mean(all_h[0] == 0) < 0.01                             # SwiGLU gives (almost) no exact zeros
ffn_params = sum(a.size for n, a in p.items() if "feed_forward" in n)
attn_params = sum(a.size for n, a in p.items() if ".attention." in n)
assert ffn_params > attn_params                                  # the FFN is the larger half of each block
print("all checks passed")
