"""The recorder observes without changing anything, counts exactly, and stays bounded."""
import numpy as np
import pytest

import minisparse as ms
from minisparse.layers import ffn_forward
from minisparse.sparsity import Recorder, consecutive_reuse, ffn_input_tap
from minisparse.sparsity.recorder import Reservoir


def _tokens(B, T, seed=0, V=258):
    return np.random.default_rng(seed).integers(0, 256, size=(B, T))


@pytest.mark.parametrize("act", ["drelu", "swiglu", "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recording_does_not_change_logits_bitwise(act, dtype):
    model = ms.Transformer(ms.preset("nano", activation=act), seed=1, dtype=dtype)
    x = _tokens(2, 33)
    plain = model(x)
    rec = Recorder(capture_inputs=True)
    logits = rec.run(model, x)
    assert np.array_equal(plain, logits)
    assert np.array_equal(plain, model(x, ffn_hook=rec))
    assert "_ffn" not in vars(model)             # the input tap was removed


def test_recording_moe_does_not_change_logits():
    model = ms.Transformer(ms.preset("nano", activation="drelu", n_experts=4, top_k=2, n_shared_experts=1), seed=0)
    x = _tokens(2, 17)
    plain = model(x)
    rec = Recorder()
    assert np.array_equal(plain, rec.run(model, x))
    experts = {k for k in rec.stats if k[1] is not None}
    assert experts and all(k[1] in (-1, 0, 1, 2, 3) for k in experts)
    for layer, e in experts:                      # every recorded expert has its weights found
        wg, wu, wd = model.ffn_weights(layer, e)
        assert wd.shape[0] == rec.stats[(layer, e)].n_neurons
        pre = f"layers.{layer}.feed_forward."
        want = model.params[pre + "shared.w_down"] if e == -1 else model.params[pre + "experts.w_down"][e]
        assert np.array_equal(wd, want)
    # routed experts see N*k rows in all; the shared expert sees every token
    for layer in range(2):
        routed = sum(rec.stats[k].n_tokens for k in experts if k[0] == layer and k[1] >= 0)
        assert routed == 2 * 17 * 2
        assert rec.stats[(layer, -1)].n_tokens == 2 * 17


def test_counts_match_a_direct_computation():
    model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=3)
    B, T = 3, 20
    x = _tokens(B, T, seed=5)
    seen = {}

    def keep(layer, expert, h):
        seen[layer] = h.copy()

    model(x, ffn_hook=keep)
    rec = Recorder(eps=(1e-3, 1e-1), active_eps=0.0)
    rec.run(model, x)
    for layer, h in seen.items():
        st = rec.stats[(layer, None)]
        assert st.n_tokens == B * T
        assert st.n_zero == np.count_nonzero(h == 0)
        assert st.below_eps_fraction()[1e-1] == np.mean(np.abs(h) < 1e-1)
        assert np.array_equal(st.neuron_active, (h != 0).sum(axis=0))
        act = (h != 0).reshape(B, T, -1)
        shared = sum(np.count_nonzero(a[1:] & a[:-1]) for a in act)
        nxt = sum(np.count_nonzero(a[1:]) for a in act)
        assert st.reuse() == shared / nxt
        # consecutive_reuse on one sequence agrees with the recorder on that sequence alone
        r1 = Recorder()
        r1.run(model, x[:1])
        assert r1.stats[(layer, None)].reuse() == pytest.approx(consecutive_reuse(act[0]))


def test_state_size_does_not_grow_with_tokens():
    model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
    rec = Recorder(value_reservoir=1000, row_reservoir=16, capture_inputs=True)
    rec.run(model, _tokens(1, 8))
    size = rec.nbytes
    for i in range(4):
        rec.run(model, _tokens(4, 128, seed=i))
    assert rec.nbytes == size
    st = rec.stats[(0, None)]
    assert st.n_tokens == 8 + 4 * 4 * 128
    assert st.values.sample().shape == (1000,) and st.rows.sample().shape == (16, 172)
    assert rec.inputs[0].sample().shape == (16, 64)


def test_reservoir_keeps_everything_until_full_then_samples_uniformly():
    r = Reservoir(10, (), np.int64, seed=0)
    r.add(np.arange(7))
    assert r.sample().tolist() == list(range(7))
    hits = np.zeros(100)
    for seed in range(2000):
        r = Reservoir(10, (), np.int64, seed=seed)
        for chunk in np.array_split(np.arange(100), 7):   # uneven chunks: the stream, not the batching, matters
            r.add(chunk)
        s = r.sample()
        assert len(set(s.tolist())) == 10 and r.seen == 100
        hits[s] += 1
    freq = hits / 2000                                     # each item kept with probability 10/100
    assert np.abs(freq - 0.1).max() < 0.03
    assert abs(freq[:50].mean() - freq[50:].mean()) < 0.01  # early and late items alike


def test_input_tap_sees_the_ffn_input_and_restores_the_model():
    model = ms.Transformer(ms.preset("nano", activation="swiglu"), seed=2)
    x = _tokens(2, 9)
    xs, hs = {}, {}
    with ffn_input_tap(model, lambda i, x2: xs.__setitem__(i, x2.copy())):
        model(x, ffn_hook=lambda i, e, h: hs.__setitem__(i, h.copy()))
    for i in range(2):
        wg, wu, wd = model.ffn_weights(i)
        _, (_, _, _, h) = ffn_forward(xs[i], wg, wu, wd, model.act)
        assert np.array_equal(h, hs[i])
    assert "_ffn" not in vars(model)
    with pytest.raises(ZeroDivisionError):
        with ffn_input_tap(model, lambda i, x2: 1 / 0):
            model(x)
    assert "_ffn" not in vars(model)
    assert np.array_equal(model(x), model(x))


def test_summary_reports_cett_and_rejects_bad_h():
    model = ms.Transformer(ms.preset("nano", activation="reglu"), seed=0)
    rec = Recorder()
    rec.run(model, _tokens(2, 16))
    rows = rec.summary(model)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(0 <= r["cett_sparsity"] <= 1 and r["exact_zero"] > 0.2 for r in rows)
    with pytest.raises(ValueError, match="tokens, neurons"):
        rec(0, None, np.zeros(3))
