"""The round-7 fast paths of the training step (issue 14) against the NumPy lines they replace.

* AdamW's update as one Numba pass per parameter (``minisparse.train.FUSED_ADAMW``): the
  NumPy lines' arithmetic element by element, so compared **bit for bit**;
* attention (``layers.FUSED_ATTENTION``): the causal mask of the score blocks as a Numba
  loop (the same -inf entries: the output compared **bit for bit**) and the backward's
  [do', -D'] in one pass (D' summed in float64: the gradients compared **within rounding**,
  and by central finite differences in float64);
* the dReLU / ReGLU element-wise lines as one Numba pass each way (``layers.FUSED_RELU_GLU``):
  compared **bit for bit**, special values included;
* RMSNorm forward and backward as one Numba pass each (``layers.FUSED_NORM``): its row sums
  run in another order than NumPy's einsum, so it is compared **within rounding** (a few
  units in the last place), and its gradient by central finite differences in float64.

Each fast path is forced with its size floor at 0 and counted, so a test cannot pass by
silently taking the NumPy lines. Device (CuPy) arrays never take a fast path: a fake-CuPy
model, which runs the NumPy lines, must equal a host model with the fast paths off.
"""
import importlib
import sys

import numpy as np
import pytest

import minisparse as ms
from minisparse import _fused
from minisparse import layers as L

from test_gradients import check, naive_attention

T = importlib.import_module("minisparse.train")      # the module (minisparse.train is also a function)

try:
    import numba  # noqa: F401
except ImportError:
    numba = None
needs_numba = pytest.mark.skipif(numba is None, reason="numba is not installed (pip install 'minisparse[numba]')")
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def _switches_restored(monkeypatch):
    """Tests here flip the module switches; monkeypatch puts them back afterwards."""
    for mod, name in ((L, "FUSED_NORM"), (L, "FUSED_ATTENTION"), (L, "FUSED_RELU_GLU"), (T, "FUSED_ADAMW")):
        monkeypatch.setattr(mod, name, getattr(mod, name))


def _norm_tol(dtype, n_terms, scale):
    """A few roundings per term of a reordered sum of n_terms, at the size of the largest value."""
    return 16 * np.finfo(dtype).eps * max(1, n_terms) * scale


def _bits(x):
    x = np.ascontiguousarray(x)
    return x.view(np.uint32 if x.dtype == np.float32 else np.uint64)


def _same_bits(got, want, name):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    bad = np.flatnonzero(_bits(got).ravel() != _bits(want).ravel())
    assert not bad.size, (f"{name}: {bad.size} of {want.size} elements differ; first at {bad[:5].tolist()}: "
                          f"fast {got.ravel()[bad[:5]].tolist()} vs NumPy {want.ravel()[bad[:5]].tolist()}")


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))


# ======================================================================================
# AdamW
# ======================================================================================
def _adamw_run(dtype, fused, workers, weight_decay, steps=3, seed=0):
    T.FUSED_ADAMW = fused
    rng = np.random.default_rng(seed)
    shapes = {"emb": (37, 7), "norm": (7,), "w": (33, 7), "bias": (1,), "big": (300, 5)}
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    opt = T.AdamW(params, 3e-3, (0.9, 0.95), 1e-8, weight_decay)
    for i in range(steps):
        grads = {k: (rng.standard_normal(s) * 10.0 ** (i - 1)).astype(dtype) for k, s in shapes.items()}
        grads["w"][0, :3] = [0.0, -0.0, 1e-30]       # a zero moment, a tiny one: eps decides
        opt.step(params, grads, 3e-3 * (i + 1) / steps, workers)
    return params, opt


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_adamw_fused_equals_numpy_lines_bit_for_bit(monkeypatch, dtype, workers, weight_decay):
    monkeypatch.setattr(T, "FUSED_ADAMW_MIN_SIZE", 0)
    monkeypatch.setattr(T, "_PARALLEL_MIN", 0)               # the threaded runs too
    calls = []
    _spy(monkeypatch, _fused, "adamw_update", calls)
    p_fast, o_fast = _adamw_run(dtype, True, workers, weight_decay)
    assert len(calls) == 3 * 5, "the fused update did not run for every parameter and step"
    p_ref, o_ref = _adamw_run(dtype, False, workers, weight_decay)
    assert len(calls) == 3 * 5, "FUSED_ADAMW = False still took the fused update"
    for k in p_ref:
        _same_bits(p_fast[k], p_ref[k], k)
        _same_bits(o_fast.exp_avg[k], o_ref.exp_avg[k], "exp_avg " + k)
        _same_bits(o_fast.exp_avg_sq[k], o_ref.exp_avg_sq[k], "exp_avg_sq " + k)


