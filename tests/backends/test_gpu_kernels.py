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


# ------------------------------------------------------------------------------------
# the one-launch path (ffn_fused) and the sync-free ffn_device entry point
# ------------------------------------------------------------------------------------
@pytest.fixture(params=["fused", "split"])
def kernel_kind(request, cp, monkeypatch):
    from minisparse.kernels import cupy_
    monkeypatch.setattr(cupy_, "SPARSE_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("act", ["drelu", "relu", "reglu:0.05"])
@pytest.mark.parametrize("D, F, T", [(1, 1, 1), (7, 33, 3), (33, 97, 8), (130, 257, 1), (4095, 1001, 2), (64, 3000, 5)])
def test_fused_and_split_paths_equal_reference(cp, kernel_kind, act, D, F, T):
    for dtype in (np.float32, np.float64):
        p = make_ffn(D, F, tokens=T, sparsity=0.85, activation=act.split(":")[0], dtype=dtype, seed=D + F + T)
        d = _dev(cp, p)
        wu = d["w_up"] if act != "relu" else None
        for kw in ({}, {"active": cp.asarray(np.isin(np.arange(F), p["active"][::2]))}, {"threshold": 0.02}):
            st = {}
            y = ms.sparse_ffn(d["x"], d["w_gate"], wu, d["w_down"], act, backend="cupy", stats=st, **kw)
            ref = {k: (p["active"][::2] if k == "active" else v) for k, v in kw.items()}
            check(y, p["x"], p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, dtype,
                  what=f"{kernel_kind} {act} {kw.keys()} {st}", **ref)
            assert st["path"] == "sparse"
            if not kw and act != "reglu:0.05":
                assert st["n_active"] == p["active"].size


@pytest.mark.parametrize("wdt, xdt", [(np.float16, np.float16), (np.float16, np.float32), (np.float32, np.float32),
                                      (np.float64, np.float64)])
@pytest.mark.parametrize("act", ["drelu", "swiglu", "relu"])
@pytest.mark.parametrize("D, F, T", [(1, 1, 1), (7, 33, 3), (256, 1000, 1), (4095, 333, 8), (40, 130, 19)])
def test_ffn_device_equals_reference_over_repeated_calls(cp, wdt, xdt, act, D, F, T):
    """Values change between calls (the accumulator must be zero again after each launch),
    with and without a mask and an out buffer; swiglu: nothing is skipped, still exact."""
    from minisparse.kernels import cupy_
    p = make_ffn(D, F, tokens=T, sparsity=0.9, activation=act, dtype=wdt, seed=D * 7 + F)
    d = _dev(cp, p)
    wu = d["w_up"] if act != "relu" else None
    x = cp.asarray(p["x"].astype(xdt))
    mask = cp.asarray(np.isin(np.arange(F), p["active"][1::2]))
    out = cp.empty((T, D), dtype=xdt)
    tol = np.float16 if wdt == np.float16 else wdt
    rng = np.random.default_rng(0)
    for i in range(3):
        xs = p["x"].copy()
        xs[:, 1:] *= rng.uniform(0.5, 1.5, size=xs[:, 1:].shape).astype(wdt)   # keep x[:, 0] = 1 (exact set)
        x[...] = cp.asarray(xs.astype(xdt))
        y = cupy_.ffn_device(x, d["w_gate"], wu, d["w_down"], act)
        assert y.dtype == xdt and y.shape == (T, D)
        check(y, xs.astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, tol,
              what=f"ffn_device {act} call {i}")
        y2 = cupy_.ffn_device(x, d["w_gate"], wu, d["w_down"], act, active=mask, out=out)
        assert y2 is out
        check(out, xs.astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, tol,
              active=p["active"][1::2], what=f"ffn_device {act} mask call {i}")


def test_ffn_device_allocates_and_syncs_nothing_after_the_first_call_and_replays_in_a_graph(cp):
    from minisparse.kernels import cupy_
    p = make_ffn(512, 1536, tokens=1, sparsity=0.9, activation="drelu", dtype=np.float16, seed=3)
    d = _dev(cp, p)
    mask = cp.asarray(np.isin(np.arange(1536), p["active"]))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.asarray(p["x"])
        out = cp.empty_like(x)
        cupy_.ffn_device(x, d["w_gate"], d["w_up"], d["w_down"], "drelu", active=mask, out=out)   # plans here
        stream.synchronize()
        pool = cp.get_default_memory_pool()
        used = pool.used_bytes()
        stream.begin_capture()
        for _ in range(3):                                            # capture fails on any sync
            cupy_.ffn_device(x, d["w_gate"], d["w_up"], d["w_down"], "drelu", active=mask, out=out)
        graph = stream.end_capture()
        assert pool.used_bytes() == used                              # nothing allocated
        xs = p["x"].copy()
        xs[:, 1:] *= 0.75
        x[...] = cp.asarray(xs)
        out[...] = 0
        graph.launch(stream)
        stream.synchronize()
    check(out, xs, p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float16, active=p["active"],
          what="graph replay")


def test_ffn_device_rejects_bad_inputs_clearly(cp):
    from minisparse.kernels import cupy_
    p = make_ffn(16, 40, tokens=2, sparsity=0.5, activation="drelu", dtype=np.float32, seed=0)
    d = _dev(cp, p)
    with pytest.raises(TypeError, match="CuPy arrays"):
        cupy_.ffn_device(p["x"], d["w_gate"], d["w_up"], d["w_down"], "drelu")
    with pytest.raises(TypeError, match="mask of shape"):
        cupy_.ffn_device(d["x"], d["w_gate"], d["w_up"], d["w_down"], "drelu", active=cp.arange(3))
    with pytest.raises(ValueError, match="out must be"):
        cupy_.ffn_device(d["x"], d["w_gate"], d["w_up"], d["w_down"], "drelu", out=cp.empty((2, 15), cp.float32))
    with pytest.raises(ValueError, match="shape"):
        cupy_.ffn_device(d["x"], d["w_gate"], d["w_up"], d["w_down"][:, :8].copy(), "drelu")


def test_sparse_ffn_validates_once_but_still_rejects_new_bad_inputs(cp):
    p = make_ffn(16, 40, tokens=2, sparsity=0.5, activation="drelu", dtype=np.float32, seed=0)
    d = _dev(cp, p)
    for _ in range(2):                                                # second call: the cached path
        y = ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy")
        check(y, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32)
    with pytest.raises(ValueError, match="ffn_dim=40"):
        ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy",
                      active=np.array([0, 40]))
    with pytest.raises(ValueError, match="transposed"):
        ms.sparse_ffn(d["x"], d["w_gate"], d["w_up"], cp.ascontiguousarray(d["w_down"].T), "drelu",
                      backend="cupy")


