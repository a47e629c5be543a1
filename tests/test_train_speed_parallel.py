"""The NumPy work after a training step's backward in threads (minisparse.train.run_parallel):
AdamW's update, the global norm and clipping, the combination of the batch parts. Every
element gets the same operations as on one thread: the same bits."""
from __future__ import annotations

import numpy as np
import pytest

import minisparse.train as T
from minisparse.runtime import blas_threads_limited

SHAPES = {"emb": (33, 7), "big": (300, 257), "norm": (7,), "w1": (7, 65), "bias": (1,), "w2": (129, 70)}


def _params(rng, dtype):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("workers", [2, 3, 7])
def test_adamw_in_threads_is_bit_for_bit(monkeypatch, dtype, workers):
    monkeypatch.setattr(T, "_PARALLEL_MIN", 0)          # split even these small buffers
    rng = np.random.default_rng(workers)
    p1 = _params(rng, dtype)
    p2 = {k: v.copy() for k, v in p1.items()}
    o1, o2 = T.AdamW(p1, 1e-2, weight_decay=0.1), T.AdamW(p2, 1e-2, weight_decay=0.1)
    for step in range(4):
        g = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
        o1.step(p1, {k: v.copy() for k, v in g.items()}, 1e-2 * (step + 1))
        o2.step(p2, {k: v.copy() for k, v in g.items()}, 1e-2 * (step + 1), workers=workers)
    for k in p1:
        assert np.array_equal(p1[k], p2[k]), k
        assert np.array_equal(o1.exp_avg[k], o2.exp_avg[k]) and np.array_equal(o1.exp_avg_sq[k], o2.exp_avg_sq[k]), k
    assert not np.array_equal(p1["big"], _params(np.random.default_rng(workers), dtype)["big"])   # it moved


def test_adamw_two_dtypes_in_threads(monkeypatch):
    monkeypatch.setattr(T, "_PARALLEL_MIN", 0)
    rng = np.random.default_rng(0)
    p1 = {"a": rng.standard_normal((40, 9)).astype(np.float32), "b": rng.standard_normal((9, 40)),
          "c": rng.standard_normal(40).astype(np.float32)}
    p2 = {k: v.copy() for k, v in p1.items()}
    o1, o2 = T.AdamW(p1), T.AdamW(p2)
    g = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in p1.items()}
    o1.step(p1, g)
    o2.step(p2, g, workers=2)
    assert all(np.array_equal(p1[k], p2[k]) and p1[k].dtype == p2[k].dtype for k in p1)


def test_adamw_matches_the_formula_in_threads(monkeypatch):
    """Against torch.optim.AdamW's update written out (float64), one step, workers=3."""
    monkeypatch.setattr(T, "_PARALLEL_MIN", 0)
    rng = np.random.default_rng(5)
    p = _params(rng, np.float64)
    ref = {k: v.copy() for k, v in p.items()}
    g = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.9, 0.95), 1e-8
    T.AdamW(p, lr, (b1, b2), eps, wd).step(p, g, lr, workers=3)
    for k, w in ref.items():
        m, v = (1 - b1) * g[k], (1 - b2) * g[k] ** 2
        want = w * (1 - lr * wd if w.ndim >= 2 else 1.0) - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
        np.testing.assert_allclose(p[k], want, rtol=1e-12, atol=1e-15, err_msg=k)


@pytest.mark.parametrize("workers", [2, 5])
def test_norm_and_clip_in_threads(workers):
    rng = np.random.default_rng(1)
    g1 = {k: 10 * rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    g2 = {k: v.copy() for k, v in g1.items()}
    assert len(T._balanced_runs([g.size for g in g1.values()], workers)) > 1      # it does split
    want = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g1.values()))
    with blas_threads_limited(1):                        # BLAS's dot on one thread, as in the threads
        n1 = T.clip_grads(g1, 1.0)
        n2 = T.clip_grads(g2, 1.0, workers)
    assert n1 == n2 and n2 == pytest.approx(want, rel=1e-12)
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
    assert T.global_norm(g2, workers) == pytest.approx(1.0, rel=1e-5)
    assert T.clip_grads(g2, 0.0, workers) == pytest.approx(1.0, rel=1e-5)    # 0 = off: unchanged
    assert T.global_norm({}, workers) == 0.0


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_balanced_runs_cover_everything_in_order(n):
    rng = np.random.default_rng(n)
    for _ in range(50):
        sizes = rng.integers(1, 1000, rng.integers(1, 12)).tolist()
        runs = T._balanced_runs(sizes, n)
        assert 1 <= len(runs) <= n
        assert runs[0][0] == 0 and runs[-1][1] == len(sizes)
        assert all(i < j for i, j in runs) and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    # equal sizes split evenly
    assert T._balanced_runs([5] * 8, 2) == [(0, 4), (4, 8)]
    assert T._balanced_runs([5] * 9, 3) == [(0, 3), (3, 6), (6, 9)]


def test_run_parallel_order_and_errors():
    assert T.run_parallel([lambda: 1]) == [1]
    assert T.run_parallel([lambda i=i: i * i for i in range(4)]) == [0, 1, 4, 9]
    done = []

    def boom():
        raise ValueError("task failed")

    def ok():
        done.append(1)
    with pytest.raises(ValueError, match="task failed"):
        T.run_parallel([boom, ok, ok])
    assert done == [1, 1]                                # the others ran to the end first