@needs_numba
def test_adamw_bit_comparison_can_fail(monkeypatch):
    """The comparison above resolves one rounding: a learning rate one ulp off (float64)
    changes bits of the fused result."""
    monkeypatch.setattr(T, "FUSED_ADAMW_MIN_SIZE", 0)
    p1, _ = _adamw_run(np.float64, True, 1, 0.1, steps=1)
    rng = np.random.default_rng(0)
    shapes = {"emb": (37, 7), "norm": (7,), "w": (33, 7), "bias": (1,), "big": (300, 5)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    opt = T.AdamW(params, 3e-3, (0.9, 0.95), 1e-8, 0.1)
    grads = {k: rng.standard_normal(s) * 0.1 for k, s in shapes.items()}
    grads["w"][0, :3] = [0.0, -0.0, 1e-30]
    opt.step(params, {k: g.copy() for k, g in grads.items()}, np.nextafter(3e-3, 1.0))
    assert any(not np.array_equal(p1[k], params[k]) for k in p1)
    rng = np.random.default_rng(0)
    params2 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    T.AdamW(params2, 3e-3, (0.9, 0.95), 1e-8, 0.1).step(params2, grads, 3e-3)
    for k in p1:                                 # and the same lr gives the same bits
        _same_bits(params2[k], p1[k], k)


def test_adamw_fused_not_taken_for_small_or_foreign_arrays(monkeypatch):
    calls = []
    _spy(monkeypatch, _fused, "adamw_update", calls)
    T.FUSED_ADAMW = True
    _adamw_run(np.float32, True, 1, 0.1, steps=1)            # 2,000 elements < FUSED_ADAMW_MIN_SIZE
    assert not calls
    monkeypatch.setattr(T, "FUSED_ADAMW_MIN_SIZE", 0)
    p = {"w": np.ones((4, 4), np.float16)}                   # float16: the NumPy lines
    T.AdamW(p, 0.1).step(p, {"w": np.ones((4, 4), np.float16)})
    p = {"w": np.ones((4, 4), np.float32)}                   # a gradient of another dtype
    T.AdamW(p, 0.1).step(p, {"w": np.ones((4, 4), np.float64)})
    assert not calls


# ======================================================================================
# attention: the causal mask
# ======================================================================================
def _attention(dtype, B, K, rep, Tq, Dh, q_start, block, seed=0):
    rng = np.random.default_rng(seed)
    H, S = K * rep, q_start + Tq
    q = rng.standard_normal((B, Tq, H, Dh)).astype(dtype).transpose(0, 2, 1, 3)   # the layouts of training
    k = rng.standard_normal((B, K, S, Dh)).astype(dtype)
    v = rng.standard_normal((B, S, K, Dh)).astype(dtype).transpose(0, 2, 1, 3)
    R = rng.standard_normal((B, Tq, H, Dh)).astype(dtype).transpose(0, 2, 1, 3)
    return q, k, v, R


def _core(q, k, v, R, q_start, block):
    out, cache = L.attention_core_forward(q, k, v, q_start, block=block)
    return (out,) + L.attention_core_backward(R, cache)


ATT_SHAPES = [(1, 1, 1, 1, 4, 0, 64), (2, 3, 1, 7, 5, 0, 3), (1, 1, 3, 33, 8, 0, 8), (2, 2, 2, 33, 4, 5, 64),
              (1, 3, 1, 7, 2, 9, 2), (3, 1, 1, 70, 16, 0, 64)]


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, K, rep, Tq, Dh, q_start, block", ATT_SHAPES)
def test_attention_fast_paths_equal_numpy_lines(monkeypatch, dtype, B, K, rep, Tq, Dh, q_start, block):
    """The forward (the mask) bit for bit; the gradients to rounding (D' = do' . out is summed
    in float64 by the fast path, by einsum in the dtype by the NumPy line; ds = e (do' v - D')
    cancels, so the bound is relative to the largest gradient, not to each element)."""
    monkeypatch.setattr(L, "FUSED_ATTENTION_MIN_SIZE", 0)
    calls = []
    _spy(monkeypatch, _fused, "mask_after", calls)
    _spy(monkeypatch, _fused, "attention_do1", calls)
    args = _attention(dtype, B, K, rep, Tq, Dh, q_start, block)
    monkeypatch.setattr(L, "FUSED_ATTENTION", True)
    fast = _core(*args, q_start, block)
    n_blocks = -(-Tq // block)
    assert calls == ["mask_after"] * n_blocks + ["attention_do1"], calls
    monkeypatch.setattr(L, "FUSED_ATTENTION", False)
    ref = _core(*args, q_start, block)
    assert len(calls) == n_blocks + 1
    _same_bits(fast[0], ref[0], "out")
    for got, want, name in zip(fast[1:], ref[1:], ["dq", "dk", "dv"]):
        np.testing.assert_allclose(got, want, rtol=0, atol=64 * np.finfo(dtype).eps * np.abs(want).max(),
                                   err_msg=name)
    if dtype == np.float64:
        np.testing.assert_allclose(fast[0], naive_attention(args[0] * 1.0, args[1], args[2], q_start),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, K, rep, Tq, Dh, q_start, block", ATT_SHAPES)
def test_attention_host_layouts_same_bits(monkeypatch, dtype, B, K, rep, Tq, Dh, q_start, block):
    """The host layout changes under FUSED_ATTENTION that need no Numba (keys and v copied to
    C order, e @ v and ds @ k written straight into out and dq when rep == 1) give the NumPy
    lines' bits: compared with the Numba loops kept off (size floor out of reach)."""
    monkeypatch.setattr(L, "FUSED_ATTENTION_MIN_SIZE", 1 << 60)
    args = _attention(dtype, B, K, rep, Tq, Dh, q_start, block)
    monkeypatch.setattr(L, "FUSED_ATTENTION", True)
    fast = _core(*args, q_start, block)
    monkeypatch.setattr(L, "FUSED_ATTENTION", False)
    ref = _core(*args, q_start, block)
    for got, want, name in zip(fast, ref, ["out", "dq", "dk", "dv"]):
        _same_bits(got, want, name)


@needs_numba
@pytest.mark.parametrize("B, K, rep, Tq, Dh, q_start, block", [(1, 1, 3, 7, 3, 0, 3), (2, 3, 1, 33, 2, 4, 8)])
def test_attention_fast_paths_gradients_by_finite_differences(monkeypatch, B, K, rep, Tq, Dh, q_start, block):
    monkeypatch.setattr(L, "FUSED_ATTENTION_MIN_SIZE", 0)
    monkeypatch.setattr(L, "FUSED_ATTENTION", True)
    rng = np.random.default_rng(3)
    q, k, v, R = (np.ascontiguousarray(a) for a in _attention(np.float64, B, K, rep, Tq, Dh, q_start, block))

    def f():
        return float(np.sum(L.attention_core_forward(q, k, v, q_start, block=block)[0] * R))

    _, dq, dk, dv = _core(q, k, v, R, q_start, block)
    for name, x, g in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
        check(f, x, g, rng, f"attention core {name} (fast paths)")


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
def test_do1_kernel_against_numpy_lines(dtype):
    """[do', -D']: do' = dout / l bit for bit, D' to rounding; any strides (training's views)."""
    rng = np.random.default_rng(4)
    B, H, Tq, Dh = 2, 3, 33, 7
    dout = rng.standard_normal((B, Tq, H, Dh)).astype(dtype).transpose(0, 2, 1, 3)
    out = rng.standard_normal((B, H, Tq, Dh)).astype(dtype)                  # another layout
    l = (rng.random((B, H, Tq, 1)) + 0.5).astype(dtype)
    got = np.full((B, H, Tq, Dh + 1), np.nan, dtype)
    _fused.attention_do1(dout, l, out, got)
    do = dout / l
    _same_bits(got[..., :Dh], do, "do'")
    d = -np.einsum("...d,...d->...", do.astype(np.float64), out.astype(np.float64))
    np.testing.assert_allclose(got[..., Dh], d, rtol=0, atol=4 * np.finfo(dtype).eps * np.abs(d).max())


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, heads", [((1, 2), 1), ((7, 6), 3), ((33, 24), 4), ((5, 64), 8)])
def test_pairs_kernel_equals_numpy_reorder(monkeypatch, dtype, shape, heads):
    monkeypatch.setattr(L, "FUSED_ATTENTION_MIN_SIZE", 0)
    w = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    calls = []
    _spy(monkeypatch, _fused, "pairs", calls)
    monkeypatch.setattr(L, "FUSED_ATTENTION", True)
    fast = L._to_pairs(w, heads)
    assert calls == ["pairs"]
    monkeypatch.setattr(L, "FUSED_ATTENTION", False)
    _same_bits(fast, L._to_pairs(w, heads), "pairs")
    _same_bits(L._from_pairs(fast, heads), w, "round trip")
    _same_bits(_fused.pairs(fast, heads, inverse=True), w, "kernel's inverse")
    b = np.arange(shape[1], dtype=dtype)                      # 1-D (a bias): the NumPy line
    _same_bits(L._to_pairs(b, heads), L._to_pairs(b[None], heads)[0], "bias")


@needs_numba
def test_mask_kernel_masks_exactly_the_hidden_keys():
    """Row r of a block holds query r % tb at position first + r % tb; keys after it: -inf."""
    s = np.zeros((2, 1, 6, 9), np.float32)                  # rep 2 x tb 3 rows, 9 keys
    _fused.mask_after(s, 3, 5)
    want = np.where(np.arange(9)[None, :] > 5 + np.arange(6)[:, None] % 3, -np.inf, 0).astype(np.float32)
    np.testing.assert_array_equal(s[0, 0], want)
    np.testing.assert_array_equal(s[1, 0], want)
    assert np.isneginf(s).sum() == 2 * 2 * (3 + 2 + 1)          # 2 matrices x 2 query groups


# ======================================================================================
# RMSNorm
# ======================================================================================
NORM_SHAPES = [(1, 1, 1), (1, 7, 5), (3, 33, 8), (2, 7, 33), (1, 1, 256), (4, 9, 17)]


def _norm(dtype, shape, offset, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    x[0, 0, 0] = 0.0
    w = (rng.standard_normal(shape[-1]) * 0.3 + (0 if offset else 1)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, cache = L.rms_norm_forward(x, w, 1e-5, offset)
    dx, dw = L.rms_norm_backward(dy, cache)
    return y, cache[0], cache[1], dx, dw


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_fused_equals_numpy_lines_to_rounding(monkeypatch, dtype, shape, offset):
    monkeypatch.setattr(L, "FUSED_NORM_MIN_SIZE", 0)
    calls = []
    _spy(monkeypatch, _fused, "rms_norm_forward", calls)
    _spy(monkeypatch, _fused, "rms_norm_backward", calls)
    monkeypatch.setattr(L, "FUSED_NORM", True)
    fast = _norm(dtype, shape, offset)
    assert calls == ["rms_norm_forward", "rms_norm_backward"], calls
    monkeypatch.setattr(L, "FUSED_NORM", False)
    ref = _norm(dtype, shape, offset)
    assert len(calls) == 2
    for got, want, name in zip(fast, ref, ["y", "xhat", "rstd", "dx", "dw"]):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        n_terms = shape[-1] if name != "dw" else shape[0] * shape[1]     # sums over D (rows), N (dw)
        np.testing.assert_allclose(got, want, rtol=0, atol=_norm_tol(dtype, n_terms, np.abs(want).max()),
                                   err_msg=name)


@needs_numba
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 7, 5), (1, 33, 9)])
@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_fused_gradients_by_finite_differences(monkeypatch, shape, offset):
    monkeypatch.setattr(L, "FUSED_NORM_MIN_SIZE", 0)
    monkeypatch.setattr(L, "FUSED_NORM", True)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    w = rng.standard_normal(shape[-1]) * 0.3 + (0 if offset else 1)
    R = rng.standard_normal(shape)

    def f():
        return float(np.sum(L.rms_norm_forward(x, w, 1e-5, offset)[0] * R))

    calls = []
    _spy(monkeypatch, _fused, "rms_norm_backward", calls)
    dx, dw = L.rms_norm_backward(R, L.rms_norm_forward(x, w, 1e-5, offset)[1])
    assert calls
    check(f, x, dx, rng, "rms_norm dx (fused)")
    check(f, w, dw, rng, "rms_norm dw (fused)")


@needs_numba
def test_rms_norm_comparison_can_fail(monkeypatch):
    """The rounding bound above is tight enough to see a wrong epsilon (1e-5 vs 1.1e-5)."""
    monkeypatch.setattr(L, "FUSED_NORM_MIN_SIZE", 0)
    x = (np.random.default_rng(0).standard_normal((4, 8)) * 0.01).astype(np.float32)
    w = np.ones(8, np.float32)
    ref = L.rms_norm_forward(x, w, 1e-5)[0]
    monkeypatch.setattr(L, "FUSED_NORM", True)
    bad = L.rms_norm_forward(x, w, 1.1e-5)[0]
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(bad, ref, rtol=0, atol=_norm_tol(np.float32, 8, np.abs(ref).max()))
    good = L.rms_norm_forward(x, w, 1e-5)[0]
    np.testing.assert_allclose(good, ref, rtol=0, atol=_norm_tol(np.float32, 8, np.abs(ref).max()))


# ======================================================================================
# ReLU-gated FFNs (dReLU, ReGLU)
# ======================================================================================
@needs_numba
@pytest.mark.parametrize("up_relu", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (7, 33), (33, 1000)])
def test_relu_glu_kernels_equal_numpy_lines_bit_for_bit_special_values(up_relu, dtype, shape):
    rng = np.random.default_rng(2)
    g, u, dh = (rng.standard_normal(shape).astype(dtype) * 3 for _ in range(3))
    if g.size >= 8:                                  # -0, 0, NaN (both signs), infinities at the kinks
        g.reshape(-1)[:8] = [-0.0, 0.0, np.nan, -np.inf, np.inf, -1.0, 2.0, -np.nan]
        u.reshape(-1)[:8] = [1.0, -0.0, 3.0, 0.0, -np.inf, np.nan, -0.0, 1.0]
    with np.errstate(invalid="ignore"):
        a, b = np.maximum(g, 0), (np.maximum(u, 0) if up_relu else u)     # ffn_forward's NumPy lines
        _same_bits(_fused.relu_glu_forward(g, u, up_relu), a * b, "h")
        dg = dh * b                                                        # ffn_backward's NumPy lines
        dg *= g > 0
        du = dh * a
        if up_relu:
            du *= u > 0
        dh2 = dh.copy()
        _same_bits(_fused.relu_glu_backward(dh2, g, u, up_relu), dg, "dg")
    _same_bits(dh2, du, "du")


def _ffn_run(act_name, dtype, N, D, F, seed=0, special=True, hook=None):
    from minisparse.activations import get_activation
    act = get_activation(act_name)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(dtype)
    wg, wu, wd = (rng.standard_normal((F, D)).astype(dtype) for _ in range(3))
    dy = rng.standard_normal((N, D)).astype(dtype)
    if special and N * F >= 2:                       # pre-activations exactly 0 (the kinks)
        wg[0] = 0.0
        wu[1 % F] = 0.0
    y, cache = L.ffn_forward(x, wg, wu, wd, act, hook=hook)
    grads = L.ffn_backward(dy, cache, wg, wu, wd, act)
    return (y, cache.h) + tuple(grads)


@needs_numba
@pytest.mark.parametrize("act_name", ["drelu", "reglu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, D, F", [(1, 1, 7), (7, 5, 33), (33, 8, 1), (33, 3, 1000)])
def test_relu_glu_fused_equals_numpy_lines_bit_for_bit(monkeypatch, act_name, dtype, N, D, F):
    monkeypatch.setattr(L, "FUSED_SWIGLU_MIN_SIZE", 0)
    calls = []
    _spy(monkeypatch, _fused, "relu_glu_forward", calls)
    _spy(monkeypatch, _fused, "relu_glu_backward", calls)
    monkeypatch.setattr(L, "FUSED_RELU_GLU", True)
    fast = _ffn_run(act_name, dtype, N, D, F)
    assert calls == ["relu_glu_forward", "relu_glu_backward"], calls
    monkeypatch.setattr(L, "FUSED_RELU_GLU", False)
    ref = _ffn_run(act_name, dtype, N, D, F)
    assert len(calls) == 2
    for got, want, name in zip(fast, ref, ["y", "h", "dx", "dw_gate", "dw_up", "dw_down"]):
        _same_bits(got, want, name)


@needs_numba
def test_relu_glu_forward_fused_backward_numpy_and_a_hook(monkeypatch):
    """A forward on the fused pass keeps no relu(g), relu(u); a backward on the NumPy lines
    (switch turned off in between) recomputes them: the same bits. A hook's h is used."""
    monkeypatch.setattr(L, "FUSED_SWIGLU_MIN_SIZE", 0)
    from minisparse.activations import get_activation
    act = get_activation("drelu")
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    wg, wu, wd = (rng.standard_normal((33, 5)) for _ in range(3))
    out = {}
    for fwd, bwd in ((True, False), (False, False)):
        monkeypatch.setattr(L, "FUSED_RELU_GLU", fwd)
        y, cache = L.ffn_forward(x, wg, wu, wd, act, hook=lambda h: h * 2)
        monkeypatch.setattr(L, "FUSED_RELU_GLU", bwd)
        out[fwd] = (y,) + L.ffn_backward(dy, cache, wg, wu, wd, act)
    for got, want in zip(out[True], out[False]):
        _same_bits(got, want, "ffn")


@needs_numba
@pytest.mark.parametrize("act_name", ["drelu", "reglu"])
def test_relu_glu_fused_gradients_by_finite_differences(monkeypatch, act_name):
    from minisparse.activations import get_activation
    monkeypatch.setattr(L, "FUSED_SWIGLU_MIN_SIZE", 0)
    monkeypatch.setattr(L, "FUSED_RELU_GLU", True)
    act = get_activation(act_name)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 5))
    wg, wu, wd = (rng.standard_normal((33, 5)) for _ in range(3))
    R = rng.standard_normal((7, 5))
    g, u = x @ wg.T, x @ wu.T
    assert np.min(np.abs(g)) > 1e-4 and (act_name == "reglu" or np.min(np.abs(u)) > 1e-4)  # off the kinks

    def f():
        return float(np.sum(L.ffn_forward(x, wg, wu, wd, act)[0] * R))

    calls = []
    _spy(monkeypatch, _fused, "relu_glu_backward", calls)
    dx, dwg, dwu, dwd = L.ffn_backward(R, L.ffn_forward(x, wg, wu, wd, act)[1], wg, wu, wd, act)
    assert calls
    for name, p, gr in (("x", x, dx), ("w_gate", wg, dwg), ("w_up", wu, dwu), ("w_down", wd, dwd)):
        check(f, p, gr, rng, f"{act_name} d{name} (fused)")


