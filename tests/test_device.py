"""The NumPy/CuPy seam (minisparse.xp) on a machine without a GPU.

A strict CuPy stand-in (tests/fake_cupy.py) refuses every implicit host<->device move
that real CuPy refuses, and computes with NumPy underneath: so a model moved with
``model.to("cupy")`` must give *bit-identical* results to the host model, and any NumPy
array leaking into a device computation fails the test. The real GPU runs the same
checks in tests/gpu/test_device_model.py.
"""
import numpy as np
import pytest

import minisparse as ms
from minisparse import xp as X

from fake_cupy import FakeArray, HostArrayError, install


@pytest.fixture
def cp(monkeypatch):
    return install(monkeypatch)


def _cfg(**kw):
    base = dict(vocab_size=37, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=33, max_seq_len=32,
                activation="drelu")
    base.update(kw)
    return ms.ModelConfig(**base)


def _pair(cfg, dtype=np.float64, seed=0):
    host = ms.Transformer(cfg, seed=seed, dtype=dtype)
    dev = ms.Transformer(cfg, seed=seed, dtype=dtype).to("cupy")
    return host, dev


def test_fake_is_strict(cp):
    """The double must be able to fail: mixing and implicit conversion raise."""
    a = cp.asarray(np.ones(3))
    with pytest.raises(HostArrayError):
        a + np.ones(3)
    with pytest.raises(HostArrayError):
        np.asarray(a)
    with pytest.raises(HostArrayError):
        np.add.at(a, [0], 1.0)
    assert isinstance(a.sum(), FakeArray) and float(a.sum()) == 3.0


def test_unknown_device_and_missing_cupy(monkeypatch):
    m = ms.Transformer(_cfg(), seed=0)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        m.to("tpu")
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)            # import cupy -> ImportError
    with pytest.raises(ImportError, match="pip install cupy"):
        m.to("cupy")
    assert m.device == "numpy"                                # nothing moved


@pytest.mark.parametrize("cfg", [_cfg(), _cfg(activation="swiglu", tie_embeddings=False, qkv_bias=True),
                                 _cfg(norm_offset=True, embed_scale=True, activation="geglu"),
                                 _cfg(n_experts=4, top_k=2, n_shared_experts=1, activation="drelu"),
                                 _cfg(n_experts=3, top_k=1, router="softmax_topk", activation="relu",
                                      capacity_factor=1.0)],
                         ids=["drelu", "swiglu-bias-untied", "gemma-geglu", "moe-shared", "moe-top1-capacity"])
def test_device_forward_backward_equal_host_bit_for_bit(cp, cfg):
    host, dev = _pair(cfg)
    assert dev.device == "cupy" and all(isinstance(v, FakeArray) for v in dev.params.values())
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 9))
    lh, ld = host(toks), dev(toks)
    assert isinstance(ld, FakeArray)
    np.testing.assert_array_equal(X.to_numpy(ld), lh)
    loss_h, g_h = host.loss_and_grads(toks, l1=0.01)
    loss_d, g_d = dev.loss_and_grads(toks, l1=0.01)
    assert loss_h == loss_d
    for k in g_h:
        assert isinstance(g_d[k], FakeArray), k
        np.testing.assert_array_equal(X.to_numpy(g_d[k]), g_h[k], err_msg=k)
    assert host.last_aux.keys() == dev.last_aux.keys()


def test_device_kv_cache_decoding_and_generation(cp):
    host, dev = _pair(_cfg(), dtype=np.float32)
    cache = dev.new_cache(1, max_len=12)
    assert isinstance(cache.k[0], FakeArray)
    toks = np.array([[3, 5, 7, 11]])
    full = X.to_numpy(dev(toks))
    inc = np.concatenate([X.to_numpy(dev(toks[:, t:t + 1], cache=cache)) for t in range(4)], axis=1)
    np.testing.assert_allclose(inc, full, rtol=1e-5, atol=1e-6)
    for kw in (dict(temperature=0), dict(temperature=0.9, seed=3), dict(temperature=1.0, top_k=5, top_p=0.8, seed=4)):
        assert ms.generate(dev, [1, 2], max_new_tokens=8, **kw) == ms.generate(host, [1, 2], max_new_tokens=8, **kw)


