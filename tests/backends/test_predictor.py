"""Predictors: gradients, training, thresholds, recording, loss change, predicted decoding."""
from __future__ import annotations

import numpy as np
import pytest

import minisparse as ms
from minisparse import predictor as P

from backend_helpers import require


def _fd_check(f, arr, grad, eps=1e-6, n=6, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        i = tuple(rng.integers(0, s) for s in arr.shape)
        old = arr[i]
        arr[i] = old + eps
        lp = f()
        arr[i] = old - eps
        lm = f()
        arr[i] = old
        num = (lp - lm) / (2 * eps)
        assert abs(num - grad[i]) <= 1e-6 + 1e-5 * abs(num), (i, num, grad[i])


def test_predictor_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    p = P.Predictor.init(7, 11, rank=5, seed=1)
    for k in ("w1", "b1", "w2", "b2"):
        setattr(p, k, getattr(p, k).astype(np.float64) + 0.1 * rng.normal(size=getattr(p, k).shape))
    x = rng.normal(size=(9, 7))
    y = rng.random((9, 11)) < 0.3
    wp, wn = P.class_weights(y)

    def loss():
        z, _ = p.forward(x)
        return P.bce_forward(z, y, wp, wn)

    z, cache = p.forward(x)
    grads = p.backward(P.bce_backward(z, y, wp, wn), cache)
    for k in ("w1", "b1", "w2", "b2"):
        _fd_check(loss, getattr(p, k), grads[k])


def test_bce_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4, 6)) * 3
    y = rng.random((4, 6)) < 0.5
    g = P.bce_backward(z, y, 2.0, 0.7)
    _fd_check(lambda: P.bce_forward(z, y, 2.0, 0.7), z, g, n=10)


def test_class_weights_balance_the_classes():
    y = np.zeros((10, 10), bool)
    y[0, :5] = True                                                   # 5% positive
    wp, wn = P.class_weights(y)
    assert wp * y.mean() == pytest.approx(wn * (1 - y.mean()))


def test_training_learns_a_rule_and_threshold_reaches_target_recall():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 12)).astype(np.float32)
    w = rng.normal(size=(12, 20))
    y = x @ w > 1.5                                                   # sparse, learnable
    p = P.train_predictor(x, y, rank=12, epochs=40, lr=1e-2, seed=0)
    before = P.evaluate(p, x, y)
    assert before["recall"] > 0.85 and before["precision"] > 0.5
    for target in (0.9, 0.99, 1.0):
        P.tune_threshold(p, x, y, target)
        m = P.evaluate(p, x, y)
        assert m["recall"] >= target - 1.0 / y.sum()                  # at most one positive of rounding
    assert 0 < m["predicted_sparsity"] < 1 and m["true_sparsity"] == pytest.approx(1 - y.mean())


def test_bad_training_inputs_raise():
    with pytest.raises(ValueError, match="same N"):
        P.train_predictor(np.zeros((3, 4)), np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="target_recall"):
        P.tune_threshold(P.Predictor.init(2, 2), np.zeros((1, 2)), np.zeros((1, 2), bool), 0.0)
    with pytest.raises(ValueError, match="dim=4"):
        P.Predictor.init(4, 3).predict(np.zeros((2, 5)))


def _relu_model(moe=False, act="relu"):
    if moe:
        cfg = ms.preset("tiny-moe", activation=act, n_layers=2, dim=32, n_heads=4, ffn_dim=48,
                        n_shared_experts=1, max_seq_len=64)
    else:
        cfg = ms.preset("nano", activation=act)
    return ms.Transformer(cfg, seed=0)


def _tokens(seed=0, shape=(4, 24)):
    return np.random.default_rng(seed).integers(0, 256, size=shape)