def test_relu_glu_fused_not_taken_for_shifted_or_other_gates(monkeypatch):
    monkeypatch.setattr(L, "FUSED_SWIGLU_MIN_SIZE", 0)
    calls = []
    _spy(monkeypatch, _fused, "relu_glu_forward", calls)
    for name in ("drelu:0.05", "geglu", "relu2glu"):           # shifted ReLUs, other gates: NumPy lines
        _ffn_run(name, np.float32, 7, 5, 33, special=False)
    assert not calls


# ======================================================================================
# the whole model; devices; no Numba
# ======================================================================================
def _floors(monkeypatch, value):
    for mod, name in ((L, "FUSED_NORM_MIN_SIZE"), (L, "FUSED_ATTENTION_MIN_SIZE"), (L, "FUSED_SWIGLU_MIN_SIZE"),
                      (T, "FUSED_ADAMW_MIN_SIZE")):
        monkeypatch.setattr(mod, name, value)


def _switch(monkeypatch, on):
    for mod, name in ((L, "FUSED_NORM"), (L, "FUSED_ATTENTION"), (L, "FUSED_RELU_GLU"), (T, "FUSED_ADAMW")):
        monkeypatch.setattr(mod, name, on)


CFG = dict(vocab_size=37, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=33, max_seq_len=32)