# --------------------------------------------------------------------------------------
# weight-gradient products queued by the backward (layers.Deferred) and shared by the split
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["swiglu", "drelu", "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ffn_backward_deferred_is_bit_for_bit(act, dtype):
    from minisparse import layers as L
    from minisparse.activations import get_activation
    a = get_activation(act)
    rng = np.random.default_rng(7)
    N, D, F = 33, 7, 13
    x = rng.standard_normal((N, D)).astype(dtype)
    wg, wu, wd = (rng.standard_normal((F, D)).astype(dtype) for _ in range(3))
    wu = wu if a.gated else None
    dy = rng.standard_normal((N, D)).astype(dtype)
    _, cache = L.ffn_forward(x, wg, wu, wd, a)
    want = L.ffn_backward(dy, cache, wg, wu, wd, a)
    queue = []
    got = L.ffn_backward(dy, cache, wg, wu, wd, a, defer=queue)
    assert len(queue) == (2 if a.gated else 1)
    assert all(isinstance(g, L.Deferred) for g in (got[1],) + ((got[2],) if a.gated else ()))
    for d in queue[::-1]:                               # any order, any thread
        d.run()
    got = [g.value if isinstance(g, L.Deferred) else g for g in got]
    for w, g in zip(want, got):
        assert (w is None and g is None) or np.array_equal(w, g)


@pytest.mark.parametrize("paired", [True, False])
def test_attention_backward_deferred_is_bit_for_bit(paired):
    from minisparse import layers as L
    rng = np.random.default_rng(3)
    B, T, D, H, K = 2, 7, 16, 4, 2
    Dh = D // H
    x = rng.standard_normal((B, T, D))
    wq, wo = rng.standard_normal((D, H * Dh)), rng.standard_normal((H * Dh, D))
    wk, wv = rng.standard_normal((D, K * Dh)), rng.standard_normal((D, K * Dh))
    bq, bk, bv = rng.standard_normal(H * Dh), rng.standard_normal(K * Dh), rng.standard_normal(K * Dh)
    cos, sin = L.rope_tables(Dh, T, 10000.0, np.float64)
    kv = None if paired else (np.zeros((B, K, T, Dh)), np.zeros((B, K, T, Dh)))
    _, cache = L.attention_forward(x, wq, wk, wv, wo, cos, sin, H, K, bq, bk, bv, kv_cache=kv)
    dy = rng.standard_normal((B, T, D))
    dx1, g1 = L.attention_backward(dy, cache, wq, wk, wv, wo)
    queue = []
    dx2, g2 = L.attention_backward(dy, cache, wq, wk, wv, wo, defer=queue)
    assert len(queue) == 3 and np.array_equal(dx1, dx2)
    for d in queue:
        d.run()
    for k in g1:
        g = g2[k].value if isinstance(g2[k], L.Deferred) else g2[k]
        assert np.array_equal(g1[k], g), k


def _split_model(act="swiglu"):
    import minisparse as ms
    cfg = ms.ModelConfig(vocab_size=40, dim=24, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=40, max_seq_len=80,
                         activation=act)
    return ms.Transformer(cfg, seed=3, dtype=np.float64)


def test_split_shares_the_slow_parts_products(monkeypatch):
    """A part that runs behind (here: it sleeps after its backward) has its queued
    weight-gradient products computed by the other thread; the result is the same bits."""
    import threading
    import time
    from minisparse import layers as L
    model = _split_model()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 40, (4, 70)), rng.integers(0, 40, (4, 70))
    _, want, _ = T.accumulate_grads(model, [(x, y)], workers=2)

    made, ran = {}, {}
    weight_grad, run = L._weight_grad, L.Deferred.run

    def tagged(fn, defer):
        d = weight_grad(fn, defer)
        made[id(d)] = threading.current_thread().name
        return d

    def run_where(self):
        ran[id(self)] = threading.current_thread().name
        if ran[id(self)] != made[id(self)]:
            time.sleep(0.02)                            # a product taken over finishes late: its part must wait
        return run(self)
    inner = model._loss_and_grads

    def slow_first_part(tokens, targets=None, l1=0.0, defer=None):
        out = inner(tokens, targets, l1, defer)
        if np.array_equal(tokens[0], x[0]):
            time.sleep(0.3)                             # the other thread is done meanwhile
        return out
    monkeypatch.setattr(L, "_weight_grad", tagged)
    monkeypatch.setattr(L.Deferred, "run", run_where)
    monkeypatch.setattr(model, "_loss_and_grads", slow_first_part)
    _, got, _ = T.accumulate_grads(model, [(x, y)], workers=2)
    assert len(made) == 2 * 3 * 5 and set(ran) == set(made)  # 2 parts x 3 layers x (wq, wk, wv, w_gate, w_up)
    assert any(ran[k] != made[k] for k in made)              # some by the thread that did not queue them
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_split_error_in_a_part_is_raised_not_hung(monkeypatch):
    model = _split_model()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 40, (4, 9)), rng.integers(0, 40, (4, 9))
    inner = model._loss_and_grads

    def fails_once(tokens, targets=None, l1=0.0, defer=None):
        if np.array_equal(tokens[0], x[0]):
            raise FloatingPointError("part failed")
        return inner(tokens, targets, l1, defer)
    monkeypatch.setattr(model, "_loss_and_grads", fails_once)
    with pytest.raises(FloatingPointError, match="part failed"):
        T.accumulate_grads(model, [(x, y)], workers=2)
