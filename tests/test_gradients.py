"""Hand-written backward passes against central finite differences, in float64.

Each layer: loss = sum(out * R) for a fixed random R, so dL/dout = R; the backward's
gradient of every input and parameter is compared with (L(p + eps d) - L(p - eps d)) / 2 eps
along random directions d (and element by element for the smallest arrays).
The whole model: one random direction per parameter tensor, hypothesis drawing shapes,
activations (plain and gated, FATReLU thresholds), GQA ratios, tied/untied heads, qkv
biases and the Gemma options.

Piecewise-linear activations have kinks: a finite difference straddling one is wrong by
O(1), so examples whose pre-activations lie within a margin of a kink are discarded
(``assume``), and FFN weights are drawn large enough that pre-activations are O(1).
"""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minisparse import ModelConfig, Transformer, get_activation, list_activations
from minisparse import layers as L

EPS = 1e-6
ACTIVATIONS = [a for a in list_activations() if not a.endswith("_demo")] + \
    ["drelu:0.1", "reglu:0.05", "fatrelu:0.2"]
KINK_MARGIN = 1e-3


def fd_directional(f, x, d, eps=EPS):
    """(f(x + eps d) - f(x - eps d)) / 2 eps, restoring x."""
    x0 = x.copy()
    x += eps * d
    fp = f()
    x[...] = x0 - eps * d
    fm = f()
    x[...] = x0
    return (fp - fm) / (2 * eps)


def check(f, x, grad, rng, what, n_dirs=3, rtol=1e-6, atol=1e-9):
    """Compare <grad, d> with the finite difference of f along n_dirs random directions.

    The finite difference carries a rounding error of about 1e-16 * |f| / EPS, so the
    absolute tolerance grows with |f|.
    """
    assert grad.shape == x.shape, f"{what}: grad shape {grad.shape} != {x.shape}"
    atol = atol + 1e-8 * abs(f())
    for _ in range(n_dirs):
        d = rng.standard_normal(x.shape)
        fd = fd_directional(f, x, d)
        an = float(np.sum(grad * d))
        assert abs(fd - an) <= atol + rtol * max(abs(fd), abs(an)), \
            f"{what}: analytic {an!r} vs finite difference {fd!r}"


def check_elementwise(f, x, grad, what, rtol=1e-6, atol=1e-9):
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = 1.0
        fd = fd_directional(f, x, e.reshape(x.shape))
        assert abs(fd - gflat[i]) <= atol + rtol * max(abs(fd), abs(gflat[i])), \
            f"{what}[{np.unravel_index(i, x.shape)}]: analytic {gflat[i]!r} vs finite difference {fd!r}"


def far_from_kinks(act, *pre):
    """True when no pre-activation of a ReLU-family activation lies within KINK_MARGIN of a kink."""
    t = act.threshold
    g = pre[0]
    if act.gate_kind in ("relu", "relu2") and np.min(np.abs(g - t)) < KINK_MARGIN:
        return False
    if len(pre) > 1 and pre[1] is not None and act.up_kind == "relu" and np.min(np.abs(pre[1] - t)) < KINK_MARGIN:
        return False
    return True


# ======================================================================================
# layers one at a time
# ======================================================================================
@given(V=st.integers(1, 9), D=st.integers(1, 6), B=st.integers(1, 3), T=st.integers(1, 7),
       seed=st.integers(0, 2**16))
