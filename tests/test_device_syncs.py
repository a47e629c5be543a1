"""How a training step on the device talks to the host, counted on the strict fake CuPy.

On a GPU every read of a device value (``float(x)``, ``int(x)``, ``bool(x)``, ``.get()``)
waits for all queued work, and every array operation is a kernel launch paid in Python
(~5-20 us each). A step of ``bench/science_gpu.py``'s model took 614 ms on an H200 while
its arithmetic needs ~20 ms: the attention backward made ~14,000 of a step's ~16,000 array
calls (cache blocking meant for the CPU) and the gradient norm read every gradient back
separately. These tests keep both from coming back: a step makes at most 2 reads (the
loss, the gradient norm), 2 uploads (the batch), and a number of array calls that does
not grow with the batch size.
"""
from collections import Counter

import numpy as np
import pytest

import minisparse as ms
from minisparse.data import corpus_from_text
from minisparse.train import AdamW, TrainConfig, _train_step

import fake_cupy

SYNCS = ("__int__", "__float__", "__bool__", "__index__", "get", "item", "tolist")
OPS = ("__array_ufunc__", "__array_function__", "__getitem__", "__setitem__")


class Counts:
    """Counts of device->host reads, host->device uploads and array calls, while ``on``."""

    def __init__(self):
        self.n = Counter()
        self.on = False


@pytest.fixture
def counted(monkeypatch):
    """The fake CuPy installed, with counting wrappers on its array class and module."""
    cp = fake_cupy.install(monkeypatch)
    c = Counts()

    def wrap(name, kind):
        orig = getattr(fake_cupy.FakeArray, name, None)
        if orig is None:
            return

        def counted_call(self, *a, **k):
            if c.on:
                c.n[kind] += 1
            return orig(self, *a, **k)
        monkeypatch.setattr(fake_cupy.FakeArray, name, counted_call)

    for name in SYNCS:
        wrap(name, "sync")
    for name in OPS:
        wrap(name, "op")
    getattr_ = fake_cupy.FakeArray.__getattr__

    def counted_getattr(self, name):
        attr = getattr_(self, name)
        if c.on and callable(attr) and name not in SYNCS:
            def method(*a, **k):
                c.n["op"] += 1
                return attr(*a, **k)
            return method
        return attr
    monkeypatch.setattr(fake_cupy.FakeArray, "__getattr__", counted_getattr)
    asarray = cp.asarray

    def counted_asarray(a, dtype=None):
        if c.on and not isinstance(a, fake_cupy.FakeArray):
            c.n["upload"] += 1
        return asarray(a, dtype)
    monkeypatch.setattr(cp, "asarray", counted_asarray)
    monkeypatch.setattr(cp, "array", counted_asarray)
    module_function = cp.__getattr__                 # xp.zeros, xp.arange ... (module-level fallback)

    def counted_module(name):
        fn = module_function(name)
        if callable(fn) and not isinstance(fn, type):
            def call(*a, **k):
                if c.on:
                    c.n["op"] += 1
                return fn(*a, **k)
            return call
        return fn
    monkeypatch.setattr(cp, "__getattr__", counted_module, raising=False)
    return c


CORPUS = "def f(x):\n    return x * 2 + 1\n" * 200 + "class A:\n    pass\n" * 100


def _step_counts(c: Counts, batch: int, activation: str = "swiglu", dtype=np.float64) -> Counter:
    """Counts of the second training step (the first may build lazily) of a small model."""
    cfg = ms.ModelConfig(vocab_size=258, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=24,
                         max_seq_len=130, activation=activation)
    model = ms.Transformer(cfg, seed=0, dtype=dtype).to("cupy")
    corpus = corpus_from_text(CORPUS)
    tc = TrainConfig(steps=10, batch_size=batch, seq_len=130, warmup=1, eval_every=0, progress=False)
    opt = AdamW(model.params, tc.lr)
    rng = np.random.default_rng(0)
    _train_step(model, corpus, tc, opt, rng, 0, 0.0)
    c.n.clear()
    c.on = True
    _train_step(model, corpus, tc, opt, rng, 1, 0.0)
    c.on = False
    return Counter(c.n)


@pytest.mark.parametrize("activation", ["swiglu", "drelu"])
def test_device_step_reads_back_twice(counted, activation):
    n = _step_counts(counted, batch=3, activation=activation)
    assert n["sync"] <= 2, n                          # the loss and the gradient norm, both after the backward
    assert n["upload"] <= 2, n                        # the batch's inputs and targets
    assert n["op"] > 0, n                             # the counter counts (the test can fail)


def test_device_step_launches_do_not_grow_with_the_batch(counted):
    # float64, 2 heads, 130 keys: the CPU's attention backward takes 4 batch rows a pass, so
    # a batch of 16 would make 4x its launches there; on the device all rows go at once
    small = _step_counts(counted, batch=1)
    large = _step_counts(counted, batch=16)
    assert large["op"] == small["op"], (small, large)
    assert small["op"] <= 800, small      # 2 layers: 750 today (942 with 64-query blocks, 1109 with per-parameter AdamW)


def test_device_attention_blocks_agree_with_the_host(counted):
    """On the device the attention takes all 130 queries in one block (GPU_QUERY_BLOCK), the host
    in blocks of 64: the same loss and gradients to float64 rounding (the hidden keys' scores
    are exactly 0 after exp, so the extra terms add zeros)."""
    from minisparse import xp as X
    cfg = ms.ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=130,
                         activation="swiglu")
    host = ms.Transformer(cfg, seed=1, dtype=np.float64)
    dev = ms.Transformer(cfg, seed=1, dtype=np.float64).to("cupy")
    toks = np.random.default_rng(2).integers(0, 50, size=(3, 131))
    lh, gh = host.loss_and_grads(toks)
    ld, gd = dev.loss_and_grads(toks)
    assert abs(ld - lh) <= 1e-13 * abs(lh)
    for k in gh:
        np.testing.assert_allclose(X.to_numpy(gd[k]), gh[k], rtol=1e-10, atol=1e-14 * np.abs(gh[k]).max(), err_msg=k)


def test_counter_sees_a_host_read(counted):
    """The double must be able to fail: a planted float() is counted."""
    import cupy
    counted.on = True
    float(cupy.asarray(np.ones(3)).sum())
    assert counted.n["sync"] == 1 and counted.n["upload"] == 1
