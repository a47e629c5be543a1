"""minisparse on one page: a dReLU decoder, the FFN that skips zero neurons, greedy decoding.

Read it top to bottom; it is the whole idea of the library in plain NumPy. It imports
nothing else from minisparse, yet it computes what ``minisparse.Transformer`` computes on
the same flat params dict (tests/test_tiny.py: logits equal to 1e-12 in float64, and
greedy tokens equal to ``ms.generate``'s). The parameter names, Llama-style:

    tok_embeddings (V, D)   norm (D,)   output (V, D), absent when tied to tok_embeddings
    layers.{i}.attention_norm (D,)      layers.{i}.attention.wq (D, H*Dh)
    layers.{i}.attention.wk, .wv (D, K*Dh)                       .wo (H*Dh, D)
    layers.{i}.ffn_norm (D,)  layers.{i}.feed_forward.w_gate, .w_up, .w_down (F, D) each

FFN weights are neuron-major: row f of each matrix belongs to neuron f, so skipping a
neuron means not reading three rows. One sequence at a time (no batch dimension).
Dimension key: T time, S keys seen, D dim, H query heads, K kv heads, Dh head dim,
F ffn neurons, A active neurons, V vocab.

    python -m minisparse.tiny        # random weights: sparse == dense, greedy decoding

Papers: RMSNorm (Zhang & Sennrich 2019); RoPE (Su et al. 2021, RoFormer), in the
rotate-half layout of Hugging Face's Llama; attention (Vaswani et al. 2017, eq. 1) with
grouped-query heads (Ainslie et al. 2023, GQA); gated FFNs (Shazeer 2020); dReLU and
skipping its zero neurons (Song et al. 2024, TurboSparse eq. 2; PowerInfer).
"""
import numpy as np


def rms_norm(x, w, eps):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * w.  x (T, D), w (D,)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w      # (T, D)


def rope(x, pos, theta):
    """RoPE (Su et al. 2021, RoFormer), rotate-half layout: pair i with i + Dh/2.

    x (heads, T, Dh); pos (T,) absolute positions. Rotates each pair by pos * theta^(-2i/Dh).
    """
    Dh = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, Dh, 2, dtype=np.float64) / Dh)      # (Dh/2,)
    angle = np.outer(pos, inv_freq)                                        # (T, Dh/2)
    angle = np.concatenate([angle, angle], axis=-1)                        # (T, Dh)
    cos, sin = np.cos(angle).astype(x.dtype), np.sin(angle).astype(x.dtype)
    x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]                            # (heads, T, Dh/2) each
    rotated = np.concatenate([-x2, x1], axis=-1)                           # (heads, T, Dh)
    return x * cos + rotated * sin                                         # (heads, T, Dh)


def attention(x, p, pre, cfg, cache, start):
    """Causal self-attention (Vaswani et al. 2017, eq. 1) with GQA (Ainslie et al. 2023).

    x (T, D) -> (T, D). softmax(q k^T / sqrt(Dh) + causal mask) v per head; query head h
    reads KV head h // (H/K). ``cache`` holds the keys and values of earlier positions.
    """
    T, H, K = x.shape[0], cfg["n_heads"], cfg["n_kv_heads"]
    q = (x @ p[pre + "wq"]).reshape(T, H, -1).transpose(1, 0, 2)           # (H, T, Dh)
    k = (x @ p[pre + "wk"]).reshape(T, K, -1).transpose(1, 0, 2)           # (K, T, Dh)
    v = (x @ p[pre + "wv"]).reshape(T, K, -1).transpose(1, 0, 2)           # (K, T, Dh)
    pos = np.arange(start, start + T)                                      # (T,)
    q, k = rope(q, pos, cfg["rope_theta"]), rope(k, pos, cfg["rope_theta"])
    if "k" in cache:                                                       # earlier positions
        k = np.concatenate([cache["k"], k], axis=1)                        # (K, S, Dh)
        v = np.concatenate([cache["v"], v], axis=1)                        # (K, S, Dh)
    cache["k"], cache["v"] = k, v                                          # the KV cache, for the next call
    k, v = np.repeat(k, H // K, axis=0), np.repeat(v, H // K, axis=0)      # (H, S, Dh) GQA
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])               # (H, T, S)
    S = k.shape[1]
    hidden = np.arange(S)[None, :] > pos[:, None]                          # (T, S) future keys
    scores = np.where(hidden, -np.inf, scores)                             # (H, T, S)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))            # (H, T, S) stable
    probs /= probs.sum(axis=-1, keepdims=True)                             # softmax over keys
    out = (probs @ v).transpose(1, 0, 2).reshape(T, -1)                    # (T, H*Dh)
    return out @ p[pre + "wo"]                                             # (T, D)


def ffn_dense(x, w_gate, w_up, w_down):
    """dReLU FFN (Song et al. 2024, TurboSparse eq. 2): down(relu(gate(x)) * relu(up(x))).

    x (T, D); w_gate, w_up, w_down (F, D) neuron-major. Every neuron is computed.
    """
    h = np.maximum(x @ w_gate.T, 0) * np.maximum(x @ w_up.T, 0)            # (T, F), mostly exact 0
    return h @ w_down                                                      # (T, D)