@pytest.mark.parametrize("wdt, xdt", [(np.float16, np.float16), (np.float16, np.float32), (np.float32, np.float32)])
@pytest.mark.parametrize("act", ["drelu", "relu", "reglu", "swiglu"])
@pytest.mark.parametrize("D, F", [(8, 1), (40, 7), (136, 33), (4096, 1000)])
def test_one_token_given_mask_path_equals_fused_and_reference(cp, wdt, xdt, act, D, F):
    """Batch 1 with a mask runs ffn_given1 (cupy_._given1, one launch): equal
    to the reference and to the one-launch fused kernel, through sparse_ffn and ffn_device,
    over calls whose x changes; the workspace is zero again after every call and the
    count of the last call is the mask's."""
    from minisparse.kernels import cupy_
    p = make_ffn(D, F, tokens=1, sparsity=0.8, activation=act, dtype=wdt, seed=D + F)
    d = _dev(cp, p)
    wu = d["w_up"] if act != "relu" else None
    chosen = p["active"][::2] if p["active"].size > 1 else p["active"]
    mask = cp.asarray(np.isin(np.arange(F), chosen))
    tol = np.float16 if wdt == np.float16 else wdt
    rng = np.random.default_rng(1)
    out = cp.empty((1, D), dtype=xdt)
    for i in range(3):
        xs = p["x"].copy()
        xs[:, 1:] *= rng.uniform(0.5, 1.5, size=xs[:, 1:].shape).astype(wdt)
        x = cp.asarray(xs.astype(xdt))
        st = {}
        y = ms.sparse_ffn(x, d["w_gate"], wu, d["w_down"], act, backend="cupy", active=mask, stats=st)
        ws = cupy_._GIVEN1_WS[(cp.cuda.Device().id, cp.cuda.get_current_stream().ptr, D, F, np.dtype(wdt).char)]
        assert st["n_active"] == int(mask.sum()) == int(ws["cnt"][2])
        assert int(ws["cnt"][0]) == 0 and int(ws["cnt"][1]) == 0 and not bool(ws["y32"].any())
        check(y, xs.astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, tol,
              active=chosen, what=f"given1 sparse_ffn {act} call {i}")
        y2 = cupy_.ffn_device(x, d["w_gate"], wu, d["w_down"], act, active=mask, out=out)
        check(y2, xs.astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, tol,
              active=chosen, what=f"given1 ffn_device {act} call {i}")
        old, cupy_.GIVEN1 = cupy_.GIVEN1, False
        try:
            y3 = ms.sparse_ffn(x, d["w_gate"], wu, d["w_down"], act, backend="cupy", active=mask)
        finally:
            cupy_.GIVEN1 = old
        check(y3, xs.astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, tol,
              active=chosen, what=f"fused (GIVEN1 off) sparse_ffn {act} call {i}")
        f64 = lambda a: None if a is None else np.asarray(a, dtype=np.float64)
        ref = ms.sparse_ffn(f64(xs.astype(xdt)), f64(p["w_gate"]), f64(p["w_up"]) if wu is not None else None,
                            f64(p["w_down"]), act, backend="numpy", active=chosen)
        for name, got in (("given1", y), ("ffn_device", y2), ("fused", y3)):   # tight: relative to max |ref|
            err = np.abs(cp.asnumpy(got).astype(np.float64) - ref).max() / (np.abs(ref).max() or 1.0)
            assert err < (5e-3 if xdt == np.float16 else 1e-4), f"{name} {act} call {i}: rel err {err:.1e}"


