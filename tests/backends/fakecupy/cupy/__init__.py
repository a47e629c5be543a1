"""A NumPy-backed stand-in for the parts of CuPy that ``minisparse.kernels.cupy_`` uses,
with NumPy emulations of the ``ffn_fused`` kernel (and of decode.cu's ``ffn_given1``,
``ffn_gateup_mask`` and ``ffn_down_rows_out``, the one-token given paths) that read their arguments in the order
``sparse_ffn.cu`` declares them and checks the launch's invariants (shared-memory size,
grid covering F, accumulator and counters zero on entry). It tests the backend's host
logic (plans, caches, tiling, masks, stats) where no GPU is present; the kernel itself is
tested on a GPU by test_gpu_kernels.py. Only ever imported by test_cupy_host_logic.py, in
a subprocess."""
import numpy as _np
from numpy import bool_, uint8, int32, int64, float16, float32, float64, uint32  # noqa

class _Ptr:
    def __init__(self, p): self.ptr = p

class ndarray(_np.ndarray):
    @property
    def data(self): return _Ptr(self.ctypes.data)
    @property
    def __cuda_array_interface__(self): return {}
    def get(self): return _np.asarray(self).copy()
    def __getitem__(self, k):
        r = super().__getitem__(k)
        return _np.asarray(r).view(ndarray) if isinstance(r, _np.generic) else r

def _w(a): return _np.asarray(a).view(ndarray)
def asarray(a, dtype=None): return _w(_np.array(a, dtype=dtype, copy=True)) if not isinstance(a, ndarray) else a
def ascontiguousarray(a): return _w(_np.ascontiguousarray(a))
def asnumpy(a): return _np.asarray(a).copy()
def zeros(shape, dtype=float): return _w(_np.zeros(shape, dtype))
def empty(shape, dtype=float): return _w(_np.full(shape, _np.nan, dtype) if _np.dtype(dtype).kind == "f" else _np.zeros(shape, dtype))
def empty_like(a): return empty(a.shape, a.dtype)
def arange(*a, **k): return _w(_np.arange(*a, **k))

CALLS = []

def _act(v, kind, thr):
    if kind == 0: return _np.where((v > thr) | ((thr == 0) & _np.isnan(v)), v, 0)
    if kind == 2: return v / (1 + _np.exp(-v))
    if kind == 5: return v
    raise NotImplementedError(kind)

def _wtype(name):                  # the weight type of a decode.cu template: itemsize
    return 2 if name.split("<")[1].startswith("unsigned short") else 4

