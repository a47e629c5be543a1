"""Validation loss under sparsification rules."""
import numpy as np
import pytest

import minisparse as ms
from minisparse.data import corpus_from_text
from minisparse.sparsity.metrics import cett_mask
from minisparse.sparsity import (Mask, Recorder, Threshold, TopK, calibrate_cett, calibrate_teal, cett,
                                 evaluate_rule, evaluate_teal, loss_vs_sparsity)
from minisparse.train import evaluate

EK = dict(batch_size=2, seq_len=32, n_batches=2)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "x", "(", ")", ":", "\n", "    ", "import", "for", "in", "if", "=", "+"]
    return corpus_from_text(" ".join(rng.choice(words, size=6000)))


@pytest.fixture(scope="module")
def model():
    return ms.Transformer(ms.preset("nano", activation="swiglu"), seed=0)


def test_dense_rule_equals_the_trainers_evaluate(model, corpus):
    assert evaluate_rule(model, corpus, None, **EK)["loss"] == evaluate(model, corpus, **EK)
    res = evaluate_rule(model, corpus, TopK(0.0), **EK)
    assert res["loss"] == evaluate(model, corpus, **EK) and res["sparsity"] == 0.0
    assert evaluate_rule(model, corpus, Mask(lambda l, e, h: np.ones(h.shape, bool)), **EK)["loss"] == res["loss"]


def test_rules_return_new_arrays_and_count_sparsity():
    h = np.array([[1.0, -2.0, 0.5, 0.0], [0.1, 0.2, -0.3, 4.0]])
    orig = h.copy()
    r = TopK(0.5)
    out = r(0, None, h)
    assert np.array_equal(h, orig) and out is not h
    assert out.tolist() == [[1.0, -2.0, 0.0, 0.0], [0.0, 0.0, -0.3, 4.0]]
    assert r.sparsity == 0.5
    t = Threshold({0: 0.25, (1, 3): 1.5})
    assert t(0, None, h).tolist() == [[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, -0.3, 4.0]]
    assert t(1, 3, h).tolist() == [[0.0, -2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]]
    with pytest.raises(KeyError, match="layer 2"):
        t(2, None, h)
    with pytest.raises(ValueError, match="shape"):
        Mask(lambda l, e, h: np.ones(3, bool))(0, None, h)


def test_loss_vs_sparsity_reaches_its_targets(model, corpus):
    curve = loss_vs_sparsity(model, corpus, [0.0, 0.5, 0.9], **EK)
    F = model.config.ffn_dim
    for p in curve:
        assert p["sparsity"] == pytest.approx(1 - round((1 - p["target"]) * F) / F)
        assert np.isfinite(p["loss"])
    thr = loss_vs_sparsity(model, corpus, [0.5], rule="threshold", **EK)
    assert abs(thr[0]["sparsity"] - 0.5) < 0.05
    with pytest.raises(ValueError, match="topk"):
        loss_vs_sparsity(model, corpus, [0.5], rule="nope", **EK)


def test_calibrated_cett_thresholds_keep_cett_under_target(model, corpus):
    rec = Recorder(row_reservoir=64)
    rec.record(model, corpus, **EK)
    res = calibrate_cett(model, target=0.2, recorder=rec)
    for key, v in res.items():
        rows = rec.stats[key].rows.sample()
        w_down = model.ffn_weights(*key).w_down
        assert cett(rows, w_down, v["eps"]) <= 0.2
        assert 0 < v["sparsity"] < 1
        # the per-neuron |h| thresholds drop exactly the neurons of output norm < eps
        keep = np.abs(rows) >= v["threshold"]
        assert (keep == cett_mask(rows, w_down, v["eps"])).all()
    # the Threshold rule applies them: its sparsity on the recorded rows is CETT's
    rule = Threshold({k: v["threshold"] for k, v in res.items()})
    for key, v in res.items():
        rule.reset()
        rule(key[0], key[1], rec.stats[key].rows.sample())
        assert rule.sparsity == pytest.approx(v["sparsity"])


def test_teal_calibration_and_evaluation(model, corpus):
    th = calibrate_teal(model, corpus, 0.5, n_batches=2, batch_size=2, seq_len=32)
    assert set(th) == {f"layers.{i}.feed_forward.{p}" for i in range(2) for p in ("w_gate", "w_up", "w_down")}
    res = evaluate_teal(model, corpus, th, **EK)
    assert abs(res["input_sparsity"] - 0.5) < 0.15 and abs(res["sparsity"] - 0.5) < 0.15
    zero = evaluate_teal(model, corpus, {k: 0.0 for k in th}, **EK)
    assert zero["loss"] == pytest.approx(evaluate(model, corpus, **EK), rel=1e-6)
