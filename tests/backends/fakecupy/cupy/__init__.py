"""A NumPy-backed stand-in for the parts of CuPy that ``minisparse.kernels.cupy_`` uses,
with a NumPy emulation of the ``ffn_fused`` kernel that reads its arguments in the order
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

class _Kernel:
    def __init__(self, name): self.name = name
    def __call__(self, grid, block, args, shared_mem=0):
        CALLS.append(self.name)
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
        assert "ffn_fused" in code and "act_fn" in code
    def get_function(self, name): return _Kernel(name)

class _Stream:
    ptr = 0
class _Dev:
    id = 0
class _Runtime:
    @staticmethod
    def getDeviceCount(): return 1
    @staticmethod
    def getDeviceProperties(i): return {"multiProcessorCount": 3}
class cuda:
    runtime = _Runtime
    @staticmethod
    def Device(): return _Dev()
    @staticmethod
    def get_current_stream(): return _Stream()