@needs_numba
@pytest.mark.parametrize("act", ["swiglu", "drelu"])
def test_model_loss_and_grads_fast_paths_close_to_numpy_lines(monkeypatch, act):
    _floors(monkeypatch, 0)
    model = ms.Transformer(ms.ModelConfig(activation=act, **CFG), seed=0, dtype=np.float64)
    toks = np.random.default_rng(1).integers(0, 37, size=(3, 17))
    _switch(monkeypatch, True)
    calls = []
    _spy(monkeypatch, _fused, "rms_norm_forward", calls)
    _spy(monkeypatch, _fused, "mask_after", calls)
    _spy(monkeypatch, _fused, "relu_glu_backward", calls)
    loss_f, g_f = model.loss_and_grads(toks)
    assert {"rms_norm_forward", "mask_after"} <= set(calls)
    assert ("relu_glu_backward" in calls) == (act == "drelu")
    _switch(monkeypatch, False)
    loss_r, g_r = model.loss_and_grads(toks)
    assert abs(loss_f - loss_r) <= 1e-13 * abs(loss_r)
    for k in g_r:
        np.testing.assert_allclose(g_f[k], g_r[k], rtol=1e-10, atol=1e-13 * np.abs(g_r[k]).max(), err_msg=k)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["swiglu", "drelu"])