def test_device_model_moves_back_bit_for_bit_and_saves(cp, tmp_path):
    pytest.importorskip("safetensors")
    host = ms.Transformer(_cfg(), seed=2, dtype=np.float32)
    ref = {k: v.copy() for k, v in host.params.items()}
    host.to("cupy")
    p = ms.save(host, tmp_path / "dev.safetensors")
    host.to("numpy")
    assert host.device == "numpy"
    for k in ref:
        assert type(host.params[k]) is np.ndarray
        np.testing.assert_array_equal(host.params[k], ref[k])
    back = ms.load(p)
    for k in ref:
        np.testing.assert_array_equal(back.params[k], ref[k])


def test_device_training_equals_host_training(cp, monkeypatch):
    import minisparse.train as T
    from minisparse.data import corpus_from_text
    from minisparse.train import TrainConfig, train
    # bit for bit needs the same sums: the host's step must not split its batch over threads
    # (the device never does; tests/test_train_split.py checks the split against the whole)
    monkeypatch.setattr(T, "training_workers", lambda: 1)
    corpus = corpus_from_text("def f(x):\n    return x * 2 + 1\n" * 100)
    cfg = ms.preset("nano", activation="drelu", vocab_size=258)
    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, progress=False, eval_batches=1)
    host = ms.Transformer(cfg, seed=0, dtype=np.float64)
    dev = ms.Transformer(cfg, seed=0, dtype=np.float64).to("cupy")
    rh, rd = train(host, corpus, tc), train(dev, corpus, tc)
    assert [r["loss"] for r in rh.history] == [r["loss"] for r in rd.history]
    assert rh.final_val_loss == rd.final_val_loss
    for k in host.params:
        np.testing.assert_array_equal(X.to_numpy(dev.params[k]), host.params[k])


def test_device_recorder_predictors_and_stats(cp):
    from minisparse.predictor import fit_predictors, loss_with_predictors
    from minisparse.sparsity import Recorder
    from minisparse.stats import count_parameters, moe_stats
    cfg = _cfg(n_experts=3, top_k=2, moe_layers=(1,))
    host, dev = _pair(cfg, dtype=np.float32)
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 16))
    rh, rd = Recorder(capture_inputs=True), Recorder(capture_inputs=True)
    rh.run(host, toks)
    rd.run(dev, toks)
    assert rh.keys() == rd.keys()
    for k in rh.keys():
        a, b = rh.stats[k], rd.stats[k]
        assert (a.n_zero, a.n_tokens) == (b.n_zero, b.n_tokens)
        np.testing.assert_array_equal(a.neuron_active, b.neuron_active)
        np.testing.assert_array_equal(a.rows.sample(), b.rows.sample())
    assert count_parameters(dev, toks) == count_parameters(host, toks)
    assert moe_stats(dev, toks) == moe_stats(host, toks)
    ph = fit_predictors(host, toks, rank=4, epochs=2)
    pd = fit_predictors(dev, toks, rank=4, epochs=2)
    assert sorted(ph) == sorted(pd)
    assert loss_with_predictors(dev, pd, toks) == loss_with_predictors(host, ph, toks)


def test_xp_helpers_without_cupy():
    a = np.arange(4.0)
    assert X.array_module(a, None) is np and X.to_numpy(a) is a and X.to_device(a, np) is a
    t = np.zeros(3)
    X.add_at(t, np.array([0, 0, 2]), 1.0)
    np.testing.assert_array_equal(t, [2.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="unknown device"):
        X.get_module("metal")
