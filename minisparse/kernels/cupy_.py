"""GPU neuron skipping with CuPy RawKernels (the CUDA source is ``sparse_ffn.cu`` beside this file).

Two or three launches per FFN and no host round trip: the active list and its length stay
in device memory (an atomic counter), and each kernel reads the count from there.

===========  =========================================================================
launch       work
===========  =========================================================================
ffn_gate     one warp per neuron: gate for T tokens, activation, keep if any |a| > thr,
             atomic slot in the compact active list; zeroes y. With a predicted mask,
             only masked-in neurons are read and the up projection is fused (2 launches)
ffn_up       one warp per active slot: u = x . w_up[f], h = a * b(u)
ffn_down     (columns x slot-ranges) tiles, 16-byte loads, per-block reduction in shared
             memory, one atomicAdd per output element per block
===========  =========================================================================

Weights: float16, float32 or float64 (float16 accumulates in float32; x may then be
float16 or float32). Inputs may be NumPy or CuPy arrays; the result is of x's kind. Keep
the weights on the device (``cupy.asarray`` once): NumPy weights are copied on every call.
For T > 8 tokens without a predictor the FFN runs dense (cuBLAS), as skipping would then
read most rows anyway; with ``active`` given, tokens are processed 8 at a time.

``stats`` costs one device-to-host read of the active count (a synchronisation); pass
``stats=None`` when timing.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from ..activations import Activation
from .base import activation_codes, cuda_activation_source

NAME = "cupy"
WEIGHT_DTYPES = (np.float16, np.float32, np.float64)
TOKEN_TILES = (1, 8)            # T held in registers by the kernels (larger T is split)
DENSE_FROM_T = 9                # without a predictor, T >= this runs dense (cuBLAS)
_WARPS = 8                      # warps per block (WARPS_PER_BLOCK in the .cu)

try:
    import cupy as cp
except ImportError as _e:  # pragma: no cover - exercised through the registry tests
    cp = None
    _IMPORT_ERROR = _e


def check_usable() -> None:
    """Raise ImportError unless CuPy imports and sees a CUDA device."""
    if cp is None:
        raise ImportError(f"cupy is not installed ({_IMPORT_ERROR})")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError when there is no driver
        raise ImportError(f"cupy is installed but no CUDA device is usable ({e})") from e
    if n < 1:
        raise ImportError("cupy is installed but no CUDA device is visible")


_SRC_PATH = os.path.join(os.path.dirname(__file__), "sparse_ffn.cu")
_CTYPE = {np.dtype(np.float16): "unsigned short", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_MODULES: Dict[tuple, object] = {}


def cuda_source() -> str:
    """The CUDA source of the kernels: the shared activation definitions + ``sparse_ffn.cu``."""
    with open(_SRC_PATH) as fh:
        return cuda_activation_source() + fh.read()
_WORKSPACES: Dict[tuple, dict] = {}


def _kernels(wdt: np.dtype, xdt: np.dtype) -> dict:
    """Compiled kernels for (weight dtype, x dtype), one RawModule per pair (NVRTC, cached)."""
    key = (wdt, xdt)
    if key not in _MODULES:
        src = cuda_source()
        W, X = _CTYPE[wdt], _CTYPE[xdt]
        names = {}
        for tt in TOKEN_TILES:
            names[("gate", tt)] = f"ffn_gate<{W}, {X}, {tt}>"
            names[("up", tt)] = f"ffn_up<{W}, {X}, {tt}>"
            names[("down", tt)] = f"ffn_down<{W}, {tt}>"
        mod = cp.RawModule(code=src, options=("-std=c++17",), name_expressions=list(names.values()))
        _MODULES[key] = {k: mod.get_function(v) for k, v in names.items()}
    return _MODULES[key]


def _workspace(F: int, T: int, acc: np.dtype) -> dict:
    """Per (device, stream, F, T, acc dtype) scratch: counters, active list, values."""
    dev = cp.cuda.Device().id
    stream = cp.cuda.get_current_stream().ptr
    key = (dev, stream, F, T, acc)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = dict(cnt=cp.zeros(2, dtype=cp.int32), idx=cp.empty(F, dtype=cp.int32),
                  vals=cp.empty(F * T, dtype=acc), parity=0)
        _WORKSPACES[key] = ws
    return ws


_SMS: Dict[int, int] = {}


def _sm_count() -> int:
    dev = cp.cuda.Device().id
    if dev not in _SMS:
        _SMS[dev] = int(cp.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])
    return _SMS[dev]


def _aligned(*arrays) -> bool:
    return all(a is None or a.data.ptr % 16 == 0 for a in arrays)


def _mask_from_active(active, F: int):
    """Device uint8 mask (F,) from host indices, a device bool mask or device indices."""
    if isinstance(active, np.ndarray):                                # validated, sorted, unique
        m = np.zeros(F, dtype=np.uint8)
        m[active] = 1
        return cp.asarray(m)
    if active.dtype == cp.bool_:
        return cp.ascontiguousarray(active).view(cp.uint8)           # no copy, no sync
    a = active.astype(cp.int64, copy=False)
    if a.size:
        lo, hi = int(a.min()), int(a.max())                            # one sync: checks the range
        if lo < 0 or hi >= F:
            raise ValueError(f"active indices must lie in [0, ffn_dim={F}), got values from {lo} to {hi}")
    m = cp.zeros(F, dtype=cp.uint8)
    m[a] = 1
    return m


# ------------------------------------------------------------------------------------
# dense path (cuBLAS) with the same masking semantics
# ------------------------------------------------------------------------------------
_DENSE_ACT = {}


def _dense_act_kernel():
    if "k" not in _DENSE_ACT:
        _DENSE_ACT["k"] = cp.ElementwiseKernel(
            "T g, T u, int32 gk, int32 uk, float64 thr, float64 skip, int32 gated",
            "T h",
            """
            double a = act_fn<double>((double)g, gk, thr);
            bool keep = !(fabs(a) <= skip);
            h = keep ? (T)(gated ? a * act_fn<double>((double)u, uk, thr) : a) : (T)0;
            """,
            "minisparse_dense_act", preamble=cuda_activation_source())
    return _DENSE_ACT["k"]


def _dense(x, wg, wu, wd, act, gk, uk, act_thr, skip, acc):
    xw = x.astype(wg.dtype, copy=False)                              # cuBLAS wants one dtype
    g = (xw @ wg.T).astype(acc, copy=False)                           # (T, F)
    u = (xw @ wu.T).astype(acc, copy=False) if act.gated else g       # (T, F)
    h = _dense_act_kernel()(g, u, gk, uk, act_thr, skip, int(act.gated))  # (T, F)
    return (h.astype(wd.dtype, copy=False) @ wd).astype(acc, copy=False)   # (T, D)


# ------------------------------------------------------------------------------------
# the sparse path: 2-3 launches, planned once per (weights, shapes, activation)
# ------------------------------------------------------------------------------------
DOWN_BLOCKS_PER_SM = 4          # ffn_down grid ~ this many blocks per multiprocessor
GATE_BLOCKS_PER_SM = 16         # cap of the ffn_gate / ffn_up grids (grid-stride loops)
_PLANS: Dict[tuple, dict] = {}


def _plan(xd, wg, wu, wd, act: Activation, skip: float, predicted: bool) -> dict:
    """Everything about a launch that does not depend on the values: kernels, grids, flags,
    scalar arguments and the workspace. Keyed by pointers and shapes, so a plan is only
    reused for the very same weight buffers (their *values* may change freely)."""
    T, D = xd.shape
    F = wg.shape[0]
    key = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr, T, D, F, xd.dtype.char, wg.dtype.char,
           wg.data.ptr, 0 if wu is None else wu.data.ptr, wd.data.ptr, act.name, skip, predicted,
           DOWN_BLOCKS_PER_SM, GATE_BLOCKS_PER_SM)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if len(_PLANS) > 256:
        _PLANS.clear()
    gk, uk, act_thr = activation_codes(act, NAME)
    wdt, xdt = np.dtype(wg.dtype), np.dtype(xd.dtype)
    acc = np.dtype(np.float64) if wdt == np.float64 else np.dtype(np.float32)
    A = acc.type
    tt = 1 if T == 1 else 8
    k = _kernels(wdt, xdt)
    sm = _sm_count()
    gated = bool(act.gated)
    # 16-byte vector loads need every weight row and every x row 16-byte aligned; x's
    # pointer is checked at each launch (it changes), the rest here
    vec_ok = (_aligned(wg, wu, wd) and (D * wdt.itemsize) % 16 == 0 and (D * xdt.itemsize) % 16 == 0)
    base = (1 if gated else 0) | (2 if predicted else 0)
    flags_v, flags_s = base | (4 if vec_ok else 0), base
    ws = _workspace(F, T, acc)
    threads = 32 * _WARPS
    vec = 16 // wdt.itemsize
    cw = 32 * vec * 2                                                 # columns per ffn_down block (NV = 2)
    ncol = (D + cw - 1) // cw
    G = max(1, min((DOWN_BLOCKS_PER_SM * sm + ncol - 1) // ncol, (F + _WARPS - 1) // _WARPS))
    i32 = np.int32
    plan = dict(
        acc=acc, ws=ws, block=(threads,), cnts=(ws["cnt"][0:1], ws["cnt"][1:2]),
        gate=k[("gate", tt)], grid_gate=(max(1, min((F + _WARPS - 1) // _WARPS, sm * GATE_BLOCKS_PER_SM)),),
        gate_args={v: (i32(T), i32(D), i32(F), i32(gk), i32(uk), A(act_thr), A(skip), i32(fl))
                   for v, fl in ((True, flags_v), (False, flags_s))},
        up=k[("up", tt)] if (gated and not predicted) else None,
        grid_up=(max(1, min((F + _WARPS - 1) // _WARPS, sm * GATE_BLOCKS_PER_SM // 2)),),
        up_args={v: (i32(T), i32(D), i32(uk), A(act_thr), i32(fl)) for v, fl in ((True, flags_v), (False, flags_s))},
        down=k[("down", tt)], grid_down=(ncol, G), down_args=(i32(T), i32(D), i32(flags_v)),
        nY=i32(T * D))
    _PLANS[key] = plan
    return plan


def _launch(plan, x, wg, wu, wd, mask, y):
    """ffn_gate [+ ffn_up] + ffn_down on one token tile; y (T, D) accumulation buffer."""
    ws = plan["ws"]
    p = ws["parity"]
    cnt, cnt_next = plan["cnts"][p], plan["cnts"][1 - p]
    idx, vals = ws["idx"], ws["vals"]
    xa = x.data.ptr % 16 == 0
    plan["gate"](plan["grid_gate"], plan["block"],
                 (x, wg, wg if wu is None else wu, idx if mask is None else mask) + plan["gate_args"][xa]
                 + (cnt, cnt_next, idx, vals, y, plan["nY"]))
    ws["parity"] = 1 - p                                              # the next call's counter is now zero
    if plan["up"] is not None:
        plan["up"](plan["grid_up"], plan["block"], (x, wu, cnt, idx, vals) + plan["up_args"][xa])
    plan["down"](plan["grid_down"], plan["block"], (cnt, idx, vals, wd, y) + plan["down_args"])
    return cnt


def _dev(a):
    """A C-contiguous CuPy array (no copy when it already is one)."""
    if a is None:
        return None
    if isinstance(a, cp.ndarray) and a.flags.c_contiguous:
        return a
    return cp.ascontiguousarray(cp.asarray(a))


def ffn(x, w_gate, w_up, w_down, act: Activation, *, active=None, threshold=None, stats=None):
    """CuPy FFN on x (T, D) -> y (T, D) of x's array kind; same function as :func:`numpy_.ffn`."""
    on_host = isinstance(x, np.ndarray)
    xd, wg, wu, wd = _dev(x), _dev(w_gate), _dev(w_up), _dev(w_down)
    T, D = xd.shape
    F = wg.shape[0]
    skip = 0.0 if threshold is None else float(threshold)
    n_active = None
    if active is None and (T >= DENSE_FROM_T or (not act.exact_zeros and threshold is None)):
        gk, uk, act_thr = activation_codes(act, NAME)
        acc = np.dtype(np.float64) if wg.dtype == np.float64 else np.dtype(np.float32)
        y = _dense(xd, wg, wu, wd, act, gk, uk, act_thr, skip, acc)   # (T, D)
        path, n_active = "dense", F
    else:
        mask = _mask_from_active(active, F) if active is not None else None
        counts = []
        y = None
        for t0 in range(0, T, 8):                                     # token tiles of <= 8
            t1 = min(T, t0 + 8)
            xt = xd if (t0 == 0 and t1 == T) else xd[t0:t1]
            plan = _plan(xt, wg, wu, wd, act, skip, mask is not None)
            if y is None:
                y = cp.empty((T, D), dtype=plan["acc"])               # (T, D), zeroed by ffn_gate
            cnt = _launch(plan, xt, wg, wu, wd, mask, y if (t0 == 0 and t1 == T) else y[t0:t1])
            if stats is not None:
                counts.append(int(cnt.get()[0]))                      # one sync per tile
        if y is None:                                                 # T == 0
            y = cp.empty((0, D), dtype=np.float64 if wg.dtype == np.float64 else np.float32)
        path = "sparse"
        if counts:
            n_active = max(counts)
            if len(counts) > 1:
                stats["tiles"] = len(counts)
    if stats is not None:
        stats.update(path=path, n_active=n_active)
    if y.dtype != xd.dtype:
        y = y.astype(xd.dtype)
    return cp.asnumpy(y) if on_host else y
