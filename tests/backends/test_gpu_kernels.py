"""CuPy backend specifics: float16 weights, device arrays in and out, device masks, tiling.

All marked ``gpu``; they skip (never pass) where CuPy or a GPU is absent.
"""
from __future__ import annotations

import numpy as np
import pytest

import minisparse as ms
from minisparse.kernels.testing import make_ffn

from backend_helpers import check, require

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    require("cupy")
    import cupy
    return cupy


def _dev(cp, p):
    return {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}


@pytest.mark.parametrize("xdt", [np.float16, np.float32], ids=["x16", "x32"])
@pytest.mark.parametrize("act", ["drelu", "reglu", "relu", "swiglu"])
@pytest.mark.parametrize("D, F, T", [(1, 1, 1), (7, 33, 3), (64, 96, 1), (130, 257, 8), (4096, 1000, 2)])
def test_float16_weights(cp, act, xdt, D, F, T):
    p = make_ffn(D, F, tokens=T, sparsity=0.8, activation=act, dtype=np.float16, seed=D + F)
    p["x"] = p["x"].astype(xdt)
    d = _dev(cp, p)
    stats = {}
    y = ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], act, backend="cupy", stats=stats)
    assert isinstance(y, cp.ndarray) and y.dtype == xdt and y.shape == (T, D)
    # truth from the exact half inputs; float16 output rounding is within the 3e-3 tolerance
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], act, np.float16, what=f"f16 {act} {stats}")
    ya = ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], act, backend="cupy",
                       active=cp.asarray(np.isin(np.arange(F), p["active"])))
    check(ya, p["x"], p["w_gate"], p["w_up"], p["w_down"], act, np.float16, active=p["active"],
          what=f"f16 {act} device mask")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_array_kind_in_equals_kind_out(cp, dtype):
    p = make_ffn(40, 70, tokens=2, sparsity=0.7, activation="drelu", dtype=dtype, seed=0)
    y_host = ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", backend="cupy")
    assert isinstance(y_host, np.ndarray)
    d = _dev(cp, p)
    y_dev = ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy")
    assert isinstance(y_dev, cp.ndarray)
    np.testing.assert_allclose(y_dev.get(), y_host, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-12)
    check(y_dev, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", dtype)


def test_device_index_active_and_its_range_check(cp):
    p = make_ffn(33, 90, tokens=3, sparsity=0.5, activation="reglu", dtype=np.float64, seed=5)
    d = _dev(cp, p)
    idx = cp.asarray(np.array([5, 1, 5, 80, 2]))                      # repeats are harmless
    y = ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], "reglu", backend="cupy", active=idx)
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], "reglu", np.float64, active=[1, 2, 5, 80])
    with pytest.raises(ValueError, match="ffn_dim=90"):
        ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], "reglu", backend="cupy",
                      active=cp.asarray([0, 90]))


@pytest.mark.parametrize("T", [9, 17, 20])
def test_many_tokens_dense_path_and_tiled_predicted_path(cp, T):
    p = make_ffn(48, 130, tokens=T, sparsity=0.9, activation="drelu", dtype=np.float32, seed=T)
    d = _dev(cp, p)
    st = {}
    y = ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy", stats=st)
    assert st["path"] == "dense"
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32)
    st = {}
    y = ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy",
                      active=p["active"], stats=st)
    assert st["path"] == "sparse" and st["tiles"] == (T + 7) // 8
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32, active=p["active"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_mistral_sized_layer_and_repeated_calls(cp, dtype):
    """Many blocks, vector loads, the counter pair across calls; unaligned rows too."""
    for D, F in [(4096, 14336), (4095, 5003)]:
        p = make_ffn(D, F, tokens=1, sparsity=0.9, activation="drelu", dtype=dtype, seed=1)
        d = _dev(cp, p)
        st = {}
        ys = [ms.sparse_ffn(d["x"][0], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy",
                            stats=st if i == 0 else None) for i in range(4)]
        assert st["n_active"] == p["active"].size
        for y in ys:
            check(y[None], p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu",
                  np.float16 if dtype == np.float16 else np.float32)
        ya = ms.sparse_ffn(d["x"][0], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy",
                           active=cp.asarray(np.isin(np.arange(F), p["active"])))
        check(ya[None], p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu",
              np.float16 if dtype == np.float16 else np.float32, active=p["active"])


def test_misaligned_rows_fall_back_to_scalar_loads(cp):
    p = make_ffn(64, 50, tokens=2, sparsity=0.6, activation="drelu", dtype=np.float32, seed=2)
    views = {}
    for k in ("w_gate", "w_up", "w_down"):
        buf = cp.zeros(p[k].size + 1, dtype=cp.float32)
        v = buf[1:].reshape(p[k].shape)                               # contiguous, 4 bytes off 16
        v[...] = cp.asarray(p[k])
        assert v.flags.c_contiguous and v.data.ptr % 16 == 4
        views[k] = v
    y = ms.sparse_ffn(cp.asarray(p["x"]), views["w_gate"], views["w_up"], views["w_down"], "drelu",
                      backend="cupy")
    check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32)
