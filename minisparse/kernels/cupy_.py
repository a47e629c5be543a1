"""GPU neuron skipping with CuPy RawKernels (the CUDA source is ``sparse_ffn.cu`` beside this file).

**One launch per FFN** (``ffn_fused``, 2026-12-01; used by :func:`ffn_device`, and by
:func:`ffn` when ``SPARSE_KERNEL = "fused"``) and no host round trip: each block
owns a range of neurons, computes their gate (and, for kept neurons, up) dot products,
multiplies its kept neurons into ``w_down`` and adds its partial output atomically to a
float32 (float64) accumulator; the last block to finish converts the accumulator to x's
dtype and zeroes it for the next launch. With ``active`` (a predictor's mask) only the
masked-in rows of all three matrices are read.

**One token given a mask** (``GIVEN1``, the default; :func:`_given1`): ``ffn_given1`` from
the decode kernels, one launch: every block ranks the whole mask and takes an equal share
of the active neurons (four warps per neuron for the gate/up rows), adds their down rows
into a float32 accumulator (on sm_90+ summed over thread-block clusters of two first), and
the last block writes y. On the H200 (fp16, Mistral-7B layer, 90%, in a CUDA graph)
15.5-15.6 us, against 22.4-23.8 us for the two-launch rung kept as ``GIVEN1_KERNEL = "two"``
(``ffn_gateup_mask`` + ``ffn_down_rows_out``) and 38 us for ``ffn_fused``; with every
neuron in the mask 98 us (torch's cuBLAS dense FFN: 101-103 us).

The three-launch path (``ffn_gate`` / ``ffn_up`` / ``ffn_down``, :func:`_plan`,
:func:`_launch`) stays selectable (``SPARSE_KERNEL = "split"``): it is the faster one
inside a CUDA graph, where launches cost little (measurements at ``SPARSE_KERNEL``).

Two ways in:

* :func:`ffn` through :func:`minisparse.sparse_ffn` (NumPy or CuPy arrays; a fresh result
  per call). Validation is done once per set of weight buffers and shapes (cached by
  pointers, shapes and dtypes), plans are cached, and nothing synchronises with the host
  unless ``stats`` is asked for.
* :func:`ffn_device`, the sync-free launch for CUDA graphs and decode engines: CuPy arrays
  only, no host synchronisation and no allocation after its first call for given shapes
  and pointers.

Weights: float16, float32 or float64 (float16 accumulates in float32; x may then be
float16 or float32). Keep the weights on the device (``cupy.asarray`` once): NumPy weights
are copied on every call. For T > 8 tokens without a predictor the FFN runs dense
(cuBLAS), as skipping would then read most rows anyway; otherwise tokens are processed 8
at a time.

``stats`` costs one device-to-host read of the kept-neuron count (a synchronisation);
pass ``stats=None`` when timing.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from ..activations import Activation, get_activation
from .base import activation_codes, check_inputs, cuda_activation_source, is_device_array

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
COMPILE_NOTES: list = []


def cuda_source() -> str:
    """The CUDA source of the kernels: the shared activation definitions + ``sparse_ffn.cu``."""
    with open(_SRC_PATH) as fh:
        return cuda_activation_source() + fh.read()
_WORKSPACES: Dict[tuple, dict] = {}


def _kernels(wdt: np.dtype, xdt: np.dtype) -> dict:
    """Compiled kernels for (weight dtype, x dtype), one RawModule per pair (NVRTC, cached).

    The float4 atomics of ffn_fused need sm_90 and a CUDA 12.1+ NVRTC; if that build fails,
    the kernels are rebuilt with scalar atomics (``COMPILE_NOTES`` says so)."""
    key = (wdt, xdt)
    if key not in _MODULES:
        src = cuda_source()
        W, X = _CTYPE[wdt], _CTYPE[xdt]
        names = {}
        for tt in TOKEN_TILES:
            names[("gate", tt)] = f"ffn_gate<{W}, {X}, {tt}>"
            names[("up", tt)] = f"ffn_up<{W}, {X}, {tt}>"
            names[("down", tt)] = f"ffn_down<{W}, {tt}>"
            names[("fused", tt)] = f"ffn_fused<{W}, {X}, {tt}>"
        try:
            mod = cp.RawModule(code=src, options=("-std=c++17",), name_expressions=list(names.values()))
            fns = {k: mod.get_function(v) for k, v in names.items()}
        except Exception as e:  # cupy.cuda.compiler.CompileException
            COMPILE_NOTES.append(f"vector atomics unavailable ({type(e).__name__}); scalar atomics used")
            mod = cp.RawModule(code=src, options=("-std=c++17", "-DMINISPARSE_NO_VEC_ATOMICS"),
                               name_expressions=list(names.values()))
            fns = {k: mod.get_function(v) for k, v in names.items()}
        _MODULES[key] = fns
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



# ------------------------------------------------------------------------------------
# the fused path: ONE launch per token tile (ffn_fused), planned once per weight set
# ------------------------------------------------------------------------------------
# sparse_ffn's sparse path: "fused" (one launch, ffn_fused) or "split" (ffn_gate / ffn_up /
# ffn_down). Both pass tests/backends/test_gpu_kernels.py on the H200 (148 passed,
# 2026-12-01). Measured there side by side (Mistral-7B layer, 90%, float16,
# bench/results/h200_targets/): called eagerly from Python, as sparse_ffn is, fused skips at
# 2.43x over cuBLAS (split 1.28x: its three launches cost more than the bytes saved); inside a
# CUDA graph split is faster (2.19x / 4.20x given active vs fused 1.78x / 2.64x). sparse_ffn
# is the eager entry point, so "fused" is its default; graph users call ffn_device or
# GraphDecoder. ffn_device always uses "fused".
SPARSE_KERNEL = "fused"
FUSED_BLOCKS_PER_SM = 2         # ffn_fused grid ~ this many blocks per multiprocessor
_FUSED_MAX_PER_BLOCK = 512      # neurons per block (bounds the shared list)
_FUSED_PLANS: Dict[tuple, dict] = {}
_FUSED_WS: Dict[tuple, dict] = {}


# ------------------------------------------------------------------------------------
# one token given a mask: the decode kernels (decode.cu), one launch (or the two-launch rung)
# ------------------------------------------------------------------------------------
GIVEN1 = True                   # batch 1 + active mask: the decode kernels (see _given1)
GIVEN1_KERNEL = "one"           # "one": ffn_given1 (one launch); "two": ffn_gateup_mask + ffn_down_rows_out
GIVEN1_WARPS = 32               # warps per block of ffn_given1 (16 or 32; 32 measured faster on the H200)
GIVEN1_BLOCKS_PER_SM = 1        # its grid: this many blocks per multiprocessor
GIVEN1_SLICES = 1               # its float32 accumulators: block b adds into slice b % this (1..8; 1 measured fastest)
GIVEN1_CLUSTER = "auto"         # blocks per thread-block cluster: 1, 2 or 4 (sm_90+: the cluster sums its partial y in
                                # distributed shared memory first); "auto": 2 on sm_90+ (H200 fp16: 15.5-15.6 against
                                # 16.7-19.4 us, 3 rounds), else 1
GIVEN1_DRIVER_LAUNCH = True    # launch ffn_given1 through cuLaunchKernel on argument slots built once (host time)
_GIVEN1_MAX_SLICES = 8
_GIVEN1_WS: Dict[tuple, dict] = {}


def _given1_codes(xd, wg, act: Activation, skip: float):
    """The parts of :func:`_given1_ok` that depend only on shapes, dtypes and the activation:
    the activation's kernel codes, or None. One token ((D,) or (1, D)), no threshold, float16
    weights with float16/float32 x or float32 weights and x, rows of whole 16-byte vectors,
    a compiled activation."""
    if skip != 0.0 or not (xd.ndim == 1 or (xd.ndim == 2 and xd.shape[0] == 1)):
        return None
    wdt, xdt = np.dtype(wg.dtype), np.dtype(xd.dtype)
    if not ((wdt == np.float16 and xdt in (np.float16, np.float32)) or (wdt == np.float32 and xdt == np.float32)):
        return None
    if xd.shape[-1] % (16 // wdt.itemsize):
        return None
    try:
        return activation_codes(act, NAME)
    except ValueError:
        return None


def _given1_ok(xd, wg, wu, wd, act: Activation, skip: float, mask) -> bool:
    """Whether the given-mask path of :func:`_given1` can run this call (the callers also ask
    ``GIVEN1``): :func:`_given1_codes`, a mask, and 16-byte aligned buffers."""
    return mask is not None and _given1_codes(xd, wg, act, skip) is not None and _aligned(xd, wg, wu, wd)


def _given1(xd, wg, wu, wd, act: Activation, mask, out, codes=None) -> dict:
    """y = FFN(x) over the masked-in neurons, one token, into ``out`` (x's shape and dtype).

    ``GIVEN1_KERNEL = "one"`` (default): ``ffn_given1``, one launch (each block ranks the
    whole mask, takes an equal share of the active neurons, four warps per neuron for their
    gate/up rows, then their down rows into ``GIVEN1_SLICES`` float32 accumulators with
    float4 atomics; the last block writes their sum to ``out`` and leaves them zero).
    ``"two"`` (or a mask not 16-byte aligned, or a shape beyond the one-launch kernel):
    ``ffn_gateup_mask`` (each block compacts 32 mask entries) then ``ffn_down_rows_out``.
    ``mask``: (F,) CuPy uint8 or bool. No sync, no allocation after the first call for
    (device, stream, D, F, weight dtype). ``codes``: the activation's kernel codes when the
    caller has them. Returns the workspace (``cnt[2]``: the neurons of the last call)."""
    D, F = int(xd.shape[-1]), int(wg.shape[0])
    stream = cp.cuda.get_current_stream().ptr
    key = (cp.cuda.runtime.getDevice(), stream, D, F, wg.dtype.char)   # the grid depends on the dtype
    ws = _GIVEN1_WS.get(key)
    if ws is None:
        from . import decode_cuda
        V16 = 16 // wg.dtype.itemsize
        ncol = -(-D // (32 * V16 * decode_cuda.NV))
        ws = dict(y32=cp.zeros(_GIVEN1_MAX_SLICES * D, dtype=cp.float32), cnt=cp.zeros(3, dtype=cp.int32),
                  idx=cp.zeros(F, dtype=cp.int32), hv=cp.zeros(F, dtype=cp.float32), ncol=ncol,
                  G=max(1, min(-(-decode_cuda.DOWN_BLOCKS_PER_SM * _sm_count() // ncol), -(-F // _WARPS))))
        if len(_GIVEN1_WS) > 64:
            _GIVEN1_WS.clear()
        _GIVEN1_WS[key] = ws
    if codes is None:
        codes = activation_codes(act, NAME)
    setting = (GIVEN1_KERNEL, GIVEN1_WARPS, GIVEN1_BLOCKS_PER_SM, GIVEN1_SLICES, GIVEN1_CLUSTER, xd.dtype.char, codes,
               act.gated)
    one = ws.get(setting)
    if one is None:                                       # the launch, less its buffers (cached: host time)
        from . import decode_cuda
        one = ws[setting] = _given1_grid(D, F, wg.dtype.itemsize)
        if one["pv"]:
            xs = "_xf16" if xd.dtype == cp.float16 else "_xf32"
            cl = f"_c{one['cl']}" if one["cl"] > 1 else ""
            one.update(fn=decode_cuda.kernels(wg.dtype)[f"ffn_given1{cl}{xs}_w{GIVEN1_WARPS}_p{one['pv']}"],
                       grid=(one["G"],), block=(32 * GIVEN1_WARPS,),
                       consts=(np.int32(D), np.int32(F), np.int32(codes[0]), np.int32(codes[1]),
                               np.float32(codes[2]), np.int32(bool(act.gated)), np.int32(GIVEN1_SLICES)))
    if one["pv"] and mask.data.ptr % 16 == 0:
        raw = one.get("raw")
        if raw is None and GIVEN1_DRIVER_LAUNCH:
            raw = one["raw"] = _given1_slots(one, ws)
        if raw and GIVEN1_DRIVER_LAUNCH:                  # the driver's launch on slots filled once
            slots = raw["slots"]
            with raw["lock"]:
                slots[0] = wg.data.ptr
                slots[1] = (wg if wu is None else wu).data.ptr
                slots[2] = wd.data.ptr
                slots[3] = xd.data.ptr
                slots[6] = mask.data.ptr
                slots[13] = out.data.ptr
                cp.cuda.driver.launchKernel(raw["f"], one["G"], 1, 1, one["block"][0], 1, 1, one["smem"], stream,
                                            raw["params"], 0)
            return ws
        d, f, gk, uk, thr, gated, nslice = one["consts"]
        one["fn"](one["grid"], one["block"],
                  (wg, wg if wu is None else wu, wd, xd, d, f, mask, gk, uk, thr, gated, ws["y32"], nslice, out,
                   ws["cnt"]),
                  shared_mem=one["smem"])
        return ws
    from . import decode_cuda
    k = decode_cuda.kernels(wg.dtype)
    xs = "_xf16" if xd.dtype == cp.float16 else "_xf32"
    gk, uk, thr = codes
    i32 = np.int32
    k["ffn_gateup_mask" + xs]((-(-F // 32),), (32 * _WARPS,),
                              (wg, wg if wu is None else wu, xd, i32(D), i32(F), mask, i32(gk), i32(uk),
                               np.float32(thr), i32(bool(act.gated)), ws["cnt"], ws["idx"], ws["hv"]))
    k["ffn_down_rows_out" + xs]((ws["ncol"], ws["G"]), (32 * _WARPS,),
                                (ws["cnt"], ws["idx"], ws["hv"], wd, i32(D), ws["y32"], out, i32(D)))
    return ws


def _given1_slots(one: dict, ws: dict):
    """ffn_given1's 15 kernel arguments as 8-byte slots for ``cuLaunchKernel``, with the
    constants and the workspace pointers filled in once: a call then writes the six pointers
    that change (wg, wu, wd, x, mask, out: slots 0-3, 6, 13) and launches (a CuPy ``RawKernel`` call converts all 15
    arguments every time: ~10 us of Python on a slow host). False where the driver's launch
    is not exposed (the fake CuPy of the CPU tests)."""
    import threading
    drv = getattr(cp.cuda, "driver", None)
    if drv is None or not hasattr(drv, "launchKernel"):
        return False
    slots = np.zeros(15, dtype=np.uint64)
    as_i32, as_f32 = slots.view(np.int32), slots.view(np.float32)   # a 4-byte argument: the slot's low half
    d, f, gk, uk, thr, gated, nslice = one["consts"]
    for i, v in ((4, d), (5, f), (7, gk), (8, uk), (10, gated), (12, nslice)):
        as_i32[2 * i] = v
    as_f32[2 * 9] = thr
    slots[11], slots[14] = ws["y32"].data.ptr, ws["cnt"].data.ptr
    params = np.array([slots.ctypes.data + 8 * i for i in range(15)], dtype=np.uint64)   # void *args[15]
    return dict(slots=slots, params=int(params.ctypes.data), keep=params, f=one["fn"].kernel.ptr,
                lock=threading.Lock())


def _given1_grid(D: int, F: int, wbytes: int) -> dict:
    """ffn_given1's launch shape: G blocks of 32 * GIVEN1_WARPS threads, PV column vectors per
    thread (0: D too wide for the instantiated PV, or GIVEN1_KERNEL = "two": the two-launch
    path), dynamic shared memory for ceil(F / G) neuron slots (an id, h, 8 partial dots)."""
    from . import decode_cuda
    if GIVEN1_KERNEL not in ("one", "two"):
        raise ValueError(f"GIVEN1_KERNEL must be 'one' or 'two', got {GIVEN1_KERNEL!r}")
    if GIVEN1_KERNEL == "two":
        return dict(pv=0)
    if not (isinstance(GIVEN1_SLICES, int) and 1 <= GIVEN1_SLICES <= _GIVEN1_MAX_SLICES):
        raise ValueError(f"GIVEN1_SLICES must be an int in [1, {_GIVEN1_MAX_SLICES}], got {GIVEN1_SLICES!r}")
    if GIVEN1_WARPS not in decode_cuda.GIVEN1_WARPS:
        raise ValueError(f"GIVEN1_WARPS must be one of {decode_cuda.GIVEN1_WARPS}, got {GIVEN1_WARPS!r}")
    CL, auto = GIVEN1_CLUSTER, GIVEN1_CLUSTER == "auto"
    if auto:
        CL = 2 if (GIVEN1_WARPS == decode_cuda.GIVEN1_CLUSTER_WARPS
                   and int(cp.cuda.Device().compute_capability) >= 90) else 1
    if (type(CL) is not int or CL not in (1,) + decode_cuda.GIVEN1_CLUSTERS
            or (CL > 1 and GIVEN1_WARPS != decode_cuda.GIVEN1_CLUSTER_WARPS)):
        raise ValueError(f"GIVEN1_CLUSTER must be 'auto', 1 or one of {decode_cuda.GIVEN1_CLUSTERS} (with GIVEN1_WARPS = "
                         f"{decode_cuda.GIVEN1_CLUSTER_WARPS}), got {CL!r} with GIVEN1_WARPS = {GIVEN1_WARPS}")
    if CL > 1 and int(cp.cuda.Device().compute_capability) < 90:
        raise ValueError(f"GIVEN1_CLUSTER = {CL} needs thread-block clusters (compute capability 9.0+); set it to 1")
    def layout(cl):                                        # blocks (whole clusters), shared memory bytes
        G = max(cl, max(1, GIVEN1_BLOCKS_PER_SM * _sm_count()) // cl * cl)
        kmax = -(-F // G)                                  # the block's neuron ids, their h, 8 partial dots,
        return G, (40 * kmax if cl == 1 else 4 * ((10 * kmax + 3) // 4 * 4 + D))   # [+ its partial y, aligned]
    G, smem = layout(CL)
    if auto and CL > 1 and smem > 46 * 1024:               # too wide for a cluster's exchange: no cluster
        CL = 1
        G, smem = layout(CL)
    NT = 32 * GIVEN1_WARPS
    nvec = D // (16 // wbytes)
    need = -(-nvec // NT)
    pv = next((p for p in decode_cuda.GIVEN1_PV if p >= need), 0)
    if smem > 46 * 1024:                                   # beyond the default shared memory: two launches
        pv = 0
    return dict(G=G, pv=pv, smem=smem, cl=CL)


def _fused_workspace(D: int, acc: np.dtype) -> dict:
    """Per (device, stream, D, acc dtype): the accumulator (8, D), all zero between launches,
    and the counters [blocks done, kept running sum, kept of the last launch]. Launches on
    one stream run in order, so every plan of that stream shares them."""
    key = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr, D, acc)
    ws = _FUSED_WS.get(key)
    if ws is None:
        ws = dict(acc=cp.zeros((TOKEN_TILES[-1], D), dtype=acc), counters=cp.zeros(3, dtype=cp.uint32),
                  no_mask=cp.zeros(1, dtype=cp.uint8))
        _FUSED_WS[key] = ws
    return ws


def _fused_plan(T: int, D: int, F: int, wdt: np.dtype, xdt: np.dtype, gated: bool, act: Activation, skip: float,
                predicted: bool, aligned: bool) -> dict:
    """Kernels, grids, shared memory and scalar arguments of ffn_fused for every token tile."""
    gk, uk, act_thr = activation_codes(act, NAME)
    acc = np.dtype(np.float64) if wdt == np.float64 else np.dtype(np.float32)
    A, i32 = acc.type, np.int32
    k = _kernels(wdt, xdt)
    sm = _sm_count()
    per_block = max(1, min(_FUSED_MAX_PER_BLOCK, -(-F // (FUSED_BLOCKS_PER_SM * sm))))
    blocks = -(-F // per_block)
    vec_ok = aligned and (D * wdt.itemsize) % 16 == 0 and (D * xdt.itemsize) % 16 == 0
    base = (1 if gated else 0) | (2 if predicted else 0)
    tiles = []
    for t0 in range(0, T, TOKEN_TILES[-1]):
        t1 = min(T, t0 + TOKEN_TILES[-1])
        tt = 1 if t1 - t0 == 1 else TOKEN_TILES[-1]
        tiles.append(dict(
            t0=t0, t1=t1, kernel=k[("fused", tt)], smem=per_block * (tt * acc.itemsize + 4),
            args={v: (i32(t1 - t0), i32(D), i32(F), i32(per_block), i32(gk), i32(uk), A(act_thr), A(skip),
                      i32(base | (4 if v else 0)))
                  for v in ((True, False) if vec_ok else (False,))}))
    ws = _fused_workspace(D, acc)
    return dict(tiles=tiles, grid=(blocks,), block=(32 * _WARPS,), ws=ws, acc=acc, vec_ok=vec_ok, T=T, D=D, F=F,
                xdt=xdt, itemsize=xdt.itemsize)


def _fused_launch(plan: dict, x, wg, wu, wd, mask, out) -> None:
    """Issue ffn_fused for each token tile: out (T, D) in x's dtype. No sync, no allocation
    when T <= 8 (larger T slices x and out: views, no device memory)."""
    ws = plan["ws"]
    m = ws["no_mask"] if mask is None else mask
    wu = wg if wu is None else wu
    one = len(plan["tiles"]) == 1
    for tile in plan["tiles"]:
        xt = x if one else x[tile["t0"]:tile["t1"]]
        ot = out if one else out[tile["t0"]:tile["t1"]]
        v = plan["vec_ok"] and xt.data.ptr % 16 == 0
        tile["kernel"](plan["grid"], plan["block"], (xt, wg, wu, wd, m) + tile["args"][v] + (ws["acc"], ot, ws["counters"]),
                       shared_mem=tile["smem"])


def _check_mask(active, F: int):
    """A device mask of length F as uint8 (a view: no copy, no sync)."""
    if not (isinstance(active, cp.ndarray) and active.ndim == 1 and active.shape[0] == F
            and active.dtype in (cp.bool_, cp.uint8)):
        raise TypeError(f"active must be a CuPy bool or uint8 mask of shape ({F},) here, got "
                        f"{type(active).__name__} {getattr(active, 'dtype', '')} {getattr(active, 'shape', '')}; "
                        "build it once, e.g. cupy.zeros(ffn_dim, dtype=cupy.bool_)")
    if not active.flags.c_contiguous:
        raise ValueError("active must be C-contiguous")
    return active.view(cp.uint8) if active.dtype == cp.bool_ else active


_DEVICE_PLANS: Dict[tuple, dict] = {}


def _act_of(act) -> Activation:
    return act if isinstance(act, Activation) else get_activation(act)


def ffn_device(x, w_gate, w_up, w_down, act, *, active=None, out=None, threshold=None):
    """The sync-free FFN launch for CUDA graphs: ``y = down(act(gate(x), up(x)))`` skipping
    neurons, as :func:`minisparse.sparse_ffn` with ``backend="cupy"`` computes it.

    A stable internal entry point for decode engines (``minisparse.kernels.decode_cuda``):
    after the **first** call for given shapes, dtypes and buffer pointers (which validates
    the inputs, compiles the kernels and allocates the workspace), a call does **no host
    synchronisation and no device allocation**: one ``ffn_fused`` launch per 8 tokens on
    the current stream (one token with ``active``: the one launch of :func:`_given1`),
    so it can be captured in a CUDA graph (make the first call before capturing). Values
    of every buffer may change between calls; pointers and shapes are
    the cache key.

    Parameters
    ----------
    x : (T, D) CuPy array, C-contiguous; float16 or float32 for float16 weights, else the
        weights' dtype.
    w_gate, w_up, w_down : (F, D) CuPy arrays, C-contiguous, one dtype (float16/32/64);
        ``w_up`` None for plain activations.
    act : activation name or :class:`~minisparse.activations.Activation` (not custom).
    active : None (skip neurons whose gate activation is zero, the gate read in full), or a
        (F,) CuPy ``bool``/``uint8`` mask of the neurons to compute (a predictor's choice:
        only their rows of the three matrices are read).
    out : None, or a (T, D) C-contiguous CuPy array of x's dtype to write y into. With None
        the result goes to a buffer owned by the cached plan, **overwritten by the next call
        with the same plan** (copy it if you keep it).
    threshold : None or float >= 0: skip neurons with ``|a(g)| <= threshold`` (CATS).

    Returns
    -------
    y : (T, D) CuPy array of x's dtype (``out`` when given).

    Launches that run on one stream share a workspace (an accumulator that each launch
    leaves zero); do not run two of them concurrently on different streams of one plan.
    """
    key = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr, x.shape, x.strides, x.dtype.char,
           w_gate.data.ptr, w_gate.shape, w_gate.dtype.char, w_gate.strides,
           None if w_up is None else (w_up.data.ptr, w_up.shape, w_up.dtype.char, w_up.strides),
           w_down.data.ptr, w_down.shape, w_down.dtype.char, w_down.strides, act, threshold, active is None)
    plan = _DEVICE_PLANS.get(key)
    if plan is None:
        plan = _device_plan(x, w_gate, w_up, w_down, act, active, threshold)
        if len(_DEVICE_PLANS) > 1024:
            _DEVICE_PLANS.clear()
        _DEVICE_PLANS[key] = plan
    mask = None if active is None else _check_mask(active, plan["F"])
    if out is None:
        out = plan["out"]
    elif not (isinstance(out, cp.ndarray) and out.shape == x.shape and out.dtype == x.dtype and out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous CuPy array of shape {x.shape} and dtype {x.dtype}")
    if GIVEN1 and plan["given1"] and x.data.ptr % 16 == 0 and out.data.ptr % 16 == 0:
        _given1(x, w_gate, w_up, w_down, plan["act"], mask, out)
    else:
        _fused_launch(plan, x, w_gate, w_up, w_down, mask, out)
    return out


def _device_plan(x, w_gate, w_up, w_down, act, active, threshold) -> dict:
    """First call of ffn_device for this key: validate everything, then plan (may allocate)."""
    for name, a in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if a is not None and not isinstance(a, cp.ndarray):
            raise TypeError(f"ffn_device takes CuPy arrays; {name} is {type(a).__name__} (use cupy.asarray once)")
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"ffn_device: {name} must be C-contiguous (cupy.ascontiguousarray once)")
    if x.ndim != 2:
        raise ValueError(f"ffn_device: x must be (tokens, dim), got shape {x.shape}")
    a = _act_of(act)
    info = check_inputs(x, w_gate, w_up, w_down, a, threshold=threshold, weight_dtypes=WEIGHT_DTYPES, backend=NAME)
    T, D, F = info["T"], info["D"], info["F"]
    skip = 0.0 if info["threshold"] is None else info["threshold"]
    plan = _fused_plan(T, D, F, np.dtype(w_gate.dtype), np.dtype(x.dtype), bool(a.gated), a, skip,
                       active is not None, _aligned(w_gate, w_up, w_down))
    plan["out"] = cp.empty((T, D), dtype=x.dtype)
    plan["act"] = a
    plan["given1"] = _given1_ok(x, w_gate, w_up, w_down, a, skip, active)   # GIVEN1 is asked per call
    return plan


# ------------------------------------------------------------------------------------
# the backend entry points
# ------------------------------------------------------------------------------------
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
        y = _dense(xd, wg, wu, wd, act, gk, uk, act_thr, skip, acc).astype(xd.dtype, copy=False)   # (T, D)
        path, n_active = "dense", F
    else:
        mask = _mask_from_active(active, F) if active is not None else None
        if GIVEN1 and _given1_ok(xd, wg, wu, wd, act, skip, mask):
            y = cp.empty((1, D), dtype=xd.dtype)
            ws = _given1(xd, wg, wu, wd, act, mask, y)
            n_active = None if stats is None else int(ws["cnt"][2].get())      # the one sync
        elif SPARSE_KERNEL == "split":
            y, n_active = _split_ffn(xd, wg, wu, wd, act, skip, mask, stats)
        else:
            y, n_active = _fused_ffn(xd, wg, wu, wd, act, skip, mask, stats)
        path = "sparse"
    if stats is not None:
        stats.update(path=path, n_active=n_active)
    return cp.asnumpy(y) if on_host else y


def _fused_ffn(xd, wg, wu, wd, act, skip, mask, stats):
    """One ffn_fused launch per 8 tokens into a fresh y (T, D) of x's dtype."""
    T, D = xd.shape
    F = wg.shape[0]
    key = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr, T, D, F, xd.dtype.char, wg.dtype.char,
           _aligned(wg, wu, wd), act.name, bool(act.gated), skip, mask is not None, FUSED_BLOCKS_PER_SM)
    plan = _FUSED_PLANS.get(key)
    if plan is None:
        if len(_FUSED_PLANS) > 256:
            _FUSED_PLANS.clear()
        plan = _fused_plan(T, D, F, np.dtype(wg.dtype), np.dtype(xd.dtype), bool(act.gated), act, skip,
                           mask is not None, _aligned(wg, wu, wd))
        _FUSED_PLANS[key] = plan
    y = cp.empty((T, D), dtype=xd.dtype)                              # (T, D)
    if stats is None or len(plan["tiles"]) <= 1:
        _fused_launch(plan, xd, wg, wu, wd, mask, y)
        n_active = None if (stats is None or T == 0) else int(plan["ws"]["counters"][2].get())   # the one sync
        return y, n_active
    counts = []
    for tile in plan["tiles"]:                                        # stats with T > 8: count per tile
        sub = dict(plan, tiles=[dict(tile, t0=0, t1=tile["t1"] - tile["t0"])])
        _fused_launch(sub, xd[tile["t0"]:tile["t1"]], wg, wu, wd, mask, y[tile["t0"]:tile["t1"]])
        counts.append(int(plan["ws"]["counters"][2].get()))
    stats["tiles"] = len(counts)
    return y, max(counts)