def ffn_sparse(x, w_gate, w_up, w_down):
    """The same FFN, skipping neurons whose output is exactly zero (TurboSparse, PowerInfer).

    relu(g) * relu(u) is 0 wherever the gate g <= 0, so: compute the gate for every neuron
    (F rows read), then up and down only for the A neurons with g > 0 (2A rows instead of
    2F). With ~90% zeros that reads 3F*D -> 1.2F*D weights: the ideal 2.5x of batch-1
    decoding, which is memory-bound. Returns y (T, D) and the fraction of active neurons.
    """
    g = np.maximum(x @ w_gate.T, 0)                                        # (T, F)
    active = np.flatnonzero((g > 0).any(axis=0))                           # (A,) any token fires
    u = np.maximum(x @ w_up[active].T, 0)                                  # (T, A) rows of active only
    h = g[:, active] * u                                                   # (T, A)
    return h @ w_down[active], active.size / w_gate.shape[0]               # (T, D), a = A / F


def forward(params, cfg, tokens, sparse=False, cache=None, stats=None):
    """Logits (T, V) of int ``tokens`` (T,), Llama-style pre-norm decoder.

    params: the library's flat dict (``model.params``); cfg: a dict with n_heads,
    n_kv_heads, norm_eps, rope_theta (``model.config.to_dict()`` works). sparse: use
    ``ffn_sparse``. cache: a list of one dict per layer, filled and reused across calls
    (incremental decoding: pass only the new tokens). stats: a list that receives the
    active fraction of each sparse FFN.
    """
    unsupported = [k for k in ("n_experts", "qkv_bias", "norm_offset", "embed_scale") if cfg.get(k)]
    if cfg.get("activation", "drelu") != "drelu" or unsupported:
        raise ValueError("minisparse.tiny computes dense Llama-style dReLU models only; this config "
                         f"has activation={cfg.get('activation')!r} and sets {unsupported}")
    p, eps = params, cfg["norm_eps"]
    n_layers = sum(1 for name in p if name.endswith(".attention_norm"))
    cache = [{} for _ in range(n_layers)] if cache is None else cache
    start = cache[0]["k"].shape[1] if "k" in cache[0] else 0                # positions seen before
    x = p["tok_embeddings"][np.asarray(tokens)]                            # (T, D)
    for i in range(n_layers):
        pre = f"layers.{i}."
        x = x + attention(rms_norm(x, p[pre + "attention_norm"], eps), p, pre + "attention.",
                          cfg, cache[i], start)                            # (T, D) residual
        xn = rms_norm(x, p[pre + "ffn_norm"], eps)                         # (T, D)
        w = [p[pre + "feed_forward." + n] for n in ("w_gate", "w_up", "w_down")]  # 3 x (F, D)
        if sparse:
            y, a = ffn_sparse(xn, *w)                                      # (T, D)
            if stats is not None:
                stats.append(a)
        else:
            y = ffn_dense(xn, *w)                                          # (T, D)
        x = x + y                                                          # (T, D) residual
    w_out = p.get("output", p["tok_embeddings"])                           # (V, D), maybe tied
    return rms_norm(x, p["norm"], eps) @ w_out.T                           # (T, V)


def generate(params, cfg, prompt, max_new_tokens, sparse=True, stats=None):
    """Greedy decoding: prefill the prompt once, then one token at a time through the cache.

    Each step is batch-1 (T = 1): the case where skipping zero neurons saves the most.
    Returns the list of new token ids.
    """
    cache = [{} for _ in range(sum(1 for n in params if n.endswith(".attention_norm")))]
    logits = forward(params, cfg, prompt, sparse, cache, stats)            # (T, V) prefill
    out = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(logits[-1]))                                   # greedy: most likely id
        out.append(nxt)
        logits = forward(params, cfg, [nxt], sparse, cache, stats)         # (1, V)
    return out


def random_params(V=258, D=64, n_layers=2, H=4, K=2, F=172, seed=0):
    """Random parameters in the library's layout (std 0.02), for trying this file alone."""
    rng, Dh = np.random.default_rng(seed), D // H
    shapes = {"tok_embeddings": (V, D), "norm": (D,)}
    for i in range(n_layers):
        shapes.update({f"layers.{i}.attention_norm": (D,), f"layers.{i}.ffn_norm": (D,),
                       f"layers.{i}.attention.wq": (D, H * Dh), f"layers.{i}.attention.wo": (H * Dh, D),
                       f"layers.{i}.attention.wk": (D, K * Dh), f"layers.{i}.attention.wv": (D, K * Dh)})
        shapes.update({f"layers.{i}.feed_forward.{n}": (F, D) for n in ("w_gate", "w_up", "w_down")})
    return {n: np.ones(s) if n.endswith("norm") else rng.normal(0, 0.02, s) for n, s in shapes.items()}


if __name__ == "__main__":
    cfg = dict(n_heads=4, n_kv_heads=2, norm_eps=1e-5, rope_theta=10000.0)
    params = random_params()
    tokens = [256, *b"def main():"]                                        # BOS, then bytes
    dense, sparse = forward(params, cfg, tokens), forward(params, cfg, tokens, sparse=True)
    print(f"logits {dense.shape}; sparse FFN vs dense: max |diff| {np.abs(sparse - dense).max():.1e}")
    stats = []
    ids = generate(params, cfg, [256], 12, stats=stats)
    assert ids == generate(params, cfg, [256], 12, sparse=False)
    print(f"greedy ids {ids} (random weights: gibberish); sparse and dense agree")
    print(f"active neurons per decode step: {np.mean(stats[2:]):.0%} of F (untrained; dReLU "
          "models trained with minisparse reach ~10%)")
