"""The fused SwiGLU passes (minisparse._fused) against the NumPy lines they replace.

The kernels promise the NumPy expressions' results bit for bit (the same operations, the
same order, the same dtype; exp stays NumPy's), so the comparisons here are of the bits
(``view`` as unsigned integers: -0.0 and 0.0 differ, NaN payloads count), not within a
tolerance. That promise is what lets the fake-CuPy tests (tests/test_device.py), whose
device arrays always take the NumPy lines, compare a device run with a host run bit for
bit while the host run takes the fused pass.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import minisparse as ms
from minisparse import _fused
from minisparse import layers as L
from minisparse.activations import get_activation

try:
    import numba  # noqa: F401
except ImportError:
    numba = None
needs_numba = pytest.mark.skipif(numba is None, reason="numba is not installed (pip install 'minisparse[numba]')")

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 1), (1, 7), (7, 33), (33, 1), (33, 1000), (1000, 7)]
DTYPES = [np.float32, np.float64]


def _bits(x):
    x = np.ascontiguousarray(x)
    return x.view(np.uint32 if x.dtype == np.float32 else np.uint64)


def _assert_same_bits(got, want, name):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    bad = np.flatnonzero(_bits(got).ravel() != _bits(want).ravel())
    if bad.size:
        i = bad[:5]
        raise AssertionError(f"{name}: {bad.size} of {want.size} elements differ; first at {i.tolist()}: "
                             f"fused {got.ravel()[i].tolist()} vs NumPy {want.ravel()[i].tolist()}")


def _data(shape, dtype, seed=0, special=True):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(shape) * 4).astype(dtype)
    u = rng.standard_normal(shape).astype(dtype)
    dh = rng.standard_normal(shape).astype(dtype)
    if special and g.size >= 7:                      # the edges: exp(-g) overflows, 0, -0, inf, nan
        flat = g.reshape(-1)
        flat[:7] = [-100.0, 100.0, 0.0, -0.0, -np.inf, np.inf, np.nan]
    return g, u, dh


def _numpy_forward(g, b):                            # layers.ffn_forward's NumPy lines
    e = np.negative(g)
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    e += 1
    with np.errstate(invalid="ignore"):              # inf / inf at the special values
        a = g / e
    return e, a, a * b


def _numpy_backward(dh, b, a, e):                    # layers.ffn_backward's NumPy lines
    dg = dh * b
    d_gate = np.subtract(1, a, dtype=a.dtype)
    d_gate /= e
    d_gate += a
    dg *= d_gate
    du = np.multiply(dh, a, out=dh)
    return dg, du


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_numpy_bit_for_bit(shape, dtype):
    g, u, dh = _data(shape, dtype)
    e_ref, a_ref, h_ref = _numpy_forward(g, u)
    e = np.negative(g)
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    assert _fused.usable(g, u, e)
    a, h = _fused.swiglu_rest(g, u, e)
    for got, want, name in ((e, e_ref, "e"), (a, a_ref, "a"), (h, h_ref, "h")):
        _assert_same_bits(got, want, name)

    with np.errstate(invalid="ignore"):              # inf - inf at the special values, as in NumPy
        dg_ref, du_ref = _numpy_backward(dh.copy(), u, a_ref, e_ref)
    dh2 = dh.copy()
    dg = _fused.swiglu_backward(dh2, u, a, e)
    _assert_same_bits(dg, dg_ref, "dg")
    _assert_same_bits(dh2, du_ref, "du (written into dh)")


def test_the_bit_comparison_can_fail():
    """A last-bit difference is seen: g * (1 / e) instead of g / e (equal within 1 ulp, the
    kind of difference a libm exp or a reciprocal would make)."""
    g, u, _ = _data((33, 1000), np.float32, special=False)
    e_ref, a_ref, _ = _numpy_forward(g, u)
    close = g * (1 / e_ref)
    np.testing.assert_allclose(close, a_ref, rtol=2e-7, atol=0)
    with pytest.raises(AssertionError, match="differ"):
        _assert_same_bits(close, a_ref, "a")


def test_usable_refuses_what_the_kernels_do_not_take():
    x = np.zeros((4, 6), np.float32)
    assert _fused.usable(x, x.copy())
    assert not _fused.usable(x, np.zeros((4, 12), np.float32)[:, ::2])              # not C-contiguous
    assert not _fused.usable(x, x.astype(np.float64))                               # mixed dtypes
    assert not _fused.usable(x.astype(np.float16), x.astype(np.float16))            # float16
    assert not _fused.usable(x, np.zeros((6, 4), np.float32))                       # shapes differ
    assert not _fused.usable(x, np.asfortranarray(np.zeros((4, 6), np.float32)))

    class Sub(np.ndarray):
        pass
    assert not _fused.usable(x.view(Sub), x)                                        # only plain ndarrays


def _ffn(act_name, dtype, N=33, D=16, F=40, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(dtype)
    wg, wu, wd = (rng.standard_normal((F, D)).astype(dtype) * 0.5 for _ in range(3))
    dy = rng.standard_normal((N, D)).astype(dtype)
    act = get_activation(act_name)

    def run():
        y, cache = L.ffn_forward(x, wg, wu, wd, act)
        return (y, cache.h, cache.a, cache.e) + tuple(L.ffn_backward(dy.copy(), cache, wg, wu, wd, act))
    return run


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_name", ["swiglu", "silu_relu_demo"])
def test_ffn_fused_and_numpy_lines_give_the_same_bits(monkeypatch, act_name, dtype):
    """ffn_forward/ffn_backward with the switch on (and the size floor at 0, so these small
    shapes take the fused pass) against the switch off: every output, the same bits."""
    if act_name == "silu_relu_demo":                 # a SiLU gate with a non-identity up
        ms.activations.register_gated("silu_relu_demo", "silu", "relu", overwrite=True)
    run = _ffn(act_name, dtype)
    calls = []
    real = _fused.swiglu_rest
    monkeypatch.setattr(_fused, "swiglu_rest", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(L, "FUSED_SWIGLU_MIN_SIZE", 0)
    monkeypatch.setattr(L, "FUSED_SWIGLU", True)
    fused = run()
    assert calls, "the fused pass did not run"
    monkeypatch.setattr(L, "FUSED_SWIGLU", False)
    n = len(calls)
    plain = run()
    assert len(calls) == n, "the switch did not turn the fused pass off"
    names = ["y", "h", "a", "e", "dx", "dw_gate", "dw_up", "dw_down"]
    for got, want, name in zip(fused, plain, names):
        _assert_same_bits(got, want, name)


@needs_numba
def test_small_arrays_keep_the_numpy_lines(monkeypatch):
    calls = []
    monkeypatch.setattr(_fused, "swiglu_rest", lambda *a: calls.append(1))
    monkeypatch.setattr(L, "FUSED_SWIGLU", True)
    _ffn("swiglu", np.float32, N=3, F=8)()           # 24 elements < FUSED_SWIGLU_MIN_SIZE
    assert not calls


@needs_numba
def test_two_threads_call_the_kernels_at_once():
    """The training step calls the kernels from two threads (run_parallel): same results."""
    from concurrent.futures import ThreadPoolExecutor
    g, u, dh = _data((64, 1000), np.float32, special=False)
    e_ref, a_ref, h_ref = _numpy_forward(g, u)

    def job(_):
        e = np.negative(g)
        np.exp(e, out=e)
        return _fused.swiglu_rest(g, u, e)[1]
    with ThreadPoolExecutor(2) as pool:
        for h in pool.map(job, range(8)):
            _assert_same_bits(h, h_ref, "h")


@needs_numba
def test_no_writable_cache_compiles_in_memory_without_warnings():
    """A read-only install (no __pycache__ and no user cache that Numba can write): Numba
    raises at decoration with cache=True; the module then compiles in memory, silently.
    Simulated with a cache locator list that finds no place for the file (we run as any
    user, and root could write to a chmod-ed directory)."""
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import numpy as np
        from minisparse import _fused
        g = np.linspace(-3, 3, 70, dtype=np.float32).reshape(7, 10)
        e = np.exp(-g)
        a, h = _fused.swiglu_rest(g, g, e)
        dg = _fused.swiglu_backward(np.ones_like(g), g, a, e)
        assert np.allclose(a, g / (1 + np.exp(-g)))
        print("ok", _fused.kernels()[0]._cache.__class__.__name__)
    """)
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="IPythonCacheLocator", PYTHONWARNINGS="error")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "NullCache"], r.stdout
    assert "Warning" not in r.stderr, r.stderr[-3000:]


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
def test_host_fused_equals_fake_device_numpy_lines_bit_for_bit(monkeypatch, dtype):
    """tests/test_device.py compares a fake-CuPy run (its arrays are not np.ndarray, so they
    always take the NumPy lines) with a host run bit for bit, on shapes below the size floor.
    Here the host run is made to take the fused pass (floor 0; counted), and the comparison
    still holds for the logits, the loss and every gradient."""
    from fake_cupy import install
    from minisparse import xp as X
    install(monkeypatch)
    monkeypatch.setattr(L, "FUSED_SWIGLU_MIN_SIZE", 0)
    monkeypatch.setattr(L, "FUSED_SWIGLU", True)
    calls = []
    real_f, real_b = _fused.swiglu_rest, _fused.swiglu_backward
    monkeypatch.setattr(_fused, "swiglu_rest", lambda *a: calls.append("f") or real_f(*a))
    monkeypatch.setattr(_fused, "swiglu_backward", lambda *a: calls.append("b") or real_b(*a))
    cfg = ms.ModelConfig(vocab_size=37, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=33, max_seq_len=32,
                         activation="swiglu", tie_embeddings=False)
    host = ms.Transformer(cfg, seed=0, dtype=dtype)
    dev = ms.Transformer(cfg, seed=0, dtype=dtype).to("cupy")
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 9))
    n0 = len(calls)
    lh = host(toks)
    assert len(calls) == n0 + 2, "the host forward did not take the fused pass"
    ld = dev(toks)
    assert len(calls) == n0 + 2, "the device forward took the fused pass"
    _assert_same_bits(X.to_numpy(ld), lh, "logits")
    loss_h, g_h = host.loss_and_grads(toks, l1=0.01)
    assert calls.count("b") == 2
    loss_d, g_d = dev.loss_and_grads(toks, l1=0.01)
    assert calls.count("b") == 2
    assert loss_h == loss_d
    for k in g_h:
        _assert_same_bits(X.to_numpy(g_d[k]), g_h[k], k)


def test_without_numba_the_numpy_lines_run(monkeypatch):
    """No Numba: kernels() is None, ffn_forward/backward take the NumPy lines (no error), and
    asking the kernels directly names the install command."""
    monkeypatch.setitem(sys.modules, "numba", None)            # import numba -> ImportError
    monkeypatch.setattr(_fused, "_KERNELS", None)
    monkeypatch.setattr(L, "FUSED_SWIGLU_MIN_SIZE", 0)
    assert _fused.kernels() is None
    out = _ffn("swiglu", np.float64)()
    monkeypatch.setattr(L, "FUSED_SWIGLU", False)
    ref = _ffn("swiglu", np.float64)()
    for got, want, name in zip(out, ref, ["y", "h", "a", "e", "dx", "dw_gate", "dw_up", "dw_down"]):
        _assert_same_bits(got, want, name)
    g = np.ones((2, 3))
    with pytest.raises(ImportError, match=r"pip install 'minisparse\[numba\]'"):
        _fused.swiglu_rest(g, g, g.copy())