def _split_ffn(xd, wg, wu, wd, act, skip, mask, stats):
    """The three-launch path (ffn_gate / ffn_up / ffn_down), kept for comparison."""
    T, D = xd.shape
    counts = []
    y = None
    for t0 in range(0, T, 8):                                         # token tiles of <= 8
        t1 = min(T, t0 + 8)
        xt = xd if (t0 == 0 and t1 == T) else xd[t0:t1]
        plan = _plan(xt, wg, wu, wd, act, skip, mask is not None)
        if y is None:
            y = cp.empty((T, D), dtype=plan["acc"])                   # (T, D), zeroed by ffn_gate
        cnt = _launch(plan, xt, wg, wu, wd, mask, y if (t0 == 0 and t1 == T) else y[t0:t1])
        if stats is not None:
            counts.append(int(cnt.get()[0]))                          # one sync per tile
    if len(counts) > 1:
        stats["tiles"] = len(counts)
    if y is None:                                                     # T == 0
        y = cp.empty((0, D), dtype=xd.dtype)
    return y.astype(xd.dtype, copy=False), (max(counts) if counts else None)


# ------------------------------------------------------------------------------------
# sparse_ffn's front door for this backend: validation once per weight set
# ------------------------------------------------------------------------------------
_VALIDATED: Dict[tuple, tuple] = {}


