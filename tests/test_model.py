"""The decoder: shapes, causality, KV cache, dtypes, bad inputs, layer equations."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minisparse as ms
from minisparse import layers as L


def tiny(activation="swiglu", **kw):
    base = dict(vocab_size=37, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                activation=activation, max_seq_len=32)
    base.update(kw)
    return ms.ModelConfig(**base)


def perturbed(cfg, dtype=np.float64, seed=0):
    """A model whose norms/biases are not at their init values (so their effect is tested)."""
    m = ms.Transformer(cfg, seed=seed, dtype=dtype)
    r = np.random.default_rng(seed + 1)
    for k, v in m.params.items():
        if v.ndim == 1:
            m.params[k] = (v + r.normal(0, 0.3, v.shape)).astype(dtype)
    return m


def test_logit_shape_and_dtypes():
    for dtype in (np.float32, np.float64):
        m = ms.Transformer(tiny(), dtype=dtype)
        out = m(np.zeros((3, 5), dtype=np.int64))
        assert out.shape == (3, 5, 37) and out.dtype == dtype
        assert all(v.dtype == dtype for v in m.params.values())
    with pytest.raises(ValueError, match="float32 or float64"):
        ms.Transformer(tiny(), dtype=np.float16)


def test_ffn_weights_are_neuron_major():
    m = ms.Transformer(tiny("drelu"))
    for w in ("w_gate", "w_up", "w_down"):
        assert m.params[f"layers.0.feed_forward.{w}"].shape == (24, 16)
    plain = ms.Transformer(tiny("relu"))
    assert "layers.0.feed_forward.w_up" not in plain.params


def test_tied_and_untied():
    assert "output" not in ms.Transformer(tiny(tie_embeddings=True)).params
    m = ms.Transformer(tiny(tie_embeddings=False))
    assert m.params["output"].shape == (37, 16)


@pytest.mark.parametrize("activation", ["swiglu", "drelu", "geglu_tanh", "relu"])
@given(seed=st.integers(0, 10_000), T=st.integers(2, 12), pos=st.integers(0, 11))
def test_causality(activation, seed, T, pos):
    """Changing a future token never changes earlier logits."""
    pos = pos % T
    m = perturbed(tiny(activation), seed=seed % 7)
    r = np.random.default_rng(seed)
    toks = r.integers(0, 37, (2, T))
    a = m(toks)
    toks2 = toks.copy()
    toks2[:, pos] = (toks2[:, pos] + 1 + r.integers(0, 35)) % 37
    b = m(toks2)
    np.testing.assert_array_equal(a[:, :pos], b[:, :pos])
    assert not np.allclose(a[:, pos:], b[:, pos:])


@given(seed=st.integers(0, 10_000), T=st.integers(1, 20), kv=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3)]),
       chunk=st.integers(1, 5))
def test_kv_cache_matches_full_forward(seed, T, kv, chunk):
    """Decoding in chunks through the KV cache equals one full forward pass."""
    H, K = kv
    cfg = tiny(n_heads=H, n_kv_heads=K, dim=4 * H, qkv_bias=bool(seed % 2))
    m = perturbed(cfg, seed=seed % 5)
    toks = np.random.default_rng(seed).integers(0, 37, (2, T))
    full = m(toks)
    cache = ms.KVCache(cfg, batch_size=2, dtype=np.float64)
    parts = [m(toks[:, i:i + chunk], cache=cache) for i in range(0, T, chunk)]
    assert cache.pos == T
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-10, atol=1e-12)


def test_gemma_variants_change_the_function():
    toks = np.array([[1, 2, 3, 4]])
    base = tiny()
    a = ms.Transformer(base, seed=3, dtype=np.float64)(toks)
    b = ms.Transformer(base.replace(embed_scale=True), seed=3, dtype=np.float64)(toks)
    assert not np.allclose(a, b)
    g = ms.Transformer(base.replace(norm_offset=True), seed=3, dtype=np.float64)
    assert np.all(g.params["norm"] == 0)        # (1 + w) with w = 0 is the identity scale
    np.testing.assert_allclose(g(toks), a, rtol=1e-12)


@pytest.mark.parametrize("bad, err, match", [
    (np.array([[1.0, 2.0]]), TypeError, "integer array"),
    (np.array([1, 2, 3]), ValueError, "shape \\(batch, time\\)"),
    (np.zeros((1, 2, 3), dtype=int), ValueError, "shape \\(batch, time\\)"),
    (np.array([[1, 37]]), ValueError, "id 37 outside"),
    (np.array([[-1, 2]]), ValueError, "id -1 outside"),
    (np.zeros((1, 33), dtype=int), ValueError, "exceeds max_seq_len"),
    (np.zeros((1, 0), dtype=int), ValueError, "empty"),
])
def test_bad_tokens_raise_clear_errors(bad, err, match):
    with pytest.raises(err, match=match):
        ms.Transformer(tiny())(bad)


def test_cache_overflow_and_batch_mismatch():
    cfg = tiny(max_seq_len=8)
    m = ms.Transformer(cfg)
    c = ms.KVCache(cfg, batch_size=1)
    m(np.zeros((1, 6), dtype=int), cache=c)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        m(np.zeros((1, 3), dtype=int), cache=c)
    with pytest.raises(ValueError, match="batch"):
        m(np.zeros((2, 1), dtype=int), cache=ms.KVCache(cfg, batch_size=1))


def test_params_are_checked():
    cfg = tiny()
    p = ms.Transformer(cfg).params
    p2 = dict(p)
    del p2["norm"]
    with pytest.raises(ValueError, match="missing \\['norm'\\]"):
        ms.Transformer(cfg, params=p2)
    p3 = dict(p, norm=np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="'norm': expected shape \\(16,\\)"):
        ms.Transformer(cfg, params=p3)


def test_ffn_hook_observes_and_can_replace():
    m = ms.Transformer(tiny("drelu"), dtype=np.float64)
    toks = np.array([[1, 2, 3]])
    seen = []
    out = m(toks, ffn_hook=lambda layer, expert, h: seen.append((layer, expert, h.shape)))
    np.testing.assert_array_equal(out, m(toks))
    assert seen == [(0, None, (3, 24)), (1, None, (3, 24))]
    zeroed = m(toks, ffn_hook=lambda layer, expert, h: np.zeros_like(h))
    assert not np.allclose(zeroed, out)


def test_attention_matches_naive_loop(rng):
    """The vectorised GQA attention equals a per-head loop written from the definition."""
    B, T, H, K, Dh = 2, 5, 4, 2, 6
    q = rng.normal(size=(B, H, T, Dh))
    k = rng.normal(size=(B, K, T, Dh))
    v = rng.normal(size=(B, K, T, Dh))
    out, _ = L.attention_core_forward(q, k, v)
    ref = np.zeros_like(out)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            for t in range(T):
                s = np.array([q[b, h, t] @ k[b, kv, j] / np.sqrt(Dh) for j in range(t + 1)])
                p = np.exp(s - s.max())
                p /= p.sum()
                ref[b, h, t] = sum(p[j] * v[b, kv, j] for j in range(t + 1))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


def test_rope_preserves_norms_and_relative_positions(rng):
    cos, sin = L.rope_tables(8, 16, 10000.0, np.float64)
    x = rng.normal(size=(1, 1, 16, 8))
    y = L.rope_forward(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    # <R_m q, R_n k> depends only on m - n
    q, k = rng.normal(size=8), rng.normal(size=8)
    qs = L.rope_forward(np.tile(q, (1, 1, 16, 1)), cos, sin)[0, 0]
    ks = L.rope_forward(np.tile(k, (1, 1, 16, 1)), cos, sin)[0, 0]
    np.testing.assert_allclose(qs[5] @ ks[3], qs[9] @ ks[7], rtol=1e-10)
    np.testing.assert_allclose(L.rope_backward(y, cos, sin), x, rtol=1e-12)


def test_rms_norm_and_cross_entropy_against_definitions(rng):
    x = rng.normal(size=(3, 7))
    w = rng.normal(size=7)
    y, _ = L.rms_norm_forward(x, w, 1e-6)
    np.testing.assert_allclose(y, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w)
    logits = rng.normal(size=(4, 5))
    t = np.array([0, 4, -1, 2])
    loss, _ = L.cross_entropy_forward(logits, t)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(loss, -np.mean(np.log(p[[0, 1, 3], [0, 4, 2]])))
    with pytest.raises(ValueError, match="ignore_index"):
        L.cross_entropy_forward(logits, np.full(4, -1))


def test_float32_and_float64_agree():
    cfg = tiny("drelu")
    m64 = ms.Transformer(cfg, seed=1, dtype=np.float64)
    m32 = m64.astype(np.float32)
    toks = np.random.default_rng(0).integers(0, 37, (2, 9))
    np.testing.assert_allclose(m32(toks), m64(toks), rtol=1e-4, atol=1e-5)


def test_wrap_ffn_nests_sees_inputs_and_restores():
    m = ms.Transformer(tiny("drelu"), dtype=np.float64)
    toks = np.array([[1, 2, 3]])
    ref = m(toks)
    order = []

    def outer(ffn, i, x2, hook, train):
        order.append(("outer", i, x2.shape))
        return ffn(i, x2, hook, train)

    def inner_zero(ffn, i, x2, hook, train):       # replaces the FFN input by zeros
        order.append(("inner", i))
        return ffn(i, np.zeros_like(x2), hook, train)

    with m.wrap_ffn(outer):
        with m.wrap_ffn(inner_zero):
            zeroed = m(toks)
        np.testing.assert_array_equal(m(toks), ref)   # inner restored, outer still active
    assert order[:4] == [("inner", 0), ("outer", 0, (3, 16)), ("inner", 1), ("outer", 1, (3, 16))]
    assert not np.allclose(zeroed, ref)
    assert m.ffn_wrappers == ()
    with pytest.raises(ZeroDivisionError):
        with m.wrap_ffn(lambda ffn, i, x2, hook, train: 1 / 0):
            m(toks)
    assert m.ffn_wrappers == ()
    np.testing.assert_array_equal(m(toks), ref)
