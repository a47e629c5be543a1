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
