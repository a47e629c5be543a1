"""A model on the GPU (``model.to("cupy")``) against the same model on the host.

The same readable code runs on both (minisparse.xp); these tests hold the device run to
the host run: greedy tokens identical and logits to rounding, for dense, drelu, MoE and a
model loaded from a Hugging Face folder; the sparse CuPy kernels inside a device model;
training on the device against training on the host; moving back and forth bit for bit;
the recorder and the predictors on device arrays. Skipped (never passed) without CuPy and
a CUDA device; tests/test_device.py checks the same seam on the CPU with a strict stand-in.
"""
from __future__ import annotations

import numpy as np
import pytest

import minisparse as ms
from minisparse.xp import to_numpy

pytestmark = pytest.mark.gpu


def _cfg(**kw):
    base = dict(vocab_size=61, dim=40, n_layers=3, n_heads=5, n_kv_heads=1, ffn_dim=70, max_seq_len=64,
                activation="drelu")
    base.update(kw)
    return ms.ModelConfig(**base)


CASES = {
    "dense-swiglu": _cfg(activation="swiglu", tie_embeddings=False),
    "drelu": _cfg(),
    "moe-drelu": _cfg(n_experts=4, top_k=2, n_shared_experts=1, moe_layers=(0, 2)),
    "gemma-geglu-bias": _cfg(activation="geglu", norm_offset=True, embed_scale=True, qkv_bias=True),
}


def _rescale(model, s=8.0):
    for k in model.params:          # larger weights: real routing and activations, distinct logits
        model.params[k] *= s
    return model


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_device_decode_equals_host(cp, name, dtype):
    cfg = CASES[name]
    host = _rescale(ms.Transformer(cfg, seed=3, dtype=dtype))
    dev = ms.Transformer(cfg, dtype=dtype, params={k: v.copy() for k, v in host.params.items()}).to("cupy")
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 11))
    lh, ld = host(toks), dev(toks)
    assert isinstance(ld, cp.ndarray)
    tol = 2e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(to_numpy(ld), lh, rtol=tol, atol=tol * np.abs(lh).max())
    prompt = [1, 7, 3]
    want = ms.generate(host, prompt, max_new_tokens=16, temperature=0)
    assert ms.generate(dev, prompt, max_new_tokens=16, temperature=0) == want
    if dtype == np.float64:       # sampling: the same uniform against the same cdf
        kw = dict(temperature=0.8, top_k=20, top_p=0.95, seed=5)
        assert ms.generate(dev, prompt, max_new_tokens=16, **kw) == ms.generate(host, prompt, max_new_tokens=16, **kw)


@pytest.mark.parametrize("name", ["drelu", "moe-drelu"])
def test_cupy_kernels_inside_a_device_model(cp, name):
    cfg = CASES[name]
    dev = _rescale(ms.Transformer(cfg, seed=4, dtype=np.float32)).to("cupy")
    prompt = [2, 9, 4, 4]
    want = ms.generate(dev, prompt, max_new_tokens=12, temperature=0)
    assert ms.generate(dev, prompt, max_new_tokens=12, temperature=0, backend="cupy") == want
    dev(np.array([[5]]), backend="cupy")
    assert dev.ffn_stats and all(s["backend"] == "cupy" for s in dev.ffn_stats)
    host = ms.Transformer(cfg, seed=4, dtype=np.float32, backend="cupy")      # weights left on the host
    with pytest.warns(UserWarning, match=r"model.to\('cupy'\)"):
        host(np.array([[5, 6]]))


def test_hf_loaded_model_on_device(cp, tmp_path):
    pytest.importorskip("safetensors")
    cfg = _cfg(activation="swiglu", n_heads=4, n_kv_heads=2, dim=32, tie_embeddings=False)
    src = _rescale(ms.Transformer(cfg, seed=6, dtype=np.float32), 4.0)
    ms.save_hf(src, tmp_path / "hf")
    host = ms.load_hf(tmp_path / "hf", dtype=np.float32)
    dev = ms.load_hf(tmp_path / "hf", dtype=np.float32).to("cupy")
    prompt = [3, 1, 4, 1, 5]
    assert ms.generate(dev, prompt, max_new_tokens=12, temperature=0) == \
        ms.generate(host, prompt, max_new_tokens=12, temperature=0)
    ms.save_hf(dev, tmp_path / "hf2")           # writing from the device works
    back = ms.load_hf(tmp_path / "hf2", dtype=np.float32)
    for k in host.params:
        np.testing.assert_array_equal(back.params[k], host.params[k])