def test_record_labels_are_the_nonzero_neurons():
    from minisparse import layers as L
    model = _relu_model(act="drelu")
    toks = _tokens()
    data = P.record(model, toks)
    assert set(data) == {(i, None) for i in range(model.config.n_layers)}
    x, y = data[(0, None)]
    pre = "layers.0.feed_forward."
    _, (_, _, _, h) = L.ffn_forward(x, model.params[pre + "w_gate"], model.params[pre + "w_up"],
                                    model.params[pre + "w_down"], model.act)
    assert x.shape == (toks.size, model.config.dim)
    assert np.array_equal(y, h != 0)
    assert not hasattr(model.__dict__, "_ffn") and "_ffn" not in model.__dict__  # model restored


def test_loss_change_is_zero_with_all_on_predictors_and_small_when_tuned():
    model = _relu_model()
    train, val = _tokens(0, (8, 32)), _tokens(1, (2, 32))
    ps = P.fit_predictors(model, train, rank=16, epochs=15, lr=1e-2, target_recall=0.99)
    assert set(ps) == {(0, None), (1, None)}
    for row in ps.report():
        assert {"recall", "precision", "predicted_sparsity", "true_sparsity", "cost"} <= set(row)
        assert row["recall"] >= 0.95
    allon = {k: P.Predictor(p.w1, p.b1, p.w2, p.b2, threshold=0.0) for k, p in ps.items()}
    for p in allon.values():
        p.b2 = p.b2 + np.float32(1e4)                                  # p = 1 everywhere
    assert P.loss_change(model, allon, val)["delta"] == pytest.approx(0.0, abs=1e-6)
    ch = P.loss_change(model, ps, val)
    assert abs(ch["delta"]) < 0.05 * ch["dense"], ch
    # a predictor that keeps nothing must change the loss: the test can fail
    none = {k: P.Predictor(p.w1, p.b1, p.w2, p.b2 - np.float32(1e4), threshold=0.5) for k, p in ps.items()}
    assert abs(P.loss_change(model, none, val)["delta"]) > 1e-4


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_predicted_decoding_runs_sparse_ffn_with_active(backend):
    require(backend)
    model = _relu_model()
    ps = P.fit_predictors(model, _tokens(0, (4, 32)), rank=8, epochs=5, lr=1e-2)
    allon = {k: P.Predictor(p.w1, p.b1, p.w2 * 0, p.b2 * 0 + np.float32(30.0)) for k, p in ps.items()}
    want = ms.generate(model, [256, 5, 9], 10, temperature=0)
    with P.predicted_decoding(model, allon, backend=backend):
        got = ms.generate(model, [256, 5, 9], 10, temperature=0)
        assert all(s["predicted"] and s["backend"] == backend for s in model.ffn_stats)
    assert got == want                                                # every neuron predicted: exact
    with P.predicted_decoding(model, ps, backend=backend):
        ms.generate(model, [256, 5, 9], 4, temperature=0)
        fr = [s["fraction"] for s in model.ffn_stats]
    assert all(0 <= f <= 1 for f in fr)
    with P.predicted_decoding(model, ps, backend="numpy"):
        ref = ms.generate(model, [256, 5, 9], 8, temperature=0)
    with P.predicted_decoding(model, ps, backend=backend):
        assert ms.generate(model, [256, 5, 9], 8, temperature=0) == ref
    assert "_ffn" not in model.__dict__


def test_moe_predictors_per_expert():
    model = _relu_model(moe=True)
    toks = _tokens(2, (4, 32))
    ps = P.fit_predictors(model, toks, rank=8, epochs=5, lr=1e-2, target_recall=0.95)
    experts = {k[1] for k in ps}
    assert -1 in experts and len(experts - {-1}) >= 2                 # shared + routed experts
    x, y = P.record(model, toks)[(0, -1)]
    assert x.shape[0] == toks.size and y.shape[1] == model.config.shared_ffn_dim
    ch = P.loss_change(model, ps, _tokens(3, (2, 32)))
    assert np.isfinite(ch["predicted"])
