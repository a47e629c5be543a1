"""A training step's batch split over threads (minisparse.train.accumulate_grads(workers=),
minisparse.runtime.training_workers): the same loss and gradient as the whole batch to
rounding, in float64; whole-batch where splitting would change the objective."""
from __future__ import annotations

import numpy as np
import pytest

import minisparse as ms
from minisparse import runtime
from minisparse.train import accumulate_grads


def _model(**kw):
    cfg = dict(vocab_size=40, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, max_seq_len=16,
               activation="swiglu")
    cfg.update(kw)
    return ms.Transformer(ms.ModelConfig(**cfg), seed=3, dtype=np.float64)


def _batch(rng, B, T=9, V=40):
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


@pytest.mark.parametrize("B,workers", [(2, 2), (5, 2), (7, 3), (3, 4)])
@pytest.mark.parametrize("act", ["swiglu", "drelu"])
def test_split_equals_whole_batch(B, workers, act):
    model = _model(activation=act)
    x, y = _batch(np.random.default_rng(B * 10 + workers), B)
    loss1, g1, ce1 = accumulate_grads(model, [(x, y)], workers=1)
    loss2, g2, ce2 = accumulate_grads(model, [(x, y)], workers=workers)
    assert loss2 == pytest.approx(loss1, rel=1e-13)
    assert ce2 == pytest.approx(ce1, rel=1e-13)
    assert sorted(g2) == sorted(g1)
    for k in g1:
        assert g2[k].dtype == g1[k].dtype and g2[k].shape == g1[k].shape
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-10, atol=1e-14, err_msg=k)
    # the parts are combined in a fixed order: the same bits every time
    loss3, g3, _ = accumulate_grads(model, [(x, y)], workers=workers)
    assert loss3 == loss2 and all(np.array_equal(g3[k], g2[k]) for k in g2)


def test_split_with_micro_batches_and_tied_embeddings():
    model = _model(tie_embeddings=True)
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 4), _batch(rng, 4)]
    loss1, g1, _ = accumulate_grads(model, batches, workers=1)
    loss2, g2, _ = accumulate_grads(model, batches, workers=2)
    assert loss2 == pytest.approx(loss1, rel=1e-13)
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-10, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("case", ["l1", "ignored", "moe", "wrapped", "one_row"])
def test_whole_batch_where_a_split_would_change_the_objective(case):
    """MoE (the load-balancing loss is not a mean over tokens), l1, ignored targets, a
    wrap_ffn wrapper (may keep state) and a single row: the batch runs whole, bit for bit."""
    model = _model(n_experts=4, top_k=2) if case == "moe" else _model()
    x, y = _batch(np.random.default_rng(1), 1 if case == "one_row" else 4)
    if case == "ignored":
        y[0, :3] = -1
    l1 = 1e-3 if case == "l1" else 0.0

    def run(workers):
        if case == "wrapped":
            with model.wrap_ffn(lambda ffn, i, x2, hook, train: ffn(i, x2, hook, train)):
                return accumulate_grads(model, [(x, y)], l1=l1, workers=workers)
        return accumulate_grads(model, [(x, y)], l1=l1, workers=workers)
    loss1, g1, ce1 = run(1)
    loss2, g2, ce2 = run(2)
    assert loss2 == loss1 and ce2 == ce1
    assert all(np.array_equal(g2[k], g1[k]) for k in g1)


@pytest.fixture
def fresh_runtime(monkeypatch):
    for name in ("_EXPLICIT_BLAS_THREADS", "_EXPLICIT_TRAIN_WORKERS", "_TRAIN_WORKERS"):
        monkeypatch.setattr(runtime, name, getattr(runtime, name))
    monkeypatch.setattr(runtime, "_DECISIONS", dict(runtime._DECISIONS))
    yield runtime
    runtime._set_blas_threads(1)


def test_training_threads_choose_the_split(fresh_runtime, monkeypatch):
    rt = fresh_runtime
    pytest.importorskip("threadpoolctl")
    for var in rt._BLAS_THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    rt.set_training_threads(2)
    rt.configure_training()
    assert rt.training_workers() == 2
    assert "split" in rt.describe()["blas_threads"]
    rt.set_blas_threads(2)                              # BLAS threads chosen explicitly: no split
    rt.configure_training()
    assert rt.training_workers() == 1
    rt.set_training_threads(1)
    rt.configure_training()
    assert rt.training_workers() == 1
    monkeypatch.setattr(rt, "_EXPLICIT_BLAS_THREADS", None)
    monkeypatch.setattr(rt, "_EXPLICIT_TRAIN_WORKERS", None)
    monkeypatch.setattr(rt, "auto_threads", lambda: 2)  # an idle 2-core machine: minisparse's own choice
    rt.configure_training()
    assert rt.training_workers() == 2
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")     # the user's environment wins
    rt.configure_training()
    assert rt.training_workers() == 1


def test_train_with_a_split_step_is_deterministic_and_close(fresh_runtime, monkeypatch):
    from minisparse.data import corpus_from_text
    from minisparse.train import TrainConfig, train
    import minisparse.train as T
    corpus = corpus_from_text("def f(x):\n    return x + 1\n" * 200)
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup=1, eval_every=0, eval_batches=1, progress=False)

    def run(workers):
        monkeypatch.setattr(T, "training_workers", lambda: workers)
        model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0, dtype=np.float64)
        return [r["loss"] for r in train(model, corpus, cfg).history], model
    (l1, m1), (l2, m2), (l3, m3) = run(1), run(2), run(2)
    assert l2 == l3 and all(np.array_equal(m2.params[k], m3.params[k]) for k in m2.params)
    np.testing.assert_allclose(l2, l1, rtol=1e-9)
    for k in m1.params:
        np.testing.assert_allclose(m2.params[k], m1.params[k], rtol=1e-6, atol=1e-8, err_msg=k)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_bad_thread_counts_are_refused(bad, fresh_runtime):
    model = _model()
    x, y = _batch(np.random.default_rng(0), 2)
    with pytest.raises(ValueError, match="workers"):
        accumulate_grads(model, [(x, y)], workers=bad)
    if isinstance(bad, int):
        with pytest.raises(ValueError, match="threads"):
            fresh_runtime.set_training_threads(bad)
