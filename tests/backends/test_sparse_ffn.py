"""Every backend of sparse_ffn equals a dense float64 FFN (hypothesis over shapes and sparsity)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import minisparse as ms
from minisparse.kernels.testing import make_ffn

from backend_helpers import ACTIVATIONS, EXACT, backend_params, check, require, to_numpy, truth

DIMS = st.one_of(st.sampled_from([1, 2, 7, 31, 33, 64, 100]), st.integers(1, 80))
FFNS = st.one_of(st.sampled_from([1, 3, 32, 33, 97]), st.integers(1, 140))
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(params=backend_params(), scope="module")
def backend(request):
    require(request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@SETTINGS
@given(D=DIMS, F=FFNS, T=st.integers(1, 8), sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       one_d=st.booleans())
def test_gate_derived_skipping_equals_dense(backend, act, dtype, D, F, T, sparsity, seed, one_d):
    p = make_ffn(D, F, tokens=T, sparsity=sparsity, activation=act, dtype=dtype, seed=seed)
    x = p["x"][0] if (one_d and T == 1) else p["x"]
    stats = {}
    y = ms.sparse_ffn(x, p["w_gate"], p["w_up"], p["w_down"], act, backend=backend, stats=stats)
    assert y.shape == x.shape and y.dtype == x.dtype
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], act, dtype, what=f"{backend} {act} {stats}")
    assert stats["backend"] == backend and stats["ffn_dim"] == F and stats["path"] in ("sparse", "dense")
    if act in EXACT and stats["path"] == "sparse":
        # the construction makes the union of gate-active neurons exactly p["active"]
        assert stats["n_active"] == p["active"].size, stats
        assert stats["fraction"] == pytest.approx(p["active"].size / F)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@SETTINGS
@given(D=DIMS, F=FFNS, T=st.integers(1, 8), sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       chosen=st.floats(0.0, 1.0), as_mask=st.booleans())
def test_given_active_set_equals_masked_dense(backend, act, dtype, D, F, T, sparsity, seed, chosen, as_mask):
    p = make_ffn(D, F, tokens=T, sparsity=sparsity, activation=act, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    sel = rng.random(F) < chosen                                      # any subset, right or wrong
    active = sel if as_mask else np.flatnonzero(sel)[::-1]            # order must not matter
    stats = {}
    y = ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], act, backend=backend,
                      active=active, stats=stats)
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], act, dtype, active=np.flatnonzero(sel),
          what=f"{backend} {act} active {stats}")
    assert stats["predicted"] is True and stats["path"] == "sparse"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ["swiglu", "geglu", "drelu", "relu"])
@SETTINGS
@given(D=DIMS, F=FFNS, T=st.integers(1, 8), seed=st.integers(0, 2**16), q=st.floats(0.0, 1.0))
def test_threshold_skipping_equals_thresholded_dense(backend, act, dtype, D, F, T, seed, q):
    """CATS-style threshold on |a(g)|: per token, neurons with |a(g)| <= threshold count as 0."""
    p = make_ffn(D, F, tokens=T, sparsity=0.5, activation=act, dtype=dtype, seed=seed)
    g = p["x"].astype(np.float64) @ p["w_gate"].astype(np.float64).T
    a = np.unique(np.abs(ms.get_activation(act).gate_fn(g)))           # sorted distinct |a|
    a = np.append(a, 2 * a[-1] + 1.0)                                 # a threshold above all is fine too
    gaps = np.flatnonzero(np.diff(a) > 1e-3 * np.maximum(a[1:], 1e-3))  # no |a| within rounding of it
    assume(gaps.size > 0)
    i = gaps[int(q * (gaps.size - 1))]
    thr = float(0.5 * (a[i] + a[i + 1]))
    y = ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], act, backend=backend, threshold=thr)
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], act, dtype, threshold=thr,
          what=f"{backend} {act} threshold {thr}")


@pytest.mark.parametrize("act", ["drelu", "relu"])
def test_backends_agree_with_reference_exactly_at_full_and_zero_sparsity(backend, act):
    for sparsity in (0.0, 1.0):
        p = make_ffn(37, 65, tokens=3, sparsity=sparsity, activation=act, dtype=np.float64, seed=3)
        ref = ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], act, backend="numpy")
        y = ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], act, backend=backend)
        np.testing.assert_allclose(to_numpy(y), ref, rtol=1e-12, atol=1e-12)
        if sparsity == 1.0:
            assert not np.any(to_numpy(y))                            # every neuron off: exactly 0


def test_nan_in_gate_propagates(backend):
    """NaN is never taken as 'inactive' (it would hide a bug upstream)."""
    p = make_ffn(8, 16, tokens=1, sparsity=0.9, activation="reglu", dtype=np.float64, seed=0)
    x = p["x"].copy()
    x[0, 3] = np.nan
    y = ms.sparse_ffn(x, p["w_gate"], p["w_up"], p["w_down"], "reglu", backend=backend)
    assert np.isnan(to_numpy(y)).any()


def test_numba_switches_to_dense_for_large_unions():
    require("numba")
    p = make_ffn(40, 64, tokens=32, sparsity=0.0, activation="drelu", dtype=np.float32, seed=1)
    st_ = {}
    y = ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", backend="numba", stats=st_)
    assert st_["path"] == "dense" and st_["n_active"] == 64
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32)
    p = make_ffn(40, 64, tokens=1, sparsity=0.9, activation="drelu", dtype=np.float32, seed=1)
    ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", backend="numba", stats=st_)
    assert st_["path"] == "sparse"


# ------------------------------------------------------------------------------------
# input validation (checked once, in front of every backend)
# ------------------------------------------------------------------------------------
def _p():
    return make_ffn(8, 12, tokens=2, sparsity=0.5, activation="drelu", dtype=np.float32, seed=0)


@pytest.mark.parametrize("case, exc, words", [
    ("x_dim", ValueError, "must have shape (ffn_dim, dim)"),
    ("transposed", ValueError, "transposed"),
    ("int_x", TypeError, "float"),
    ("mixed", TypeError, "mix dtypes"),
    ("x_dtype", TypeError, "cast x"),
    ("no_up", ValueError, "is gated"),
    ("plain_up", ValueError, "takes no w_up"),
    ("active_range", ValueError, "[0, ffn_dim=12)"),
    ("mask_len", ValueError, "expected ffn_dim=12"),
    ("active_float", TypeError, "integer indices or a boolean mask"),
    ("threshold", ValueError, "threshold must be >= 0"),
    ("x_3d", ValueError, "flatten"),
    ("bad_act", KeyError, "unknown activation"),
    ("f16_numba", TypeError, "supports weights of dtype"),
])
def test_bad_inputs_raise_clear_errors(case, exc, words):
    p = _p()
    x, wg, wu, wd = p["x"], p["w_gate"], p["w_up"], p["w_down"]
    kw, act, backend = {}, "drelu", "numpy"
    if case == "x_dim":
        x = np.ones((2, 9), np.float32)
    elif case == "transposed":
        wd = np.ascontiguousarray(wd.T)
    elif case == "int_x":
        x = np.ones((2, 8), dtype=np.int64)
    elif case == "mixed":
        wu = wu.astype(np.float64)
    elif case == "x_dtype":
        x = x.astype(np.float64)
    elif case == "no_up":
        wu = None
    elif case == "plain_up":
        act = "relu"
    elif case == "active_range":
        kw["active"] = np.array([0, 12])
    elif case == "mask_len":
        kw["active"] = np.ones(11, dtype=bool)
    elif case == "active_float":
        kw["active"] = np.array([0.0, 1.0])
    elif case == "threshold":
        kw["threshold"] = -1.0
    elif case == "x_3d":
        x = np.ones((1, 2, 8), np.float32)
    elif case == "bad_act":
        act = "nope"
    elif case == "f16_numba":
        require("numba")
        backend = "numba"
        x, wg, wu, wd = x, wg.astype(np.float16), wu.astype(np.float16), wd.astype(np.float16)
    with pytest.raises(exc) as e:
        ms.sparse_ffn(x, wg, wu, wd, act, backend=backend, **kw)
    assert words in str(e.value), str(e.value)


def test_float16_reference_computes_in_float32():
    p = make_ffn(16, 24, tokens=2, sparsity=0.5, activation="drelu", dtype=np.float16, seed=0)
    y = ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu")
    assert y.dtype == np.float32
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32)


def test_make_ffn_sparsity_is_exact():
    for D, F, T, s in [(1, 10, 3, 0.3), (7, 33, 8, 0.9), (64, 200, 1, 0.99), (5, 5, 2, 0.0)]:
        p = make_ffn(D, F, tokens=T, sparsity=s, activation="reglu", dtype=np.float64, seed=D)
        g = p["x"] @ p["w_gate"].T
        assert np.array_equal(np.flatnonzero((g > 0).any(axis=0)), p["active"])
        assert p["active"].size == round((1 - s) * F)
        y, _ = truth(p["x"], p["w_gate"], p["w_up"], p["w_down"], "reglu")
        assert y.shape == (T, D)


@pytest.mark.parametrize("act", ["drelu", "relu", "swiglu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_numba_threaded_passes_equal_dense(monkeypatch, act, dtype):
    """Small problems run serially; force the threaded passes (partials per task) here."""
    require("numba")
    import numba
    from minisparse.kernels import numba_
    monkeypatch.setattr(numba_, "_PARALLEL_FROM", 0)
    n = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)       # minisparse.runtime may have chosen fewer
    try:
        _threaded_cases(act, dtype)
    finally:
        numba.set_num_threads(n)


def _threaded_cases(act, dtype):
    for D, F, T, s in [(1, 1, 1, 0.0), (7, 33, 3, 0.5), (33, 257, 1, 0.9), (64, 100, 8, 0.2), (130, 97, 5, 1.0)]:
        p = make_ffn(D, F, tokens=T, sparsity=s, activation=act, dtype=dtype, seed=D)
        for kw in ({}, {"active": p["active"]}, {"threshold": 0.05}):
            st_ = {}
            y = ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], act, backend="numba", stats=st_, **kw)
            check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], act, dtype, what=f"threaded {kw} {st_}",
                  **{k: v for k, v in kw.items()})
            if st_["path"] == "sparse" and st_["n_active"] > 1:
                assert st_["threads"], st_


@pytest.mark.parametrize("name", ["numba", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_custom_activation_on_a_compiled_backend_raises(name):
    """One policy (minisparse.kernels.base.activation_codes): a compiled backend that does not
    know an activation's formula raises, naming backend='numpy'; it never falls back."""
    require(name)
    from minisparse.activations import register_activation
    act = register_activation("softplus_test_kernels", lambda v: np.logaddexp(0, v),
                              lambda v: 1 / (1 + np.exp(-v)), overwrite=True)
    p = make_ffn(9, 20, tokens=2, sparsity=0.5, activation="relu", dtype=np.float64, seed=0)
    st_ = {}
    with pytest.raises(ValueError, match="backend='numpy'"):
        ms.sparse_ffn(p["x"], p["w_gate"], None, p["w_down"], act, backend=name, stats=st_)
    assert "path" not in st_                                          # nothing ran
    y = ms.sparse_ffn(p["x"], p["w_gate"], None, p["w_down"], act, backend="numpy")
    check(y, p["x"], p["w_gate"], None, p["w_down"], act, np.float64)