def _gateup_mask(name, grid, block, args):
    """decode.cu ffn_gateup_mask: the masked-in neurons' h, appended at slots cnt[0]++."""
    wg, wu, x, ld, F, m, gk, uk, thr, gated, cnt, idx, hv = args
    ld, F, gk, uk, gated = map(int, (ld, F, gk, uk, gated))
    assert block == (256,) and grid == ((F + 31) // 32,), (grid, F)
    assert x.shape[-1] == ld and wg.shape == (F, ld) and m.dtype in (_np.uint8, _np.bool_) and m.shape == (F,)
    assert isinstance(thr, _np.float32) and int(cnt[0]) == 0 and int(cnt[1]) == 0, (cnt, thr)
    xs = _np.asarray(x, dtype=_np.float32).reshape(-1)
    for f in range(F):
        if not m[f]: continue
        v = _act(_np.float32(xs @ _np.asarray(wg[f], _np.float32)), gk, thr)
        if gated: v = v * _act(_np.float32(xs @ _np.asarray(wu[f], _np.float32)), uk, thr)
        j = int(cnt[0]); idx[j] = f; hv[j] = v; cnt[0] = j + 1

def _down_rows_out(name, grid, block, args):
    """decode.cu ffn_down_rows_out: only the columns its grid covers (ncol blocks of 32 lanes x
    16-byte vectors x NV = 2), so a grid planned for another weight type shows."""
    cnt, idx, hv, wd, ld, y32, out, D = args
    ld, D = int(ld), int(D)
    assert block == (256,) and len(grid) == 2 and grid[1] >= 1
    assert y32.dtype == _np.float32 and not y32.any() and int(cnt[1]) == 0
    cols = min(ld, grid[0] * 32 * (16 // _wtype(name)) * 2)
    n = int(cnt[0])
    for j in range(n):
        y32[:cols] += _np.float32(hv[j]) * _np.asarray(wd[int(idx[j]), :cols], _np.float32)
    out[...] = y32[:D].astype(out.dtype).reshape(out.shape)
    y32[...] = 0
    cnt[2], cnt[0], cnt[1] = n, 0, 0

def _given1(name, grid, block, args, shared_mem):
    """decode.cu ffn_given1 (one launch): only the columns its threads cover (PV vectors of
    32 * NW threads), so a too small PV shows; the accumulator and ticket zero on entry."""
    wg, wu, wd, x, ld, F, m, gk, uk, thr, gated, y32, nslice, out, cnt = args
    ld, F, gk, uk, gated, nslice = map(int, (ld, F, gk, uk, gated, nslice))
    assert 1 <= nslice and y32.shape[0] >= nslice * ld, (nslice, y32.shape, ld)
    targs = [a.strip() for a in name.split("<")[1].rstrip(">").split(",")]
    W, X, NW, PV = targs[0], targs[1], int(targs[2]), int(targs[3])
    CL = int(targs[4]) if name.startswith("ffn_given1_cl<") else 1    # blocks per cluster
    V = 16 // _wtype(name)
    assert (W == "unsigned short") == (wg.dtype == _np.float16) and (X == "unsigned short") == (x.dtype == _np.float16)
    kmax = -(-F // grid[0])
    smem = 40 * kmax                                      # the block's neuron ids, their h, 8 partial dots
    if CL > 1:                                            # + the block's partial y, 16-byte aligned
        assert grid[0] % CL == 0, (grid, CL)
        smem = 4 * ((10 * kmax + 3) // 4 * 4 + ld)
    assert block == (32 * NW,) and len(grid) == 1 and shared_mem == smem, (name, grid, block, shared_mem, smem)
    assert x.shape[-1] == ld and wg.shape == (F, ld) and wd.shape == (F, ld) and m.dtype in (_np.uint8, _np.bool_) and m.shape == (F,)
    assert m.ctypes.data % 16 == 0 and isinstance(thr, _np.float32) and int(cnt[1]) == 0, (cnt, thr)
    assert y32.dtype == _np.float32 and not y32.any()
    cols = min(ld, PV * 32 * NW * V)
    xs = _np.asarray(x, dtype=_np.float32).reshape(-1)
    n = 0
    for f in _np.flatnonzero(m):
        v = _act(_np.float32(xs @ _np.asarray(wg[f], _np.float32)), gk, thr)
        if gated: v = v * _act(_np.float32(xs @ _np.asarray(wu[f], _np.float32)), uk, thr)
        q = n % min(nslice, grid[0])                       # (the kernel: block b into slice b % nslice)
        y32[q * ld:q * ld + cols] += _np.float32(v) * _np.asarray(wd[f, :cols], _np.float32)
        n += 1
    out[...] = y32[:nslice * ld].reshape(nslice, ld).sum(axis=0).astype(out.dtype).reshape(out.shape)
    y32[...] = 0
    cnt[2], cnt[0], cnt[1] = n, 0, 0

class _Kernel:
    def __init__(self, name): self.name = name
    def __call__(self, grid, block, args, shared_mem=0):
        CALLS.append(self.name)
        if self.name.startswith("ffn_gateup_mask"): return _gateup_mask(self.name, grid, block, args)
        if self.name.startswith("ffn_down_rows_out"): return _down_rows_out(self.name, grid, block, args)
        if self.name.startswith("ffn_given1"): return _given1(self.name, grid, block, args, shared_mem)
        assert self.name.startswith("ffn_fused"), self.name
        tt = int(self.name.rstrip(">").split(",")[-1])
        x, wg, wu, wd, m, T, D, F, P, gk, uk, athr, skip, flags, acc, out, cnt = args
        T, D, F, P, gk, uk, flags = map(int, (T, D, F, P, gk, uk, flags))
        assert isinstance(athr, _np.generic) and isinstance(skip, _np.generic)
        A = _np.float64 if wg.dtype == _np.float64 else _np.float32
        assert acc.dtype == A and athr.dtype == A and skip.dtype == A, (acc.dtype, athr.dtype)
        assert shared_mem == P * (tt * _np.dtype(A).itemsize + 4), (shared_mem, P, tt)
        assert grid[0] * P >= F > (grid[0] - 1) * P and block == (256,)
        assert T <= tt and x.shape == (T, D) and out.shape == (T, D) and not acc.any() and not cnt[:2].any()
        xs, wgf, wuf, wdf = (_np.asarray(a).astype(A) for a in (x, wg, wu, wd))
        n = 0
        for f in range(F):
            if (flags & 2) and not m[f]: continue
            a = _act(xs @ wgf[f], gk, athr)
            keep = ~(_np.abs(a) <= skip)
            if not keep.any(): continue
            h = _np.where(keep, a * _act(xs @ wuf[f], uk, athr), 0) if flags & 1 else _np.where(keep, a, 0)
            acc[:T] += (h[:, None] * wdf[f][None, :]).astype(A)
            n += 1
        out[...] = acc[:T].astype(out.dtype)
        acc[...] = 0
        cnt[2] = n

class RawModule:
    def __init__(self, code, options=(), name_expressions=()):
        assert ("ffn_fused" in code or "ffn_gateup_mask" in code) and "act_fn" in code
    def get_function(self, name): return _Kernel(name)

class _Stream:
    ptr = 0
class _Dev:
    id = 0
    compute_capability = "90"
class _Runtime:
    @staticmethod
    def getDeviceCount(): return 1
    @staticmethod
    def getDevice(): return 0
    @staticmethod
    def getDeviceProperties(i): return {"multiProcessorCount": 3}
class cuda:
    runtime = _Runtime
    @staticmethod
    def Device(): return _Dev()
    @staticmethod
    def get_current_stream(): return _Stream()
