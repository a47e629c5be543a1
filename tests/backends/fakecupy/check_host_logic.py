"""Run by ../test_cupy_host_logic.py in a subprocess: the CuPy backend's host logic through
the NumPy stand-in for CuPy in this folder (see cupy/__init__.py)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                                   # the stand-in `cupy` package
import numpy as np
import cupy as cp
import minisparse as ms
from minisparse.kernels import cupy_
from minisparse.kernels.testing import make_ffn
sys.path.insert(0, os.path.dirname(HERE))
from backend_helpers import check, truth
cupy_.SPARSE_KERNEL = "fused"
n = 0
for wdt, xdt in [(np.float16, np.float16), (np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)]:
    for act in ("drelu", "relu", "swiglu"):
        # (264, 40, 1): one token, rows of whole 16-byte vectors: the given-mask path (_given1),
        # wider than one float32 column block of its down kernel, after float16 weights of that shape
        for D, F, T in [(1, 1, 1), (7, 33, 3), (40, 130, 19), (16, 50, 8), (264, 40, 1)]:
            p = make_ffn(D, F, tokens=T, sparsity=0.8, activation=act, dtype=wdt, seed=D + F)
            d = {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
            wu = d["w_up"] if act != "relu" else None
            x = cp.asarray(p["x"].astype(xdt))
            tol = np.float16 if wdt == np.float16 else wdt
            for i in range(2):
                y = cupy_.ffn_device(x, d["w_gate"], wu, d["w_down"], act)
                check(y, p["x"].astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, tol, what="dev")
                mask = cp.asarray(np.isin(np.arange(F), p["active"][::2]))
                out = cp.empty((T, D), dtype=xdt)
                y2 = cupy_.ffn_device(x, d["w_gate"], wu, d["w_down"], act, active=mask, out=out)
                assert y2 is out
                check(out, p["x"].astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, tol, active=p["active"][::2], what="dev mask")
                want = truth(p["x"].astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, active=p["active"][::2])[0]
                err = np.abs(np.asarray(out, dtype=np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
                assert err <= (2e-3 if xdt == np.float16 else 1e-5 if wdt != np.float64 else 1e-12), (wdt, xdt, act, D, F, T, err)
            if act != "swiglu" and xdt == wdt and T <= 8 or (act != "swiglu" and xdt == wdt):
                for kw in ({}, {"active": p["active"][::2]}, {"active": cp.asarray(np.isin(np.arange(F), p["active"]))}, {"threshold": 0.02}):
                    if T >= 9 and "active" not in kw: continue
                    st = {}
                    for rep in range(2):
                        y = ms.sparse_ffn(x, d["w_gate"], wu, d["w_down"], act, backend="cupy", stats=st, **kw)
                    ref = dict(kw)
                    if "active" in ref and not isinstance(ref["active"], np.ndarray): ref["active"] = p["active"]
                    check(y, p["x"].astype(xdt), p["w_gate"], p["w_up"] if wu is not None else None, p["w_down"], act, tol, what=f"sparse_ffn {kw.keys()} {st}", **ref)
                    if T < 9 or kw.get("active") is not None:
                        assert st["path"] == "sparse", st
                    if not kw and st["path"] == "sparse":
                        assert st["n_active"] == p["active"].size, (st, p["active"].size)
            n += 1
# the two-launch rung of the given path (GIVEN1_KERNEL = "two") on the one-token shapes
cupy_.GIVEN1_KERNEL = "two"
for wdt, xdt in [(np.float16, np.float16), (np.float16, np.float32), (np.float32, np.float32)]:
    for D, F in [(8, 1), (264, 40), (64, 33)]:
        p = make_ffn(D, F, tokens=1, sparsity=0.8, activation="drelu", dtype=wdt, seed=D + F)
        d = {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
        mask, out = cp.asarray(np.isin(np.arange(F), p["active"][::2])), cp.empty((1, D), dtype=xdt)
        before = len(cp.CALLS)
        cupy_.ffn_device(cp.asarray(p["x"].astype(xdt)), d["w_gate"], d["w_up"], d["w_down"], "drelu", active=mask, out=out)
        assert [c.split("<")[0] for c in cp.CALLS[before:]] == ["ffn_gateup_mask", "ffn_down_rows_out"], cp.CALLS[before:]
        want = truth(p["x"].astype(xdt), p["w_gate"], p["w_up"], p["w_down"], "drelu", active=p["active"][::2])[0]
        err = np.abs(np.asarray(out, dtype=np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
        assert err <= (2e-3 if xdt == np.float16 else 1e-5), (wdt, xdt, D, F, err)
# a D wider than one block's threads cover at PV = 1 (fp32: 4 columns per vector): PV = 2 is chosen
p = make_ffn(2052, 20, tokens=1, sparsity=0.5, activation="drelu", dtype=np.float32, seed=3)
d = {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
out = cp.empty((1, 2052), dtype=np.float32)
for kern, nw, cc, want in [("one", 16, "90", "ffn_given1<float, float, 16, 2>"),        # "auto": no 16-warp cluster
                           ("one", 32, "80", "ffn_given1<float, float, 32, 1>"),        # "auto": none before sm_90
                           ("one", 32, "90", "ffn_given1_cl<float, float, 32, 1, 2>")]: # "auto": clusters of 2
    cupy_.GIVEN1_KERNEL, cupy_.GIVEN1_WARPS, cp.cuda.Device().__class__.compute_capability = kern, nw, cc
    cupy_._GIVEN1_WS.clear()                               # (a real device's capability never changes)
    before = len(cp.CALLS)
    cupy_.ffn_device(cp.asarray(p["x"]), d["w_gate"], d["w_up"], d["w_down"], "drelu", active=cp.asarray(np.isin(np.arange(20), p["active"])), out=out)
    assert cp.CALLS[before:] == [want], cp.CALLS[before:]
    check(out, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32, active=p["active"], what=f"NW={nw}")
cp.cuda.Device().__class__.compute_capability = "90"
try:
    cupy_.GIVEN1_WARPS = 24
    cupy_.ffn_device(cp.asarray(p["x"]), d["w_gate"], d["w_up"], d["w_down"], "drelu", active=cp.asarray(np.isin(np.arange(20), p["active"])), out=out)
    raise AssertionError("GIVEN1_WARPS = 24 was accepted")
except ValueError as e:
    assert "GIVEN1_WARPS" in str(e), e
cupy_.GIVEN1_WARPS = 32
for bad in (0, 9, 2.0):                                     # accumulator slices: an int in [1, 8]
    try:
        cupy_.GIVEN1_SLICES = bad
        cupy_.ffn_device(cp.asarray(p["x"]), d["w_gate"], d["w_up"], d["w_down"], "drelu", active=cp.asarray(np.isin(np.arange(20), p["active"])), out=out)
        raise AssertionError(f"GIVEN1_SLICES = {bad!r} was accepted")
    except ValueError as e:
        assert "GIVEN1_SLICES" in str(e), e
cupy_.GIVEN1_SLICES = 3                                    # a valid slice count: the emulated kernel sums the slices
cupy_.ffn_device(cp.asarray(p["x"]), d["w_gate"], d["w_up"], d["w_down"], "drelu", active=cp.asarray(np.isin(np.arange(20), p["active"])), out=out)
check(out, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32, active=p["active"], what="3 slices")
cupy_.GIVEN1_SLICES = 1
for cl, want in [(2, "ffn_given1_cl<float, float, 32, 1, 2>"), (4, "ffn_given1_cl<float, float, 32, 1, 4>")]:
    cupy_.GIVEN1_CLUSTER = cl                              # thread-block clusters: whole clusters, + D floats of smem
    before = len(cp.CALLS)
    cupy_.ffn_device(cp.asarray(p["x"]), d["w_gate"], d["w_up"], d["w_down"], "drelu", active=cp.asarray(np.isin(np.arange(20), p["active"])), out=out)
    assert cp.CALLS[before:] == [want], cp.CALLS[before:]
    check(out, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32, active=p["active"], what=f"cluster {cl}")
for cl, nw in [(3, 32), (2, 16), (0, 32)]:                 # no such cluster size / no such instantiation
    cupy_.GIVEN1_CLUSTER, cupy_.GIVEN1_WARPS = cl, nw
    try:
        cupy_.ffn_device(cp.asarray(p["x"]), d["w_gate"], d["w_up"], d["w_down"], "drelu", active=cp.asarray(np.isin(np.arange(20), p["active"])), out=out)
        raise AssertionError(f"GIVEN1_CLUSTER = {cl!r} with {nw} warps was accepted")
    except ValueError as e:
        assert "GIVEN1_CLUSTER" in str(e), e
cupy_.GIVEN1_CLUSTER, cupy_.GIVEN1_WARPS = 1, 32
# a D whose partial y does not fit a cluster's shared memory (with the neuron slots > 46 KB):
# "auto" runs without clusters; clusters asked for explicitly fall back to the two launches
pw = make_ffn(11776, 20, tokens=1, sparsity=0.5, activation="drelu", dtype=np.float32, seed=4)
dw = {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in pw.items()}
outw, maskw = cp.empty((1, 11776), dtype=np.float32), cp.asarray(np.isin(np.arange(20), pw["active"]))
for cl, want in [("auto", ["ffn_given1<float, float, 32, 4>"]), (2, ["ffn_gateup_mask", "ffn_down_rows_out"])]:
    cupy_.GIVEN1_CLUSTER = cl
    before = len(cp.CALLS)
    cupy_.ffn_device(cp.asarray(pw["x"]), dw["w_gate"], dw["w_up"], dw["w_down"], "drelu", active=maskw, out=outw)
    got = cp.CALLS[before:] if cl == "auto" else [c.split("<")[0] for c in cp.CALLS[before:]]
    assert got == want, (cl, cp.CALLS[before:])
    check(outw, pw["x"], pw["w_gate"], pw["w_up"], pw["w_down"], "drelu", np.float32, active=pw["active"], what=f"wide D, cluster {cl}")
cupy_.GIVEN1_CLUSTER = 1
# GIVEN1 switched off after a plan exists: ffn_device follows it at the next call (the fused kernel)
p = make_ffn(264, 40, tokens=1, sparsity=0.8, activation="drelu", dtype=np.float32, seed=1)
d = {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
mask, out = cp.asarray(np.isin(np.arange(40), p["active"])), cp.empty((1, 264), dtype=np.float32)
args = (cp.asarray(p["x"]), d["w_gate"], d["w_up"], d["w_down"], "drelu")
for on in (True, False, True):
    cupy_.GIVEN1 = on
    before = list(cp.CALLS)
    cupy_.ffn_device(*args, active=mask, out=out)
    new = cp.CALLS[len(before):]
    assert (new[0].startswith("ffn_given1<") if on else new[0].startswith("ffn_fused")), (on, new)
    check(out, p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", np.float32, active=p["active"], what=f"GIVEN1={on}")
print("ok", n, "cases;", sum(c.startswith(("ffn_given1", "ffn_gateup_mask")) for c in cp.CALLS), "given-path launches;",
      len(cp.CALLS), "emulated launches; plans", len(cupy_._DEVICE_PLANS), len(cupy_._FUSED_PLANS), len(cupy_._VALIDATED))