def _sig(a):
    """What validation depends on (not the pointer: a new x every decode step still hits)."""
    return None if a is None else (a.shape, a.strides, a.dtype.char)


def sparse_ffn_cached(x, w_gate, w_up, w_down, activation, *, active=None, threshold=None, stats=None):
    """:func:`minisparse.sparse_ffn` for this backend, validating once per set of buffers.

    When x and the weights are CuPy arrays, the arguments' shapes, strides and dtypes
    (with the activation and threshold) key a cache of validated calls: a repeated
    call skips :func:`~minisparse.kernels.base.check_inputs` (its checks depend on nothing
    else). ``active`` is checked on every call. Anything else takes the full path.
    """
    if not (isinstance(x, cp.ndarray) and isinstance(w_gate, cp.ndarray) and isinstance(w_down, cp.ndarray)
            and (w_up is None or isinstance(w_up, cp.ndarray))):
        return None
    try:
        key = (_sig(x), _sig(w_gate), _sig(w_up), _sig(w_down), activation, threshold)
        hit = _VALIDATED.get(key)
    except TypeError:                                                 # an unhashable argument
        return None
    if hit is None:
        act = _act_of(activation)
        info = check_inputs(x, w_gate, w_up, w_down, act, active=None, threshold=threshold,
                            weight_dtypes=WEIGHT_DTYPES, backend=NAME)
        if len(_VALIDATED) > 4096:
            _VALIDATED.clear()
        codes = None                                              # the lean given path: contiguous buffers
        if all(a is None or a.flags.c_contiguous for a in (x, w_gate, w_up, w_down)):   # (strides are in the key)
            codes = _given1_codes(x, w_gate, act, 0.0 if info["threshold"] is None else info["threshold"])
        hit = _VALIDATED[key] = (act, info["threshold"], info["T"], info["D"], info["F"], codes)
    act, thr, T, D, F, codes = hit
    if (codes is not None and GIVEN1 and stats is None and isinstance(active, cp.ndarray)
            and active.dtype.char == "?" and active.shape == (F,) and active.strides == (1,)
            and (x.data.ptr | w_gate.data.ptr | w_down.data.ptr | (0 if w_up is None else w_up.data.ptr)) % 16 == 0):
        y = cp.empty(x.shape, dtype=x.dtype)                      # one token, a device mask: the lean path
        _given1(x, w_gate, w_up, w_down, act, active, y, codes)   # (the kernel reads the bool bytes as uint8)
        return y
    if active is not None:
        from .base import _check_active
        active = _check_active(active, F, True)
    if stats is not None:
        stats.update(backend=NAME, ffn_dim=F, tokens=T, predicted=active is not None)
    x2 = x.reshape(1, D) if x.ndim == 1 else x
    y = ffn(x2, w_gate, w_up, w_down, act, active=active, threshold=thr, stats=stats)
    if stats is not None and isinstance(stats.get("n_active"), int):
        stats["fraction"] = stats["n_active"] / F
    return y.reshape(x.shape)