def test_one_token_given_mask_path_is_taken_and_refused_where_it_cannot_run(cp):
    from minisparse.kernels import cupy_
    from minisparse.activations import get_activation
    p = make_ffn(40, 7, tokens=1, sparsity=0.5, activation="drelu", dtype=np.float32, seed=0)
    d = _dev(cp, p)
    a = get_activation("drelu")
    m = cp.ones(7, dtype=cp.uint8)
    x = cp.asarray(p["x"])
    assert cupy_._given1_ok(x, d["w_gate"], d["w_up"], d["w_down"], a, 0.0, m)
    assert not cupy_._given1_ok(x, d["w_gate"], d["w_up"], d["w_down"], a, 0.0, None)     # no mask
    assert not cupy_._given1_ok(x, d["w_gate"], d["w_up"], d["w_down"], a, 0.1, m)      # a threshold
    x2 = cp.asarray(np.repeat(p["x"], 2, axis=0))
    assert not cupy_._given1_ok(x2, d["w_gate"], d["w_up"], d["w_down"], a, 0.0, m)     # two tokens
    x64 = x.astype(cp.float64)
    w64 = {k: d[k].astype(cp.float64) for k in ("w_gate", "w_up", "w_down")}
    assert not cupy_._given1_ok(x64, w64["w_gate"], w64["w_up"], w64["w_down"], a, 0.0, m)   # float64
    q = make_ffn(7, 5, tokens=1, sparsity=0.5, activation="drelu", dtype=np.float32, seed=0)
    dq = _dev(cp, q)
    assert not cupy_._given1_ok(cp.asarray(q["x"]), dq["w_gate"], dq["w_up"], dq["w_down"], a, 0.0, m)  # 7 % 4