def test_move_back_and_forth_bit_for_bit(cp, tmp_path):
    m = ms.Transformer(CASES["moe-drelu"], seed=1, dtype=np.float32)
    ref = {k: v.copy() for k, v in m.params.items()}
    for _ in range(2):
        m.to("cupy")
        assert all(isinstance(v, cp.ndarray) for v in m.params.values())
        m.to("numpy")
    for k in ref:
        np.testing.assert_array_equal(m.params[k], ref[k])
    m.to("cupy")
    back = ms.load(ms.save(m, tmp_path / "m.safetensors"))
    for k in ref:
        np.testing.assert_array_equal(back.params[k], ref[k])


def test_device_training_equals_host_training(cp):
    """20 float64 steps: losses agree to 1e-9 (relative); weights within Adam's bound.

    Why a bound and not equality: GPU and CPU sum in different orders, so gradients differ
    by rounding (~1e-16 relative). Adam divides m by sqrt(v): for a gradient that is itself
    pure rounding noise, m/sqrt(v) is of order 1 whatever the noise's size, so such an
    element moves by up to lr in either run. Each run's Adam steps move an element by at
    most lr_t per step (|m_hat| <= sqrt(v_hat) when (1-b1) <= sqrt(1-b2), Kingma & Ba
    sec. 2.1), so the two runs can differ by at most 2 * sum_t lr_t; elements with real
    gradients agree to rounding, which the median checks.
    """
    from minisparse.data import corpus_from_text
    from minisparse.train import TrainConfig, lr_at, train
    corpus = corpus_from_text("def f(x):\n    return [x * i for i in range(3)]\n" * 200)
    cfg = ms.preset("nano", activation="drelu")
    tc = TrainConfig(steps=20, batch_size=4, seq_len=32, warmup=2, lr=3e-3, progress=False, eval_batches=2)
    host = ms.Transformer(cfg, seed=0, dtype=np.float64)
    dev = ms.Transformer(cfg, seed=0, dtype=np.float64).to("cupy")
    rh, rd = train(host, corpus, tc), train(dev, corpus, tc)
    lh = np.array([r["loss"] for r in rh.history])
    ld = np.array([r["loss"] for r in rd.history])
    np.testing.assert_allclose(ld, lh, rtol=1e-9, atol=0)
    bound = 2 * sum(lr_at(s, tc) for s in range(tc.steps))
    diffs = np.concatenate([np.abs(to_numpy(dev.params[k]) - host.params[k]).ravel() for k in host.params])
    assert diffs.max() <= bound, (diffs.max(), bound)
    assert np.median(diffs) <= 1e-12, np.median(diffs)


def test_recorder_and_predictors_on_device(cp):
    from minisparse.predictor import fit_predictors, loss_change, predicted_decoding
    from minisparse.sparsity import Recorder
    cfg = CASES["drelu"]
    host = _rescale(ms.Transformer(cfg, seed=2, dtype=np.float64))
    dev = ms.Transformer(cfg, dtype=np.float64, params={k: v.copy() for k, v in host.params.items()}).to("cupy")
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(4, 24))
    rh, rd = Recorder(), Recorder()
    rh.run(host, toks)
    rd.run(dev, toks)
    for k in rh.keys():
        assert rd.stats[k].n_zero == rh.stats[k].n_zero
        np.testing.assert_array_equal(rd.stats[k].neuron_active, rh.stats[k].neuron_active)
    preds = fit_predictors(dev, toks, rank=8, epochs=3)
    assert sorted(preds) == [(i, None) for i in range(cfg.n_layers)]
    ch = loss_change(dev, preds, toks)
    assert np.isfinite(ch["delta"])
    with predicted_decoding(dev, preds, backend="cupy"):
        out = ms.generate(dev, [1, 2, 3], max_new_tokens=6, temperature=0)
        assert all(s["predicted"] for s in dev.ffn_stats)
    assert len(out) == 6