def test_fake_device_takes_no_fast_path(monkeypatch, dtype, act):
    """CuPy arrays (here the fake CuPy of tests/fake_cupy.py) run the NumPy lines even with
    the floors at 0: the device model equals the host model with the fast paths off, bit
    for bit, and no kernel is called for it."""
    from fake_cupy import install
    from minisparse import xp as X
    install(monkeypatch)
    _floors(monkeypatch, 0)
    monkeypatch.setattr(L, "FUSED_SWIGLU", False)
    cfg = ms.ModelConfig(activation=act, **CFG)
    host = ms.Transformer(cfg, seed=0, dtype=dtype)
    dev = ms.Transformer(cfg, seed=0, dtype=dtype).to("cupy")
    toks = np.random.default_rng(1).integers(0, 37, size=(2, 9))
    _switch(monkeypatch, False)
    loss_h, g_h = host.loss_and_grads(toks)
    _switch(monkeypatch, True)
    calls = []
    for name in ("rms_norm_forward", "rms_norm_backward", "mask_after", "adamw_update", "relu_glu_forward",
                 "relu_glu_backward", "swiglu_rest", "swiglu_backward", "attention_do1", "pairs"):
        _spy(monkeypatch, _fused, name, calls)
    loss_d, g_d = dev.loss_and_grads(toks)
    assert loss_h == loss_d
    for k in g_h:
        _same_bits(X.to_numpy(g_d[k]), g_h[k], k)
    T.clip_grads(g_d, 1e-3)
    opt = T.AdamW(dev.params, 1e-3)
    opt.step(dev.params, g_d, 1e-3)
    assert not calls, calls