def test_embedding(V, D, B, T, seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((V, D))
    tokens = rng.integers(0, V, (B, T))            # repeats exercise the accumulation
    R = rng.standard_normal((B, T, D))
    dtable = L.embedding_backward(R, tokens, V)
    check_elementwise(lambda: float(np.sum(L.embedding_forward(table, tokens) * R)), table, dtable, "dtable")


@given(shape=st.sampled_from([(1,), (7,), (2, 5), (3, 1, 4), (2, 3, 33)]), offset=st.booleans(),
       seed=st.integers(0, 2**16))
def test_rms_norm(shape, offset, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal(shape[-1:])
    R = rng.standard_normal(shape)
    eps = 1e-5

    def f():
        return float(np.sum(L.rms_norm_forward(x, w, eps, offset)[0] * R))

    _, cache = L.rms_norm_forward(x, w, eps, offset)
    dx, dw = L.rms_norm_backward(R, cache)
    check(f, x, dx, rng, "rms_norm dx")
    check_elementwise(f, w, dw, "rms_norm dw")


@given(B=st.integers(1, 2), heads=st.integers(1, 3), T=st.integers(1, 6), half=st.integers(1, 4),
       start=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_rope(B, heads, T, half, start, seed):
    rng = np.random.default_rng(seed)
    Dh = 2 * half
    cos, sin = L.rope_tables(Dh, start + T, 10000.0, np.float64)
    cos, sin = cos[start:], sin[start:]
    x = rng.standard_normal((B, heads, T, Dh))
    R = rng.standard_normal(x.shape)
    dx = L.rope_backward(R, cos, sin)
    check(lambda: float(np.sum(L.rope_forward(x, cos, sin) * R)), x, dx, rng, "rope dx")


def naive_attention(q, k, v, q_start):
    """Loop over heads and queries: softmax over the visible keys, float64."""
    B, H, T, Dh = q.shape
    rep = H // k.shape[1]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                s = k[b, h // rep, : q_start + i + 1] @ q[b, h, i] / np.sqrt(Dh)
                w = np.exp(s - s.max())
                out[b, h, i] = (w / w.sum()) @ v[b, h // rep, : q_start + i + 1]
    return out


@given(B=st.integers(1, 2), K=st.integers(1, 3), rep=st.sampled_from([1, 2, 4]), T=st.integers(1, 9),
       Dh=st.sampled_from([1, 2, 5]), q_start=st.sampled_from([0, 0, 3]), block=st.sampled_from([1, 2, 3, 64]),
       seed=st.integers(0, 2**16))
def test_attention_core_gqa(B, K, rep, T, Dh, q_start, block, seed):
    """Forward against a naive loop and backward against finite differences, for query
    blocks of every size (the causal block skipping) and a query offset (KV cache)."""
    rng = np.random.default_rng(seed)
    H, S = K * rep, q_start + T
    q = rng.standard_normal((B, H, T, Dh))
    k = rng.standard_normal((B, K, S, Dh))
    v = rng.standard_normal((B, K, S, Dh))
    R = rng.standard_normal((B, H, T, Dh))
    out, cache = L.attention_core_forward(q, k, v, q_start, block=block)
    np.testing.assert_allclose(out, naive_attention(q, k, v, q_start), rtol=1e-12, atol=1e-12)

    def f():
        return float(np.sum(L.attention_core_forward(q, k, v, q_start, block=block)[0] * R))

    dq, dk, dv = L.attention_core_backward(R, cache)
    for name, x, g in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
        check(f, x, g, rng, f"attention core {name} (H={H}, K={K}, block={block}, q_start={q_start})")


@given(B=st.integers(1, 2), T=st.integers(1, 5), K=st.integers(1, 2), rep=st.sampled_from([1, 2, 3]),
       half=st.integers(1, 3), D=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_block(B, T, K, rep, half, D, bias, seed):
    rng = np.random.default_rng(seed)
    H, Dh = K * rep, 2 * half
    x = rng.standard_normal((B, T, D))
    W = {"wq": rng.standard_normal((D, H * Dh)) * 0.5, "wk": rng.standard_normal((D, K * Dh)) * 0.5,
         "wv": rng.standard_normal((D, K * Dh)) * 0.5, "wo": rng.standard_normal((H * Dh, D)) * 0.5}
    if bias:
        W.update(bq=rng.standard_normal(H * Dh), bk=rng.standard_normal(K * Dh), bv=rng.standard_normal(K * Dh))
    cos, sin = L.rope_tables(Dh, T, 10000.0, np.float64)
    R = rng.standard_normal((B, T, D))

    def run():
        return L.attention_forward(x, W["wq"], W["wk"], W["wv"], W["wo"], cos, sin, H, K,
                                   W.get("bq"), W.get("bk"), W.get("bv"))

    def f():
        return float(np.sum(run()[0] * R))

    _, cache = run()
    dx, g = L.attention_backward(R, cache, W["wq"], W["wk"], W["wv"], W["wo"])
    check(f, x, dx, rng, "attention dx")
    for name in W:
        check(f, W[name], g[name], rng, f"attention d{name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@given(N=st.sampled_from([1, 3, 7]), D=st.integers(1, 6), F=st.sampled_from([1, 5, 9]),
       l1=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_ffn_every_activation(activation, N, D, F, l1, seed):
    act = get_activation(activation)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D))
    wg = rng.standard_normal((F, D))
    wu = rng.standard_normal((F, D)) if act.gated else None
    wd = rng.standard_normal((F, D))
    g, u = x @ wg.T, (x @ wu.T if act.gated else None)
    assume(far_from_kinks(act, g, u))
    if l1:  # |h| has a kink where h crosses 0: keep every non-zero h away from it
        h = act.forward(g, u)
        assume(np.all((h == 0) | (np.abs(h) > KINK_MARGIN)))
        if act.gated:
            assume(np.min(np.abs(u)) > KINK_MARGIN)
    R = rng.standard_normal((N, D))

    def f():
        y, cache = L.ffn_forward(x, wg, wu, wd, act)
        h = cache.h
        return float(np.sum(y * R)) + l1 * float(np.abs(h).sum()) / h.shape[0]   # ProSparse: sum over neurons

    _, cache = L.ffn_forward(x, wg, wu, wd, act)
    dx, dwg, dwu, dwd = L.ffn_backward(R, cache, wg, wu, wd, act, l1=l1)
    check(f, x, dx, rng, f"{activation} dx")
    check(f, wg, dwg, rng, f"{activation} dw_gate")
    check(f, wd, dwd, rng, f"{activation} dw_down")
    if act.gated:
        check(f, wu, dwu, rng, f"{activation} dw_up")
    else:
        assert dwu is None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives(activation):
    """The registry's backward against finite differences of its forward, element by element."""
    act = get_activation(activation)
    rng = np.random.default_rng(0)
    g = rng.standard_normal(64) * 2
    u = rng.standard_normal(64) * 2 if act.gated else None
    g = g[np.abs(g - act.threshold) > KINK_MARGIN]
    if u is not None:
        u = u[: len(g)]
        keep = np.abs(u - act.threshold) > KINK_MARGIN
        g, u = g[keep], u[keep]
    dh = rng.standard_normal(g.shape)
    dg, du = act.backward(dh, g, u)
    # forward is elementwise: the directional derivative along e_i is the i-th entry
    eps = EPS
    fd_g = (act.forward(g + eps, u) - act.forward(g - eps, u)) / (2 * eps) * dh
    np.testing.assert_allclose(dg, fd_g, rtol=1e-6, atol=1e-9, err_msg=f"{activation} dg")
    if u is not None:
        fd_u = (act.forward(g, u + eps) - act.forward(g, u - eps)) / (2 * eps) * dh
        np.testing.assert_allclose(du, fd_u, rtol=1e-6, atol=1e-9, err_msg=f"{activation} du")


@given(N=st.integers(1, 9), V=st.integers(2, 11), n_ignored=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_cross_entropy(N, V, n_ignored, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, V)) * 3
    targets = rng.integers(0, V, N)
    targets[: min(n_ignored, N - 1)] = -1               # keep at least one valid target
    _, cache = L.cross_entropy_forward(logits, targets)
    dlogits = L.cross_entropy_backward(cache)
    check_elementwise(lambda: L.cross_entropy_forward(logits, targets)[0], logits, dlogits, "dlogits")
    assert np.all(dlogits[targets == -1] == 0)


# ======================================================================================
# the whole model
# ======================================================================================
def _random_model(cfg, seed):
    """A float64 model with O(1) FFN pre-activations and non-trivial norm weights."""
    model = Transformer(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for name, p in model.params.items():
        if name.endswith("norm"):
            p += 0.3 * rng.standard_normal(p.shape)
        elif name.endswith(("w_gate", "w_up")):
            p[...] = rng.standard_normal(p.shape) / np.sqrt(cfg.dim)
        elif name.endswith(("bq", "bk", "bv")):
            p += 0.1 * rng.standard_normal(p.shape)
        else:
            p *= 10.0                                     # 0.02 -> 0.2: a less linear network
    return model


def _ffn_inputs(model, tokens):
    """Pre-activations (g, u) of every FFN in a forward pass, by wrapping layers.ffn_forward."""
    seen = []
    orig = L.ffn_forward

    def spy(x, w_gate, w_up, w_down, act, hook=None):
        seen.append((x @ w_gate.T, x @ w_up.T if w_up is not None else None))
        return orig(x, w_gate, w_up, w_down, act, hook=hook)

    L.ffn_forward = spy
    try:
        model.loss(tokens)
    finally:
        L.ffn_forward = orig
    return seen


model_configs = st.fixed_dictionaries({
    "activation": st.sampled_from(ACTIVATIONS),
    "n_kv_heads": st.sampled_from([1, 2]),
    "rep": st.sampled_from([1, 2]),
    "half_head": st.sampled_from([1, 2, 3]),
    "dim": st.sampled_from([4, 6]),
    "ffn_dim": st.sampled_from([3, 8]),
    "n_layers": st.sampled_from([1, 2]),
    "tie_embeddings": st.booleans(),
    "qkv_bias": st.booleans(),
    "gemma": st.booleans(),
    "vocab_size": st.sampled_from([7, 13]),
})


@settings(max_examples=30)
@given(spec=model_configs, B=st.integers(1, 2), T=st.integers(2, 6), l1=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 2**16))
def test_whole_model_gradients(spec, B, T, l1, seed):
    s = dict(spec)
    rep, half, gemma = s.pop("rep"), s.pop("half_head"), s.pop("gemma")
    cfg = ModelConfig(n_heads=s["n_kv_heads"] * rep, head_dim=2 * half, norm_offset=gemma,
                      embed_scale=gemma, max_seq_len=8, **s)
    model = _random_model(cfg, seed)
    rng = np.random.default_rng(seed + 2)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    act = model.act
    for g, u in _ffn_inputs(model, tokens):
        assume(far_from_kinks(act, g, u))
        if l1:
            h = act.forward(g, u)
            assume(np.all((h == 0) | (np.abs(h) > KINK_MARGIN)))
            if u is not None:
                assume(np.min(np.abs(u)) > KINK_MARGIN)
    loss, grads = model.loss_and_grads(tokens, l1=l1)
    assert list(grads) == list(model.params), "grads must be keyed exactly like params"
    assert np.isclose(loss, model.loss(tokens) + (l1 * _mean_abs_h(model, tokens) if l1 else 0.0))

    def f():
        return model.loss_and_grads(tokens, l1=l1)[0] if l1 else model.loss(tokens)

    for name, p in model.params.items():
        assert grads[name].dtype == p.dtype and grads[name].shape == p.shape
        check(f, p, grads[name], rng, f"{name} ({cfg.activation}, H={cfg.n_heads}, K={cfg.n_kv_heads}, "
              f"tied={cfg.tie_embeddings}, bias={cfg.qkv_bias}, gemma={gemma})", n_dirs=1)


def _mean_abs_h(model, tokens):
    hs = []
    model(tokens[:, :-1], ffn_hook=lambda layer, expert, h: hs.append(float(np.abs(h).sum()) / h.shape[0]))
    return sum(hs)


def test_whole_model_with_explicit_targets_and_ignored_positions():
    cfg = ModelConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=5,
                      activation="swiglu", tie_embeddings=False, max_seq_len=8)
    model = _random_model(cfg, 3)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 11, (2, 5))
    targets = rng.integers(0, 11, (2, 5))
    targets[0, :2] = -1
    loss, grads = model.loss_and_grads(tokens, targets)
    for name, p in model.params.items():
        check(lambda: model.loss_and_grads(tokens, targets)[0], p, grads[name], rng, name, n_dirs=1)


def test_moe_model_gradients():
    """A MoE model (minisparse.moe, when present) through the whole-model backward."""
    pytest.importorskip("minisparse.moe")
    cfg = ModelConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2, ffn_dim=5, activation="swiglu",
                      n_experts=4, top_k=2, max_seq_len=8)
    model = _random_model(cfg, 5)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 11, (2, 6))
    loss, grads = model.loss_and_grads(tokens)
    assert list(grads) == list(model.params)
    # top-k routing is piecewise: small steps keep the selection, so the loss is smooth here
    for name, p in model.params.items():
        check(lambda: model.loss_and_grads(tokens)[0], p, grads[name], rng, name, n_dirs=1,
              rtol=1e-5, atol=1e-8)