def test_every_backend_module_fulfils_the_protocol():
    from minisparse.kernels import base
    from minisparse.kernels import get_backend
    for name in ms.backends():
        mod = get_backend(name)
        assert isinstance(mod, base.Backend), name
        assert mod.NAME == name and all(np.dtype(d).kind == "f" for d in mod.WEIGHT_DTYPES)


@pytest.mark.parametrize("act", ["fatrelu:0.25", "drelu:0.25"])
def test_fatrelu_keeps_a_gate_exactly_at_the_threshold(backend, act):
    """FATReLU keeps x >= t (Kurtz et al. 2020): a gate exactly at t survives in every backend."""
    x = np.array([[1.0, 0.0]])                                       # (1, 2): exact dot products
    w_gate = np.array([[0.25, 0.0], [0.125, 0.0], [0.5, 0.0]])        # gates t, below t, above t
    w_up = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]) if act.startswith("drelu") else None
    w_down = np.array([[1.0, 0.0], [10.0, 0.0], [100.0, 0.0]])
    ref = ms.sparse_ffn(x, w_gate, w_up, w_down, act, backend="numpy")
    got = to_numpy(ms.sparse_ffn(x, w_gate, w_up, w_down, act, backend=backend))
    np.testing.assert_array_equal(got, ref)
    want = 0.25 * 1.0 + 0.5 * 100.0                                  # up(x) = 1 for every neuron
    assert ref[0, 0] == want                                         # the neuron at t counted, the one below not
