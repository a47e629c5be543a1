"""Whole-model decoding through each backend equals the dense NumPy model (ReLU family)."""
from __future__ import annotations

import numpy as np
import pytest

import minisparse as ms

from backend_helpers import backend_params, require


@pytest.fixture(params=backend_params(), scope="module")
def backend(request):
    require(request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ["drelu", "reglu", "relu"])
def test_greedy_decoding_equals_dense(backend, act, dtype):
    cfg = ms.preset("nano", activation=act)
    dense = ms.Transformer(cfg, seed=1, dtype=dtype)
    prompt = [256, 72, 105, 33]
    want = ms.generate(dense, prompt, max_new_tokens=12, temperature=0)
    sparse = ms.Transformer(cfg, seed=1, dtype=dtype, backend=backend)
    got = ms.generate(sparse, prompt, max_new_tokens=12, temperature=0)
    assert got == want
    # same logits (prefill of 4 tokens: several tokens, union of active sets)
    toks = np.array([prompt])
    l_dense, l_sparse = dense(toks), sparse(toks)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(l_sparse, l_dense, rtol=tol, atol=tol)
    # the backend really ran, layer by layer, and says what it did
    assert [s["layer"] for s in sparse.ffn_stats] == list(range(cfg.n_layers))
    for s in sparse.ffn_stats:
        assert s["backend"] == backend and s["path"] in ("sparse", "dense")
        assert 0 <= s["n_active"] <= cfg.ffn_dim


def test_generate_backend_argument_and_decode_stats(backend):
    cfg = ms.preset("nano", activation="drelu")
    model = ms.Transformer(cfg, seed=2)
    want = ms.generate(model, [256, 1, 2], max_new_tokens=6, temperature=0)
    got = ms.generate(model, [256, 1, 2], max_new_tokens=6, temperature=0, backend=backend)
    assert got == want and model.backend is None
    model.backend = backend
    cache = ms.KVCache(cfg, 1, model.dtype)
    model(np.array([[256, 1, 2]]), cache=cache)
    model(np.array([[7]]), cache=cache)                               # one decode step: T = 1
    assert all(s["tokens"] == 1 and s["path"] == "sparse" for s in model.ffn_stats)


def test_moe_decoding_equals_dense(backend):
    cfg = ms.preset("tiny-moe", activation="drelu", n_layers=2, dim=64, n_heads=4, ffn_dim=96)
    dense = ms.Transformer(cfg, seed=3, dtype=np.float64)
    sparse = ms.Transformer(cfg, seed=3, dtype=np.float64, backend=backend)
    prompt = [256, 5, 6, 7]
    assert ms.generate(sparse, prompt, 8, temperature=0) == ms.generate(dense, prompt, 8, temperature=0)
    toks = np.array([prompt])
    np.testing.assert_allclose(sparse(toks), dense(toks), rtol=1e-10, atol=1e-10)