@pytest.mark.parametrize("wdt, xdt", [(np.float16, np.float16), (np.float16, np.float32), (np.float32, np.float32)])
@pytest.mark.parametrize("D, F", [(8, 1), (40, 7), (136, 33), (4104, 1000), (8192, 50)])
def test_one_launch_given_kernel_equals_two_launches_and_reference(cp, wdt, xdt, D, F):
    """ffn_given1 (one launch: every block ranks the whole mask, takes an equal share of the
    active neurons, adds its down rows with float4 atomics) against the two-launch rung and
    the float64 reference, for every warps / blocks-per-SM setting, on random, clustered,
    empty, full and non-0/1 uint8 masks, and a mask view at an odd offset (the two-launch
    path then runs). D = 4104 and 8192 need PV = 2 and 4 column vectors per thread."""
    from minisparse.kernels import cupy_
    p = make_ffn(D, F, tokens=1, sparsity=0.5, activation="drelu", dtype=wdt, seed=D + F)
    d = _dev(cp, p)
    x = cp.asarray(p["x"].astype(xdt))
    rng = np.random.default_rng(F)
    host_masks = {"random": rng.random(F) < 0.3, "clustered": np.arange(F) < max(1, F // 5),
                  "empty": np.zeros(F, bool), "full": np.ones(F, bool)}
    f64 = lambda a: np.asarray(a, dtype=np.float64)
    old = (cupy_.GIVEN1_KERNEL, cupy_.GIVEN1_WARPS, cupy_.GIVEN1_BLOCKS_PER_SM, cupy_.GIVEN1_SLICES, cupy_.GIVEN1_CLUSTER)
    clusters = int(cp.cuda.Device().compute_capability) >= 90
    try:
        for name, hm in host_masks.items():
            ref = ms.sparse_ffn(f64(p["x"].astype(xdt)), f64(p["w_gate"]), f64(p["w_up"]), f64(p["w_down"]),
                                "drelu", backend="numpy", active=np.flatnonzero(hm))
            scale = np.abs(ref).max() or 1.0
            masks = [cp.asarray(hm), cp.asarray(hm.astype(np.uint8) * 7)]
            big = cp.zeros(F + 16, dtype=cp.uint8)
            big[3:3 + F] = cp.asarray(hm.astype(np.uint8))
            masks.append(big[3:3 + F])                       # 3 bytes past an aligned start
            settings = [("one", 32, 1, 8, 1), ("one", 16, 1, 8, 1), ("one", 32, 2, 3, 1), ("one", 16, 2, 1, 1),
                        ("two", 32, 1, 8, 1)]
            if clusters:                                     # thread-block clusters of 2 and 4 (sm_90)
                settings += [("one", 32, 1, 1, 2), ("one", 32, 1, 3, 4), ("one", 32, 2, 1, 4)]
            for kern, nw, bps, sl, cl in settings:
                (cupy_.GIVEN1_KERNEL, cupy_.GIVEN1_WARPS, cupy_.GIVEN1_BLOCKS_PER_SM, cupy_.GIVEN1_SLICES,
                 cupy_.GIVEN1_CLUSTER) = kern, nw, bps, sl, cl
                for k, m in enumerate(masks):
                    out = cp.full((1, D), np.nan, dtype=xdt)
                    cupy_.ffn_device(x, d["w_gate"], d["w_up"], d["w_down"], "drelu", active=m, out=out)
                    err = np.abs(cp.asnumpy(out).astype(np.float64) - ref).max() / scale
                    assert err < (5e-3 if xdt == np.float16 else 1e-5), (name, kern, nw, bps, sl, cl, k, err)
                    ws = cupy_._GIVEN1_WS[(cp.cuda.Device().id, cp.cuda.get_current_stream().ptr, D, F,
                                           np.dtype(wdt).char)]
                    assert int(ws["cnt"][2]) == int(hm.sum()) and not ws["cnt"][:2].any() and not ws["y32"].any()
    finally:
        (cupy_.GIVEN1_KERNEL, cupy_.GIVEN1_WARPS, cupy_.GIVEN1_BLOCKS_PER_SM, cupy_.GIVEN1_SLICES,
         cupy_.GIVEN1_CLUSTER) = old


def test_sparse_ffn_lean_given_path_keeps_the_general_paths_meaning(cp):
    """sparse_ffn with one token and a device bool mask takes the lean path (validation cached
    per shapes, no stats): equal to the reference for (D,) and (1, D) x; a strided x, stats,
    and a uint8 device array (indices, not a mask) still take the general path's meaning."""
    from minisparse.kernels import cupy_
    D, F = 264, 70
    p = make_ffn(D, F, tokens=1, sparsity=0.6, activation="drelu", dtype=np.float32, seed=5)
    d = _dev(cp, p)
    hm = np.isin(np.arange(F), p["active"][::2])
    f64 = lambda a: np.asarray(a, dtype=np.float64)
    ref = ms.sparse_ffn(f64(p["x"][0]), f64(p["w_gate"]), f64(p["w_up"]), f64(p["w_down"]), "drelu",
                        backend="numpy", active=np.flatnonzero(hm))
    old = cupy_.GIVEN1_DRIVER_LAUNCH
    try:
        for driver, stream in ((True, None), (False, None), (True, cp.cuda.Stream(non_blocking=True))):
            cupy_.GIVEN1_DRIVER_LAUNCH = driver          # the driver's launch on cached slots, or a RawKernel call
            with (stream if stream is not None else cp.cuda.get_current_stream()):
                for x in (d["x"][0], d["x"], cp.asarray(np.stack([p["x"][0], p["x"][0]], axis=1))[:, 0]):
                    before = len(cupy_._VALIDATED)
                    for rep in range(2):                   # the second call reuses the slots with new pointers
                        xx = x.copy() if rep else x
                        y = ms.sparse_ffn(xx, d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy",
                                          active=cp.asarray(hm))
                        assert y.shape == x.shape and y.dtype == x.dtype
                        np.testing.assert_allclose(cp.asnumpy(y).reshape(-1), ref, rtol=1e-5,
                                                   atol=1e-5 * np.abs(ref).max(), err_msg=f"driver={driver}")
                    assert len(cupy_._VALIDATED) >= before
                if stream is not None:
                    stream.synchronize()
    finally:
        cupy_.GIVEN1_DRIVER_LAUNCH = old
    st = {}
    y = ms.sparse_ffn(d["x"][0], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy",
                      active=cp.asarray(hm), stats=st)
    assert st["n_active"] == int(hm.sum()) and st["path"] == "sparse"
    idx = cp.asarray(np.flatnonzero(hm)[:3].astype(np.uint8))        # indices 0..F-1 as uint8: indices
    y = ms.sparse_ffn(d["x"][0], d["w_gate"], d["w_up"], d["w_down"], "drelu", backend="cupy", active=idx)
    ref3 = ms.sparse_ffn(f64(p["x"][0]), f64(p["w_gate"]), f64(p["w_up"]), f64(p["w_down"]), "drelu",
                         backend="numpy", active=np.flatnonzero(hm)[:3])
    np.testing.assert_allclose(cp.asnumpy(y), ref3, rtol=1e-5, atol=1e-5 * np.abs(ref3).max())