def test_without_numba_the_numpy_lines_run(monkeypatch):
    """No Numba: more_kernels() is None and the layers and AdamW take the NumPy lines (no
    error, the same bits as with the switches off); the kernels asked directly name the
    install command."""
    monkeypatch.setitem(sys.modules, "numba", None)            # import numba -> ImportError
    monkeypatch.setattr(_fused, "_KERNELS", None)
    _floors(monkeypatch, 0)
    assert _fused.more_kernels() is None
    model = ms.Transformer(ms.ModelConfig(activation="drelu", **CFG), seed=0, dtype=np.float32)
    toks = np.random.default_rng(1).integers(0, 37, size=(2, 9))
    _switch(monkeypatch, True)
    loss_a, g_a = model.loss_and_grads(toks)
    p_a, _ = _adamw_run(np.float32, True, 1, 0.1)
    _switch(monkeypatch, False)
    loss_b, g_b = model.loss_and_grads(toks)
    p_b, _ = _adamw_run(np.float32, False, 1, 0.1)
    assert loss_a == loss_b
    for k in g_a:
        _same_bits(g_a[k], g_b[k], k)
    for k in p_a:
        _same_bits(p_a[k], p_b[k], k)
    with pytest.raises(ImportError, match=r"pip install 'minisparse\[numba\]'"):
        _fused.rms_norm_forward(np.ones((2, 3)), np.ones(3), 1e-5)
