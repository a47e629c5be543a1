"""A batch-1 greedy decode step as one CUDA graph (the CUDA source is ``decode.cu`` beside this file).

The readable model (:class:`minisparse.Transformer` on CuPy arrays) decodes eagerly: a
32-layer step is hundreds of small launches, each costing ~6 us of Python and CuPy on the
host, more than the bytes of the weights take to read. :class:`GraphDecoder` issues the
same step as a fixed sequence of kernels that read the position and the token id from
device memory, captures that sequence once in a CUDA graph, and replays it per token::

    tokens[pos] -> embed -> per layer:  [rmsnorm +] q,k,v + rotary + KV write -> attention
                                        -> o-proj + residual -> [rmsnorm +] FFN + residual
                -> [rmsnorm +] LM head -> argmax -> tokens[pos + 1], pos += 1

Nothing crosses to the host until the end: the prompt and the generated tokens live in one
device array. CuPy cannot capture cuBLAS in a graph, so the matrix-vector products are
our own warp-per-row GEMV kernels (16-byte loads, float32 accumulation). RMSNorm is fused
into the GEMV that consumes it: every warp streams all of x for its dot product anyway, so
it also sums x^2 and scales its dot by rstd, and the norm's weight is folded into the weight
rows when they are copied (``w[:, d] * g[d]``, rounded once to ``weight_dtype``). A dense
layer is then five launches: q,k,v; attention; o-proj; gate+up; down. In the captured graph
they are programmatic dependent launches where that measured faster (``pdl``): a kernel
starts while the one before it ends, prefetches the start of its weight rows into L2, and
waits in ``pdl_wait()`` for that kernel's results.

FFN modes
---------
``"dense"``  every neuron, with the GEMV kernels (gate + up + activation fused, then down)
``"skip"``   neuron skipping: the gate is read in full; only neurons whose activation is
             nonzero read their up and down rows
``"given"``  a fixed active set per layer, passed as ``active=``: only those neurons' rows
             are read (with an exactly sparse model whose active set is known, this is the
             *oracle* upper bound of a predictor; label it so)

``sparse_kernel`` chooses the kernels of ``"skip"``/``"given"``: ``"decode"`` (default) the
kernels of ``decode.cu`` (skip: a pure gate pass that lists the nonzero neurons, their up
rows, then their down rows added straight into the residual stream; given: gate + up of
the listed neurons, then the down rows; ``select_kernel`` / ``list_kernel`` pick the
earlier rungs); ``"fused"`` the CuPy backend's one-launch
:func:`minisparse.kernels.cupy_.ffn_device`; ``"split"`` its gate/up/down launches. The
backend paths take a normed input, so they add an rmsnorm launch and a residual add.

Weights are the decoder's own copies in ``weight_dtype`` (float16: half weights, float32
activations and accumulation), rows padded with zeros to a multiple of 8 elements; the
model's parameters are only read at construction. Supported: dense (non-MoE) layers, the
activations the compiled kernels know (:func:`minisparse.kernels.base.activation_codes`),
GQA, tied or untied output, qkv bias (Qwen2), Gemma's norm offset and embedding scale.

Dimension keys: D dim, H heads, K kv heads, Dh head dim, F ffn neurons, V vocab, L layers,
S positions (max_len), A active neurons. ``*p`` = padded to a multiple of 8.

Examples
--------
>>> import numpy as np, cupy as cp, minisparse as ms                   # doctest: +SKIP
>>> model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0).to("cupy")
>>> dec = GraphDecoder(model, mode="skip", weight_dtype="float32")
>>> dec.generate([256, 104, 105], 8)                                   # greedy ids
"""
from __future__ import annotations

import ctypes
import math
import os
import warnings
from typing import Dict, Optional, Sequence

import numpy as np

from .. import layers as L
from .base import activation_codes, cuda_activation_source

MODES = ("dense", "skip", "given")
SPARSE_KERNELS = ("decode", "fused", "split")   # own kernels | cupy_.ffn_device | cupy_ gate/up/down
WEIGHT_DTYPES = {"float16": np.float16, "float32": np.float32}
PAD = 8                         # rows and vectors padded to a multiple of this many elements
ATTN_THREADS = 256              # threads of an attention block
ATTN_CHUNK = 32                 # keys per block of attn_decode_split (ACH in decode.cu)
ATTN_KERNELS = ("split_pre", "split", "split_pre_cl8", "split_pre_cl8w", "split_pre_clw", "block")
                                # attn_decode_split<PRE = true / false> (_cl8: attn_decode_split_cl, clusters
                                # of 8 chunks, sm_90; _cl8w: its merge with the chunk weights computed once;
                                # _clw: as _cl8w with clusters of as many chunks as max_len has, 2 to 8)
                                # | attn_decode
ATTN_CLUSTER = 8                # chunks per cluster of "split_pre_cl8" (at most 8: the portable cluster size)
ATTN_CLUSTERS = range(2, ATTN_CLUSTER + 1)   # "split_pre_clw": a cluster of min(8, chunks) chunks
ATTN_KERNEL = "split_pre_clw"   # H200, round 13, ms/token, split_pre -> split_pre_clw in one run (call 4): dense
                                # 3.670 -> 3.638, skip 2.154 -> 2.109, given 1.387 -> 1.344 (bench/README.md)
WARPS = 8                       # warps per block (WARPS in decode.cu)
NV = 2                          # 16-byte vectors per lane in ffn_down_rows (NV in decode.cu)
PREFETCH_BYTES = 512            # of each weight row, prefetched into L2 before a kernel waits (PDL on)
# the launch sites of a step; with programmatic dependent launch ("auto") those of PDL_AUTO[mode]
PDL_SITES = ("embed", "qkv", "attn", "oproj", "ffn_up", "ffn_mid", "ffn_down", "norm", "head", "argmax")
PDL_ATTN_SIDE = ("embed", "qkv", "attn", "oproj", "head", "argmax")
# every site in every mode (bench/decode_gpu.py --pdl-sweep, H200, with early loads: dense 3.761 ms/token
# against 3.807 with the attention side only; without early loads the attention side was better for dense)
PDL_AUTO = {"dense": PDL_SITES, "skip": PDL_SITES, "given": PDL_SITES}
SELECT_KERNELS = ("split3", "block", "block8", "block8b", "block8e", "block8eb", "block16b", "block16eb",   # skip mode's
                  "block8bf", "pair8bf", "pair8eb", "pair8bf2", "pair8eb2", "pair8ebf2",
                  "split3pair", "pair", "single")                        # first half, see GraphDecoder.select_kernel
SELECT_FIRST = {   # select_kernel -> the kernel (a key of kernels()) of skip mode's first launch
    "block": "ffn_gate_block", "block8": "ffn_gate_block8", "block8b": "ffn_gate_block8b",
    "block8e": "ffn_gate_block8e", "block8eb": "ffn_gate_block8eb", "block16b": "ffn_gate_block16b",
    "block16eb": "ffn_gate_block16eb", "block8bf": "ffn_gate_block8bf", "pair8bf": "ffn_gate_pair8bf",
    "pair8eb": "ffn_gate_pair8eb", "pair8bf2": "ffn_gate_pair8bf2", "pair8eb2": "ffn_gate_pair8eb2",
    "pair8ebf2": "ffn_gate_pair8ebf2"}   # the others: ffn_gate_select(_u8) / ffn_gate_select2, see _issue_step
GATE_ROWS_PER_WARP = {"pair": 2, "split3pair": 2, "pair8bf": 2, "pair8eb": 2, "pair8bf2": 4, "pair8eb2": 4,
                      "pair8ebf2": 4}   # gate rows a warp of the first launch takes (default 1): its grid
SELECT_KERNEL = "pair8eb2"      # H200, rounds 10-11: faster than pair8bf2 (round 10's default) in each of four runs,
                                # 2.207 / 2.240 / 2.217 / 2.224 against 2.217 / 2.252 / 2.225 / 2.230 ms/token.
LIST_KERNELS = ("quarter", "warp")   # given mode's first half: ffn_gateup_list4 | ffn_gateup_list
LIST_KERNEL = "quarter"
GEMV_US = (4, 8)                # 16-byte loads in flight per lane in the warp-per-row GEMVs (GraphDecoder.gemv_u)
GEMV_U = 8                      # bench/decode_gpu.py --pdl-sweep: faster in every mode (dense 4.08 -> 3.99 ms/token)
QKV_U = 4                       # ... but q,k,v at 4: 70 registers, so Mistral's 384 blocks fit the H200 in one wave
                                # (at 8: 96 registers, 2 blocks a multiprocessor, 1.45 waves); dense 3.719 -> 3.673
HEAD_KERNELS = ("fused", "separate")   # head_argmax | gemv_vec16_norm + argmax_advance (GraphDecoder.head_kernel)
HEAD_KERNEL = "fused"
EARLY_LOADS = True              # GEMV kernels issue their first round of weight loads before the PDL wait (decode.cu
                                # EARLY); H200, ms/token: dense 4.033 -> 3.761, skip 2.489 -> 2.383, given 1.615 -> 1.506
GIVEN1_WARPS = (16, 32)         # warps per block of ffn_given1 (the CuPy backend's one-launch given path)
GIVEN1_PV = (1, 2, 4)           # 16-byte column vectors per thread in its down phase (D <= PV * 32 * NW * V)
GIVEN1_CLUSTERS = (2, 4)        # ffn_given1_cl: blocks per thread-block cluster (compiled for compute capability 9.0+)
GIVEN1_CLUSTER_WARPS = 32       # ... and its warps per block
DOWN_BLOCKS_PER_SM = 4          # ffn_down_rows grid ~ this many blocks per multiprocessor (swept on the H200: 1, 2, 4)
DOWN_KERNELS = ("rows", "interleaved")   # the sparse down pass: ffn_down_rows | ffn_down_rows_il (GraphDecoder.down_kernel)
DOWN_KERNEL = "interleaved"     # H200, same run: skip 2.363 against 2.374 ms/token, given 1.485 against 1.492
DOWN_IL_BLOCKS_PER_SM = 3       # ffn_down_rows_il: 80 registers a thread, 3 blocks of 256 threads fit a multiprocessor
                                # (used when the compiled kernel does not tell, see blocks_per_sm)
_SRC_PATH = os.path.join(os.path.dirname(__file__), "decode.cu")
_CTYPE = {np.dtype(np.float16): "unsigned short", np.dtype(np.float32): "float"}
_MODULES: Dict[tuple, dict] = {}   # (weight dtype, prefetch bytes, early loads) -> kernels
_NULL = np.uint64(0)            # a null pointer argument


def _pad(n: int, m: int = PAD) -> int:
    return (n + m - 1) // m * m


def attn_launch(attn_kernel: str, max_len: int) -> tuple:
    """(kernel key, blocks along y) of a split attention kernel (``attn_kernel`` starting
    with "split") for ``max_len`` positions: a block per 32-key chunk, in whole clusters for
    the clustered kernels: of 8 chunks, or for ``"split_pre_clw"`` one cluster a head of as
    many chunks as there are (2 to 8; past 8 chunks, clusters of 8). ValueError for a name
    that is not a split rung of ``ATTN_KERNELS``."""
    if attn_kernel not in ATTN_KERNELS or not attn_kernel.startswith("split"):
        split = [a for a in ATTN_KERNELS if a.startswith("split")]
        raise ValueError(f"attn_kernel must be one of {ATTN_KERNELS}; {attn_kernel!r} is not a split "
                         f"attention rung ({split}); set GraphDecoder.attn_kernel to one of them or 'block'")
    ns = attn_splits(max_len)
    if not attn_kernel.startswith("split_pre_cl"):
        return "attn_" + attn_kernel, ns
    if attn_kernel == "split_pre_clw":
        cl = min(ATTN_CLUSTER, max(ATTN_CLUSTERS[0], ns))
        key = f"attn_split_pre_cl{cl}w_" if cl < ATTN_CLUSTER else "attn_split_pre_cl8w"
    else:
        cl, key = ATTN_CLUSTER, "attn_" + attn_kernel
    return key, -(-ns // cl) * cl


def attn_splits(max_len: int) -> int:
    """Key chunks (grid.y) of attn_decode_split for ``max_len`` positions."""
    return (max_len + ATTN_CHUNK - 1) // ATTN_CHUNK


def attn_shared_bytes(max_len: int, head_dim: int) -> int:
    """Dynamic shared memory of attn_decode: scores, q, partial sums (floats)."""
    return 4 * (_pad(max_len, 4) + _pad(head_dim, 4) + 4 * ATTN_THREADS)


def blocks_per_sm(fn, fallback: int) -> int:
    """Blocks of ``WARPS`` warps of a compiled kernel that its registers let one multiprocessor
    hold (64K 32-bit registers, given out per warp in units of 256; at most 64 warps), from
    the kernel's ``num_regs``; ``fallback`` where the kernel does not say."""
    try:
        regs = int(fn.num_regs)
    except Exception:
        return fallback
    per_warp = -(-regs * 32 // 256) * 256
    return max(1, min(65536 // (per_warp * WARPS), 64 // WARPS))


def _cupy():
    """The cupy module, or ImportError with the install command (minisparse.xp's one check)."""
    from ..xp import get_module
    return get_module("cupy")


def cuda_source() -> str:
    """The CUDA source of the decode kernels: the shared activation definitions + ``decode.cu``."""
    with open(_SRC_PATH) as fh:
        return cuda_activation_source() + fh.read()


def kernel_names(W: str, cc: int = 90) -> dict:
    """The decode module's kernels: key (as :func:`kernels` returns them) -> C++ name
    expression, for weights of C type ``W`` (``"float"`` / ``"unsigned short"``) on a GPU of
    compute capability ``cc`` (thread-block clusters from 90). Needs no GPU."""
    names = dict(gemv_naive=f"gemv_naive<{W}>", gemv_warp=f"gemv_warp<{W}>",
                 gemv_vec16=f"gemv_warp_vec16<{W}, 0, 4>", gemv_vec16_add=f"gemv_warp_vec16<{W}, 1, 4>",
                 gemv_vec16_norm=f"gemv_warp_vec16<{W}, 2, 4>",
                 embed=f"embed<{W}>", qkv_rope=f"qkv_rope<{W}, 4>", ffn_gateup=f"ffn_gateup<{W}, 4>",
                 ffn_gate_select=f"ffn_gate_select<{W}>", ffn_gateup_list=f"ffn_gateup_list<{W}>",
                 ffn_gate_select2=f"ffn_gate_select2<{W}>", ffn_gateup_list4=f"ffn_gateup_list4<{W}>",
                 ffn_up_list4=f"ffn_up_list4<{W}>", ffn_gate_block=f"ffn_gate_block<{W}, 4>",
                 ffn_gate_block8=f"ffn_gate_block<{W}, 8>",
                 ffn_gate_block8b=f"ffn_gate_block<{W}, 8, false, true>",
                 ffn_gate_block8e=f"ffn_gate_block<{W}, 8, true, false>",
                 ffn_gate_block8eb=f"ffn_gate_block<{W}, 8, true, true>",
                 ffn_gate_block16b=f"ffn_gate_block<{W}, 16, false, true>",
                 ffn_gate_block16eb=f"ffn_gate_block<{W}, 16, true, true>",
                 ffn_gate_block8bf=f"ffn_gate_block<{W}, 8, false, true, 1>",
                 ffn_gate_pair8bf=f"ffn_gate_block2<{W}, 4, 1>",
                 ffn_gate_pair8eb=f"ffn_gate_block2<{W}, 4, 0, true>",
                 ffn_gate_pair8bf2=f"ffn_gate_block2<{W}, 4, 1, false, 2>",
                 ffn_gate_pair8eb2=f"ffn_gate_block2<{W}, 4, 0, true, 2>",
                 ffn_gate_pair8ebf2=f"ffn_gate_block2<{W}, 4, 1, true, 2>",
                 ffn_down_rows=f"ffn_down_rows<{W}>", ffn_down_rows_il=f"ffn_down_rows_il<{W}>",
                 rmsnorm="rmsnorm", attn="attn_decode", attn_naive="attn_decode_naive",
                 attn_split="attn_decode_split<false>", attn_split_pre="attn_decode_split<true>",
                 argmax="argmax_advance",
                 # U = 8 loads in flight per lane (GraphDecoder.gemv_u)
                 gemv_vec16_add_u8=f"gemv_warp_vec16<{W}, 1, 8>", gemv_vec16_norm_u8=f"gemv_warp_vec16<{W}, 2, 8>",
                 qkv_rope_u8=f"qkv_rope<{W}, 8>", ffn_gateup_u8=f"ffn_gateup<{W}, 8>",
                 ffn_gate_select_u8=f"ffn_gate_select<{W}, 8>",
                 head_argmax=f"head_argmax<{W}, 4>", head_argmax_u8=f"head_argmax<{W}, 8>",
                 # the CuPy backend's one-token FFN given a mask (cupy_._given1), x float32 / float16
                 ffn_gateup_mask_xf32=f"ffn_gateup_mask<{W}, float>",
                 ffn_gateup_mask_xf16=f"ffn_gateup_mask<{W}, unsigned short>",
                 ffn_down_rows_out_xf32=f"ffn_down_rows_out<{W}, float>",
                 ffn_down_rows_out_xf16=f"ffn_down_rows_out<{W}, unsigned short>")
    if cc >= 90:                                          # split attention merged in clusters
        names["attn_split_pre_cl8"] = f"attn_decode_split_cl<true, {ATTN_CLUSTER}>"
        names["attn_split_pre_cl8w"] = f"attn_decode_split_cl<true, {ATTN_CLUSTER}, true>"
        for n in ATTN_CLUSTERS[:-1]:                      # (8: attn_split_pre_cl8w)
            names[f"attn_split_pre_cl{n}w_"] = f"attn_decode_split_cl<true, {n}, true>"
    # ... and in one launch (cupy_._given1): ffn_given1_x{f32,f16}_w{NW}_p{PV}
    for xs, X in (("xf32", "float"), ("xf16", "unsigned short")):
        for nw in GIVEN1_WARPS:
            for pv in GIVEN1_PV:
                names[f"ffn_given1_{xs}_w{nw}_p{pv}"] = f"ffn_given1<{W}, {X}, {nw}, {pv}>"
        for cl in GIVEN1_CLUSTERS if cc >= 90 else ():       # in thread-block clusters: ffn_given1_c{CL}_...
            for pv in GIVEN1_PV:
                names[f"ffn_given1_c{cl}_{xs}_w{GIVEN1_CLUSTER_WARPS}_p{pv}"] = \
                    f"ffn_given1_cl<{W}, {X}, {GIVEN1_CLUSTER_WARPS}, {pv}, {cl}>"
    return names


def kernels(weight_dtype, prefetch_bytes: int = 0, early: bool = False) -> dict:
    """Compiled decode kernels for one weight dtype (NVRTC via cupy.RawModule, cached).

    ``prefetch_bytes``: how much of each weight row a kernel prefetches into L2 before it
    waits for the kernel before it (``PF_BYTES`` in ``decode.cu``; only useful with
    programmatic dependent launch, see :class:`Launcher`).
    ``early``: the warp-per-row kernels (GEMVs, q,k,v, the FFN gate/up passes, given
    mode's list kernel) instead load their first round of weight rows into registers
    before they wait (``EARLY`` in ``decode.cu``; ``prefetch_bytes`` then applies only to
    the other kernels). Launched without PDL the wait is a no-op and the result the same.

    Keys: ``gemv_naive``, ``gemv_warp``, ``gemv_vec16`` (y = W x), ``gemv_vec16_add``
    (y += W x), ``gemv_vec16_norm`` (y = rstd(x) W x), ``embed``, ``rmsnorm``,
    ``qkv_rope``, ``attn_naive``, ``attn``, ``ffn_gateup``, ``ffn_gate_select``,
    ``ffn_gateup_list``, ``ffn_gate_select2``, ``ffn_gateup_list4``, ``ffn_up_list4``,
    ``ffn_gate_block`` / ``ffn_gate_block8`` (4 / 8 loads in flight per lane; ``..8e``: the
    first round of gate loads before the wait, ``..8eb``: and the kept up rows' loads all in
    flight at once; ``..16b`` / ``..16eb``: 16 loads in flight per lane; ``..8bf``: fenced
    rounds), ``ffn_gate_pair8bf`` / ``..8bf2`` / ``..8eb`` / ``..8eb2`` / ``..8ebf2`` (two
    gate rows per warp, see ``GraphDecoder.select_kernel``), ``ffn_down_rows``,
    ``ffn_down_rows_il``,
    ``argmax``, ``attn_split``, ``head_argmax``; ``*_u8``: 8 loads in flight per lane;
    ``ffn_gateup_mask_xf32`` / ``_xf16`` and ``ffn_down_rows_out_xf32`` / ``_xf16``: the CuPy
    backend's one-token FFN given a mask (x float32 / float16).
    """
    wdt = np.dtype(weight_dtype)
    if wdt not in _CTYPE:
        raise ValueError(f"weight dtype must be float16 or float32, got {wdt}")
    pf = int(prefetch_bytes)
    if not 0 <= pf <= 4096 or pf % 128:
        raise ValueError(f"prefetch_bytes must be a multiple of 128 in [0, 4096], got {prefetch_bytes!r}")
    cp = _cupy()
    cc = int(cp.cuda.Device().compute_capability)
    key = (wdt, pf, bool(early), cc >= 90)
    if key not in _MODULES:
        names = kernel_names(_CTYPE[wdt], cc)
        # C++ names (mangled): every kernel, template or not, is found by its name expression
        mod = cp.RawModule(code=cuda_source(), options=("-std=c++17", f"-DPF_BYTES={pf}", f"-DEARLY={int(bool(early))}"),
                           name_expressions=list(names.values()))
        _MODULES[key] = {k: mod.get_function(v) for k, v in names.items()}
    return _MODULES[key]


# ----------------------------------------------------------------------------------------
# programmatic dependent launch (PDL). CuPy's RawKernel launches have no launch attributes,
# so a captured step would end every kernel before the next may start: a ramp-down, a launch
# and a ramp-up of the memory pipe at each of ~5 kernels per layer. cuLaunchKernelEx with
# CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION lets a kernel start early; it
# prefetches its weight rows and waits in pdl_wait() (decode.cu) for the one before it.
# ----------------------------------------------------------------------------------------
class _LaunchAttr(ctypes.Structure):       # CUlaunchAttribute: id, pad to 8, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):     # CUlaunchConfig (cuda.h)
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]


_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class Launcher:
    """Kernel launches through the driver's ``cuLaunchKernelEx``, optionally with programmatic
    dependent launch (the kernel may start before the previous one on the stream ends; it
    must wait in ``pdl_wait()`` before it reads what that one wrote, as every ``decode.cu``
    kernel does).

    Parameters
    ----------
    stream : cupy.cuda.Stream
        Where the launches go (also while it is being captured into a graph).
    pdl : bool
        Set the programmatic-stream-serialization attribute on every launch.

    Raises
    ------
    RuntimeError
        The driver library or ``cuLaunchKernelEx`` is missing (CUDA < 12), or a launch fails
        (with the driver's error name).
    """

    def __init__(self, stream, pdl: bool = True):
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuLaunchKernelEx
        except (OSError, AttributeError) as e:
            raise RuntimeError(f"cuLaunchKernelEx is not available ({e}); use pdl=False") from e
        fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._lib, self._fn, self.stream, self.pdl = lib, fn, stream, bool(pdl)
        self._attr = _LaunchAttr()
        self._attr.id = _CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        self._attr.value[0] = 1

    @staticmethod
    def _c_value(a):
        """One kernel argument as the ctypes value CuPy would pass."""
        if hasattr(a, "data") and hasattr(a.data, "ptr"):           # a cupy.ndarray: its device pointer
            return ctypes.c_uint64(a.data.ptr)
        if isinstance(a, np.uint64):
            return ctypes.c_uint64(int(a))
        if isinstance(a, np.int32):
            return ctypes.c_int32(int(a))
        if isinstance(a, np.float32):
            return ctypes.c_float(float(a))
        raise TypeError(f"kernel argument of type {type(a).__name__}: pass a cupy array, np.int32, "
                        "np.float32 or np.uint64")

    def __call__(self, kernel, grid, block, args, shared_mem: int = 0) -> None:
        """Launch ``kernel`` (a cupy.RawKernel) as ``kernel(grid, block, args, shared_mem=...)`` would."""
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        vals = [self._c_value(a) for a in args]
        params = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.addressof(v) for v in vals])
        cfg = _LaunchConfig(g[0], g[1], g[2], b[0], b[1], b[2], int(shared_mem), ctypes.c_void_p(self.stream.ptr),
                            ctypes.pointer(self._attr) if self.pdl else None, 1 if self.pdl else 0)
        rc = self._fn(ctypes.byref(cfg), ctypes.c_void_p(kernel.kernel.ptr), params, None)
        if rc != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"cuLaunchKernelEx failed: {name.value.decode() if name.value else rc}")


def pad_rows(cp, w, dtype, rows: Optional[int] = None, scale=None):
    """(N, K) device array -> (rows or N, K padded) C-contiguous ``dtype`` copy, zeros in the
    padding. ``scale`` (K,): columns multiplied by it first, in float64, then rounded once."""
    N, K = w.shape
    out = cp.zeros((rows or N, _pad(K)), dtype=dtype)
    if scale is None:
        out[:N, :K] = w
    else:
        for r0 in range(0, N, 8192):                                  # bounded float64 temporaries
            out[r0:r0 + 8192, :K] = w[r0:r0 + 8192].astype(cp.float64) * scale.astype(cp.float64)[None, :]
    return out


def gemv(w, x, y=None, *, kind: str = "vec16", add: bool = False, K: Optional[int] = None,
         norm_dim: Optional[int] = None, eps: float = 1e-5):
    """y = w @ x (or y += w @ x, or y = rstd(x) w @ x) with one of the ladder's GEMV kernels, eagerly.

    Parameters
    ----------
    w : cupy.ndarray
        (N, ld) float16 or float32, C-contiguous. For ``kind="vec16"`` ld must be a
        multiple of 8 and the columns past the valid K zero (see :func:`pad_rows`).
    x : cupy.ndarray
        (ld,) float32, zero past K.
    y : cupy.ndarray, optional
        (N,) float32 output (allocated when None).
    kind : str
        ``"naive"`` (a thread per row), ``"warp"`` (a warp per row) or ``"vec16"`` (a warp
        per row, 16-byte loads).
    add : bool
        ``y += w @ x`` (vec16 only).
    K : int, optional
        Valid columns (naive / warp; default ld).
    norm_dim : int, optional
        vec16 only: RMSNorm fused, ``y = (w @ x) / sqrt(mean(x[:norm_dim]^2) + eps)``.
    eps : float
        The norm's epsilon.

    Returns
    -------
    cupy.ndarray
        y, (N,) float32.
    """
    import cupy as cp                        # no device query here: gemv may run inside a graph capture
    k = kernels(w.dtype)
    N, ld = w.shape
    if y is None:
        y = cp.empty(N, dtype=cp.float32)
    i32 = np.int32
    if kind == "naive":
        k["gemv_naive"](((N + 127) // 128,), (128,), (w, x, y, i32(N), i32(K or ld), i32(ld)))
    elif kind == "warp":
        k["gemv_warp"](((N + WARPS - 1) // WARPS,), (32 * WARPS,), (w, x, y, i32(N), i32(K or ld), i32(ld)))
    elif kind == "vec16":
        if ld % PAD or w.data.ptr % 16 or x.data.ptr % 16:
            raise ValueError(f"gemv vec16 needs rows padded to a multiple of {PAD} and 16-byte aligned "
                             f"arrays (ld={ld}); use pad_rows")
        f = k["gemv_vec16_norm" if norm_dim else "gemv_vec16_add" if add else "gemv_vec16"]
        f(((N + WARPS - 1) // WARPS,), (32 * WARPS,), (w, x, y, i32(N), i32(ld), i32(norm_dim or ld), np.float32(eps)))
    else:
        raise ValueError(f"unknown gemv kind {kind!r}; use 'naive', 'warp' or 'vec16'")
    return y


def exactly_sparse_params(config, *, sparsity: float = 0.9, seed: int = 0, xp=np, dtype=np.float32,
                          margin: float = 10.0):
    """Random parameters of a whole model whose FFN neurons are exactly zero for every token,
    except a fixed active set per layer: the bias-feature trick of
    :func:`minisparse.kernels.testing.make_ffn`, carried through the residual stream.

    Construction (D dim, F ffn neurons, A = round((1 - sparsity) F) active per layer):

    * coordinate 0 of the residual stream is a bias feature: every token embedding has
      ``x[0] = c = 0.8 ||x[1:]||`` and no layer writes to it (column 0 of ``wo`` and of
      ``w_down`` is zero), so after RMSNorm ``xn[0] = sqrt(D) c / ||x||`` stays positive and
      close to its start as long as the residual grows little (the output scales below
      keep each layer's addition to ~5% of a coordinate);
    * ``w_gate[f, 0] = -beta`` for inactive neurons and ``+beta`` for active ones (and
      ``w_up[f, 0] = +beta`` for active neurons when the up factor is a ReLU), where
      ``beta * xn[0]`` is ``margin`` standard deviations of the rest of the dot product:
      the sign of every gate is fixed with a margin no rounding can cross. The zeros are
      exact; check them by counting (``GraphDecoder(..., count_active=True)`` or an
      ``ffn_hook``), as the tests and ``bench/decode_gpu.py`` do.

    Parameters
    ----------
    config : ModelConfig
        Dense layers; an activation whose gate is a ReLU or ReLU^2 with threshold 0
        (relu, reglu, drelu, relu2glu ...).
    sparsity : float
        Fraction of inactive neurons per layer.
    seed : int
        Seed of the random weights and of the active sets.
    xp : module
        ``numpy`` or ``cupy``: where the arrays are made (CuPy's RNG builds a 7B model in
        under a second on a GPU).
    dtype : dtype
        float32 or float64.
    margin : float
        Gate margin in standard deviations of the token-dependent part.

    Returns
    -------
    params : dict of str to array
        Names and shapes of :meth:`Transformer.param_shapes`.
    active : list of L int arrays
        The sorted active neurons of each layer.
    """
    from ..activations import get_activation
    c = config
    act = get_activation(c.activation)
    if c.n_experts:
        raise NotImplementedError("exactly_sparse_params makes dense FFN layers only (n_experts=0)")
    if act.gate_kind not in ("relu", "relu2") or act.threshold != 0.0:
        raise ValueError(f"exactly_sparse_params needs an activation whose gate is a ReLU (threshold 0), "
                         f"got {act.name!r}")
    D, H, K, Dh, F, V = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size
    if D < 2:
        raise ValueError("exactly_sparse_params needs dim >= 2 (coordinate 0 is the bias feature)")
    n_active = int(round((1.0 - sparsity) * F))
    if xp is np:
        g = np.random.default_rng(seed)
        normal = lambda shape, std: (g.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype)
        perm = g.permutation
    else:
        g = xp.random.RandomState(seed)
        normal = lambda shape, std: (g.standard_normal(shape, dtype=xp.float32) * np.float32(std)).astype(dtype)
        perm = g.permutation
    rho = 0.8                                            # c / ||x[1:]||
    e_std = 0.02 / (math.sqrt(D) if c.embed_scale else 1.0)
    kappa = 0.05                                         # a layer adds ~kappa * e_std per coordinate
    s_w = 1.0 / math.sqrt(D)                             # gate / up rows
    s0 = 1.0 / math.sqrt(1.0 + rho * rho)                # std of the rest of a gate dot (unit gamma)
    beta = margin * s_w / rho                            # beta * xn[0] = margin * s0
    # ffn_norm weight: active |g| ~ 0.1; a power of two, so that folding it into float16 rows is exact
    gamma = 2.0 ** round(math.log2(0.1 / (margin * s0)))
    s_v = 0.01 / math.sqrt(D)
    x_coord = 0.02 * (math.sqrt(D) if c.embed_scale else 1.0) * 1.0  # a residual coordinate
    s_o = kappa * x_coord / (math.sqrt(D) * s_v * math.sqrt(H * Dh))
    h_typ = 0.1 * 0.1 if act.gated else 0.1
    s_d = kappa * x_coord / (h_typ * math.sqrt(max(n_active, 1)))
    one = 0.0 if c.norm_offset else 1.0                  # Gemma stores w with scale 1 + w

    def const(shape, v):
        return xp.full(shape, v, dtype=dtype)

    p = {}
    emb = normal((V, D), e_std)
    emb[:, 0] = rho * e_std * math.sqrt(D - 1)
    p["tok_embeddings"] = emb
    active = []
    for i in range(c.n_layers):
        q = f"layers.{i}."
        p[q + "attention_norm"] = const((D,), one)
        p[q + "attention.wq"] = normal((D, H * Dh), 1.0 / math.sqrt(D))
        p[q + "attention.wk"] = normal((D, K * Dh), 1.0 / math.sqrt(D))
        p[q + "attention.wv"] = normal((D, K * Dh), s_v)
        wo = normal((H * Dh, D), s_o)
        wo[:, 0] = 0                                     # nobody writes the bias feature
        p[q + "attention.wo"] = wo
        if c.qkv_bias:
            p[q + "attention.bq"] = normal((H * Dh,), 0.1)
            p[q + "attention.bk"] = normal((K * Dh,), 0.1)
            p[q + "attention.bv"] = normal((K * Dh,), 0.01)
        p[q + "ffn_norm"] = const((D,), gamma - 1.0 + one)
        idx = xp.sort(perm(F)[:n_active])
        sign = xp.full((F,), -1.0, dtype=dtype)
        sign[idx] = 1.0
        wg = normal((F, D), s_w)
        wg[:, 0] = beta * sign
        p[q + "feed_forward.w_gate"] = wg
        if act.gated:
            wu = normal((F, D), s_w)
            if act.up_kind != "identity":                # a ReLU up factor: make it positive too
                wu[idx, 0] = beta
            p[q + "feed_forward.w_up"] = wu
        wd = normal((F, D), s_d)
        wd[:, 0] = 0
        p[q + "feed_forward.w_down"] = wd
        active.append(idx)
    p["norm"] = const((D,), one)
    if not c.tie_embeddings:
        out = normal((V, D), 1.0 / math.sqrt(D))
        out[:, 0] = 0                                    # the bias feature shifts no logit
        p["output"] = out
    return p, active


class GraphDecoder:
    """Greedy batch-1 decoding of a device-resident :class:`~minisparse.Transformer`, one CUDA graph per step.

    Parameters
    ----------
    model : Transformer
        Its ``params`` must be CuPy arrays (``model.to("cupy")``); only ``model.config``,
        ``model.params`` and ``model.act`` are read, once, here.
    mode : "dense" | "skip" | "given"
        The FFN (module docstring). ``"given"`` needs ``active``.
    weight_dtype : "float16" (default) or "float32"
        The decoder's own weight copies; activations and sums are float32 either way.
    max_len : int, optional
        Positions of the KV buffers (default ``config.max_seq_len``); prompt + new tokens
        - 1 must fit.
    active : sequence of L arrays, optional
        ``mode="given"``: per layer, the neurons to compute (int indices or a bool mask of
        length F; NumPy or CuPy). Every other neuron is taken as zero.
    count_active : bool
        ``mode="dense"``: count the nonzero entries of h per (position, layer);
        ``mode="skip"`` (decode kernels): record the kept neurons per (position, layer).
        In ``self.counts`` (S, L) int32 (a check of exact sparsity; a few atomics).
    sparse_kernel : "decode" (default), "fused" or "split"
        ``skip``/``given``: this module's kernels, the CuPy backend's one-launch
        :func:`~minisparse.kernels.cupy_.ffn_device`, or its gate/up/down launches.
    pdl : "auto" (default), bool, or a collection of launch sites
        Capture these launches as programmatic dependent launches (sm_90+ only, else
        ignored): such a kernel starts while the one before it finishes, prefetches the
        first ``prefetch_bytes`` of its weight rows into L2, and waits for that kernel's
        results. Sites: ``PDL_SITES``; ``True`` all, ``False`` none, ``"auto"`` those of
        ``PDL_AUTO[mode]``: every site in every mode (measured on the H200 with early
        loads; without them, launching the dense FFN's 1792-block gate kernel early made
        the dense step 7% slower, so pass ``pdl=PDL_ATTN_SIDE`` with
        ``early_loads=False``). Eager steps (``graph=False``) always use plain launches.
    prefetch_bytes : int
        See ``pdl`` (a multiple of 128, at most 4096; 0: no prefetch).
    early_loads : bool
        With ``pdl``: the warp-per-row kernels (q,k,v, o-projection, the FFN's gate/up
        passes and down GEMV, given mode's list kernel, the LM head) load the first round of
        their weight rows into registers before they wait, instead of the L2 prefetch: the
        o-projection's loads overlap attention, q,k,v's the FFN's last kernel (see
        :func:`kernels`). Default ``EARLY_LOADS``.
    attn_kernel : "split_pre_clw" (default), "split_pre_cl8w", "split_pre_cl8", "split_pre", "split" or "block"
        Decode attention, the ladder from the bottom: ``"block"``, one block per head (the
        first rung; its scores must fit in 48 KB of shared memory); ``"split"``, split over
        chunks of 32 keys, every chunk a block, merged by the last block of each head (an
        atomic ticket, any ``max_len``); ``"split_pre"``, which loads the keys and values of
        the earlier positions before the programmatic wait (only q and the current row wait
        for the q,k,v kernel); ``"split_pre_cl8"``, whose chunk blocks form thread-block
        clusters of 8 and merge in distributed shared memory (no fence, ticket or round trip
        through L2 while a head's chunks fit one cluster, ``max_len`` <= 256); ``"_cl8w"``,
        that merge with the chunks' weights computed once by one warp; ``"split_pre_clw"``,
        a cluster of as many chunks as ``max_len`` has (2 to 8; past 8, clusters of 8), so the
        grid has no block past ``max_len``. The clustered kernels need compute
        capability 9.0 (on older GPUs ``"split_pre"`` runs instead). Also an attribute (same
        rule as ``select_kernel``).

    Attributes
    ----------
    logits : cupy.ndarray
        (V,) float32, the logits of the last step.
    counts : cupy.ndarray or None
        (S, L) int32, see ``count_active``.
    last_timing : dict
        Of the last :meth:`generate`: ``prefill_s``, ``decode_s`` (device time, CUDA
        events), ``decode_steps``.
    n_launches : int
        Kernel launches per step.
    pdl_sites : frozenset
        The launch sites captured with programmatic dependent launch (``pdl``).
    select_kernel, list_kernel : str
        The rung of skip mode's first half (``"split3"``: a pure gate pass, then
        ffn_up_list4 for the kept neurons' up rows; ``"block"`` / ``"block8"``:
        ffn_gate_block, the gate pass whose blocks then read their kept neurons' up rows
        with all 8 warps, one launch, 4 / 8 loads in flight per lane; ``"block8e"``: block8
        issuing its first round of gate loads before the programmatic wait (with
        ``early_loads``); ``"block8eb"``: and reading up to 4 kept up rows in one round
        trip (``"block8b"``: that alone; ``"block16b"`` / ``"block16eb"``: 16 loads in
        flight per lane, a float16 row of 4096 in one round; ``"block8bf"``: block8b with a
        ``membar.cta`` after each round of loads, which keeps more of them in flight);
        ``"pair8bf"``: ffn_gate_block2, each warp two gate rows at once, 4 loads in flight
        per lane and row, fenced, then block8b's up phase for the block's 16 neurons
        (``"pair8bf2"``: 2 such pairs per warp in turn, one up phase for 32 neurons, so
        that the Mistral shape's 448 blocks fit the H200 in one wave; ``"pair8eb"`` /
        ``"pair8eb2"``, the default: unfenced, the first round before the wait;
        ``"pair8ebf2"``: fenced and the first round before the wait); ``"split3pair"``: the
        same as split3 with the gate pass two rows per warp; ``"pair"``: ffn_gate_select2, two
        neurons per warp, up rows read by the same warp; ``"single"``: ffn_gate_select, one
        neuron per warp) and of given mode's first half
        (``"quarter"``: ffn_gateup_list4, four warps per neuron; ``"warp"``:
        ffn_gateup_list). Change them before the first step (or set ``_graph = None``).
    gemv_u : int
        16-byte loads in flight per lane (4 or 8) in the warp-per-row GEMVs (q,k,v, the
        o-projection, the dense FFN, skip mode's gate pass and the LM head); same rule.
        ``qkv_u`` (default 4; None: ``gemv_u``) sets it for the q,k,v kernel alone (at 4 it
        needs 70 registers a thread, so its 384 blocks of the Mistral shape fit the H200 in
        one wave; at 8, 96 registers and 1.45 waves).
    down_kernel : str
        The sparse down pass (skip and given): ``"rows"``: ffn_down_rows, each block a chunk
        of the kept rows; ``"interleaved"``: ffn_down_rows_il, the rows dealt out in turn so
        that a warp's first slots load with the count, not after it. Same rule.
    head_kernel : str
        ``"fused"``: the LM head and the greedy argmax in one launch (head_argmax: each
        block's best logit meets the others through one 64-bit atomicMax; the last block
        advances); ``"separate"``: the head GEMV, then argmax_advance (one block scans the
        logits; the previous rung). Same rule.

    Raises
    ------
    TypeError
        The parameters are NumPy arrays (move the model first: ``model.to("cupy")``).
    NotImplementedError
        MoE layers (use the model's eager device path: ``model.to("cupy")`` then
        ``minisparse.generate``).
    ValueError
        An unknown mode or dtype, a missing ``active`` for ``"given"``, an activation the
        compiled kernels do not know, with ``attn_kernel="block"`` a ``max_len`` whose
        attention scores do not fit in 48 KB of shared memory.
    """

    def __init__(self, model, *, mode: str = "dense", weight_dtype: str = "float16",
                 max_len: Optional[int] = None, active: Optional[Sequence] = None,
                 count_active: bool = False, sparse_kernel: str = "decode", pdl="auto",
                 prefetch_bytes: int = PREFETCH_BYTES, attn_kernel: str = ATTN_KERNEL,
                 early_loads: bool = EARLY_LOADS):
        c = model.config
        self.cp = cp = self._check_args(model, mode, weight_dtype, sparse_kernel, active, count_active)
        act = model.act
        self.gate_kind, self.up_kind, self.act_thr = activation_codes(act, "decode_cuda")
        self.config, self.mode, self.act = c, mode, act
        self.sparse_kernel = sparse_kernel if mode != "dense" else None
        self.wdt = np.dtype(WEIGHT_DTYPES[str(weight_dtype)])
        self.max_len = int(max_len or c.max_seq_len)
        Dh = c.head_dim
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if attn_kernel not in ATTN_KERNELS:
            raise ValueError(f"attn_kernel must be one of {ATTN_KERNELS}, got {attn_kernel!r}")
        if attn_kernel.startswith("split") and Dh > 1024:
            attn_kernel = "block"                                   # a float4 column per thread
        if attn_kernel.startswith("split_pre_cl") and int(cp.cuda.Device().compute_capability) < 90:
            attn_kernel = "split_pre"                               # clusters: sm_90+
        self.attn_kernel = attn_kernel
        if attn_kernel == "block" and attn_shared_bytes(self.max_len, Dh) > 48 * 1024:
            raise ValueError(f"max_len={self.max_len}: the attention kernel keeps max_len float scores in "
                             f"48 KB of shared memory (with head_dim {Dh}, at most "
                             f"{(48 * 1024 - attn_shared_bytes(0, Dh)) // 4} positions)")
        self.Dp, self.Fp, self.HDp = _pad(c.dim), _pad(c.ffn_dim), _pad(c.n_heads * Dh)
        self.pdl_sites = self._pdl_sites(pdl, mode)
        if int(cp.cuda.Device().compute_capability) < 90:                 # griddepcontrol: sm_90+
            self.pdl_sites = frozenset()
        self.prefetch_bytes = int(prefetch_bytes) if self.pdl else 0
        self.select_kernel, self.list_kernel = SELECT_KERNEL, LIST_KERNEL
        self.gemv_u = GEMV_U
        self.qkv_u = QKV_U                   # None: gemv_u
        self.head_kernel = HEAD_KERNEL
        self.early_loads = bool(early_loads) and self.pdl
        self.k = kernels(self.wdt, self.prefetch_bytes, self.early_loads)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.down_kernel = DOWN_KERNEL
        self.down_blocks_per_sm = None       # None: DOWN_BLOCKS_PER_SM / DOWN_IL_BLOCKS_PER_SM, per down_kernel
        self._sms = int(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"])
        with self.stream:
            self._copy_weights(model.params, active)
            self._allocate_state(count_active)
            self.stream.synchronize()
        self._graph = None
        self.last_timing: dict = {}
        self.n_launches = self._issue_step(count_only=True)

    @property
    def pdl(self) -> bool:
        """Whether any launch of the captured step is a programmatic dependent launch."""
        return bool(self.pdl_sites)

    @staticmethod
    def _pdl_sites(pdl, mode) -> frozenset:
        if isinstance(pdl, str):
            if pdl != "auto":
                raise ValueError(f"pdl must be 'auto', True, False or launch sites from {PDL_SITES}, got {pdl!r}")
            return frozenset(PDL_AUTO.get(mode, ()))
        if isinstance(pdl, (bool, np.bool_)):
            return frozenset(PDL_SITES if pdl else ())
        sites = frozenset(pdl)
        if not sites <= set(PDL_SITES):
            raise ValueError(f"unknown launch sites {sorted(sites - set(PDL_SITES))}; choose from {PDL_SITES}")
        return sites

    @staticmethod
    def _check_args(model, mode, weight_dtype, sparse_kernel, active, count_active):
        """Refuse what the decoder cannot run, before any allocation; returns the cupy module."""
        c = model.config
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if str(weight_dtype) not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {weight_dtype!r}")
        if sparse_kernel not in SPARSE_KERNELS:
            raise ValueError(f"sparse_kernel must be one of {SPARSE_KERNELS}, got {sparse_kernel!r}")
        if getattr(c, "norm_relu", False):
            raise NotImplementedError("GraphDecoder folds each RMSNorm into the next weights, so it cannot put "
                                      "a ReLU after the norms (norm_relu=True); use the eager device path: "
                                      "model.to('cupy') then minisparse.generate")
        if c.n_experts > 0:
            moe = [i for i in range(c.n_layers) if c.is_moe_layer(i)]
            raise NotImplementedError(f"GraphDecoder has no MoE FFN (layers {moe} are MoE); decode this model "
                                      "with its eager device path: model.to('cupy') then minisparse.generate")
        emb = model.params["tok_embeddings"]
        if isinstance(emb, np.ndarray):
            raise TypeError("GraphDecoder needs the model's parameters on the GPU (CuPy arrays), got NumPy "
                            "arrays; move the model first: model.to('cupy')")
        cp = _cupy()
        if not isinstance(emb, cp.ndarray):
            raise TypeError(f"GraphDecoder needs CuPy parameters, got {type(emb).__module__}."
                            f"{type(emb).__name__}; move the model first: model.to('cupy')")
        if mode == "given" and active is None:
            raise ValueError("mode='given' needs active=: per layer, the neurons to compute")
        if mode != "given" and active is not None:
            raise ValueError(f"active= is only used with mode='given', not mode={mode!r}")
        if count_active and not (mode == "dense" or (mode == "skip" and sparse_kernel == "decode")):
            raise ValueError("count_active=True needs mode='dense', or mode='skip' with sparse_kernel='decode'")
        if active is not None and len(active) != c.n_layers:
            raise ValueError(f"active must have one entry per layer ({c.n_layers}), got {len(active)}")
        return cp

    def _copy_weights(self, p, active) -> None:
        """Own weight copies in ``self.wdt``: rows padded, each RMSNorm weight folded into its consumer."""
        cp, c, wdt, mode = self.cp, self.config, self.wdt, self.mode

        def norm_scale(w):                                            # (D,) the norm's weight: w or 1 + w
            return (1.0 + w) if c.norm_offset else w                  # in the model's dtype, as the reference

        emb = p["tok_embeddings"]
        self.emb = pad_rows(cp, emb, wdt)                                       # (V, Dp) for the lookup
        w_out = emb if c.tie_embeddings else p["output"]
        self.w_out = pad_rows(cp, w_out, wdt, scale=norm_scale(p["norm"]))      # (V, Dp) LM head, final norm in
        self.layers = []
        for i in range(c.n_layers):
            q = f"layers.{i}."
            a = q + "attention."
            wqkv = cp.concatenate([p[a + "wq"].T, p[a + "wk"].T, p[a + "wv"].T], axis=0)
            lw = dict(wqkv=pad_rows(cp, wqkv, wdt, scale=norm_scale(p[q + "attention_norm"])),  # ((H+2K)Dh, Dp)
                      wo=pad_rows(cp, p[a + "wo"].T, wdt),                      # (D, HDp)
                      bqkv=None)
            del wqkv
            if c.qkv_bias:
                lw["bqkv"] = cp.concatenate([p[a + "bq"], p[a + "bk"], p[a + "bv"]]).astype(cp.float32)
            fq = q + "feed_forward."
            wg, wu, wd = p[fq + "w_gate"], p.get(fq + "w_up"), p[fq + "w_down"]
            g_ffn = norm_scale(p[q + "ffn_norm"])
            lw["wg"] = pad_rows(cp, wg, wdt, scale=g_ffn)                        # (F, Dp)
            lw["wu"] = pad_rows(cp, wu, wdt, scale=g_ffn) if self.act.gated else None
            if mode == "dense":
                lw["wdT"] = pad_rows(cp, wd.T, wdt)                              # (D, Fp)
            else:
                lw["wd"] = pad_rows(cp, wd, wdt)                                 # (F, Dp)
            if mode == "given":
                lw["idx"], lw["mask"] = self._active(active[i], c.ffn_dim)
            self.layers.append(lw)
        cos, sin = L.rope_tables(c.head_dim, self.max_len, c.rope_theta, np.float64)  # (S, Dh)
        self.cos = cp.asarray(cos[:, :c.head_dim // 2].astype(np.float32))     # (S, Dh/2)
        self.sin = cp.asarray(sin[:, :c.head_dim // 2].astype(np.float32))

    def _allocate_state(self, count_active: bool) -> None:
        """Activations, KV buffers, token/position state (padding stays zero)."""
        cp, c, S, f32 = self.cp, self.config, self.max_len, self.cp.float32
        H, K, Dh, F, D = c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.dim
        self.x = cp.zeros(self.Dp, dtype=f32)                               # residual stream
        self.q = cp.zeros(H * Dh, dtype=f32)
        self.o = cp.zeros(self.HDp, dtype=f32)                              # attention output
        self.h = cp.zeros(self.Fp, dtype=f32)                               # dense FFN h
        self.hv = cp.zeros(F, dtype=f32)                                    # skipping: h of the kept
        self.idx = cp.zeros(F, dtype=cp.int32)                              # skipping: their ids
        self.cnt = cp.zeros(c.n_layers, dtype=cp.int32)                     # skipping: kept per layer
        self.logits = cp.zeros(c.vocab_size, dtype=f32)
        self.attn_part = cp.zeros(H * attn_splits(S) * (Dh + 2), dtype=f32)   # split attention's partials
        self.attn_ticket = cp.zeros(H, dtype=cp.int32)
        self.best = cp.zeros(1, dtype=cp.uint64)                            # head_argmax: the winner's key
        self.head_ticket = cp.zeros(1, dtype=cp.uint32)                     # head_argmax: blocks done
        self.kc = [cp.zeros((K, S, Dh), dtype=f32) for _ in range(c.n_layers)]
        self.vc = [cp.zeros((K, S, Dh), dtype=f32) for _ in range(c.n_layers)]
        self.tokens = cp.zeros(S + 1, dtype=cp.int32)                      # prompt, then new ids
        self.pos = cp.zeros(1, dtype=cp.int32)
        self.n_prompt = cp.zeros(1, dtype=cp.int32)
        self.counts = cp.zeros((S, c.n_layers), dtype=cp.int32) if count_active else None
        if self.mode == "given":
            self.given_cnt = cp.asarray(np.array([int(lw["idx"].size) for lw in self.layers], dtype=np.int32))
        if self.sparse_kernel in ("fused", "split"):
            self.xn = cp.zeros(self.Dp, dtype=f32)                          # normed input of the backend FFN
            self.y = cp.zeros(self.Dp, dtype=f32)                           # its output
            self.ones = cp.zeros(self.Dp, dtype=f32)
            self.ones[:D] = 1.0
            self.scratch = cp.zeros(self.Dp, dtype=f32)
            self._plan_sparse()

    # ------------------------------------------------------------------------------------
    def _active(self, a, F: int):
        """(device int32 indices, device uint8 mask) of one layer's active set."""
        cp = self.cp
        if isinstance(a, cp.ndarray):
            a = a.get()
        a = np.asarray(a)
        if a.dtype == bool:
            if a.shape != (F,):
                raise ValueError(f"an active mask must have shape ({F},), got {a.shape}")
            a = np.flatnonzero(a)
        if a.dtype.kind not in "iu":
            raise TypeError(f"active entries must be int indices or bool masks, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= F):
            raise ValueError(f"active indices must lie in [0, ffn_dim={F})")
        m = np.zeros(F, dtype=np.uint8)
        m[a] = 1
        return cp.asarray(np.flatnonzero(m).astype(np.int32)), cp.asarray(m)

    def _plan_sparse(self):
        """Plans of the CuPy backend's neuron-skipping FFN on our fixed buffers (made on our
        stream, so their workspace is ours; nothing is allocated after this)."""
        from . import cupy_
        cupy_.check_usable()
        self._cupy_ = cupy_
        x2, y2 = self.xn.reshape(1, self.Dp), self.y.reshape(1, self.Dp)
        self._x2, self._y2 = x2, y2
        if self.sparse_kernel == "fused":
            if not hasattr(cupy_, "ffn_device"):
                raise ValueError("sparse_kernel='fused' needs minisparse.kernels.cupy_.ffn_device; "
                                 "this version has none: use sparse_kernel='split' or 'decode'")
            for lw in self.layers:                             # the first call plans and allocates
                cupy_.ffn_device(x2, lw["wg"], lw["wu"], lw["wd"], self.act.name, active=lw.get("mask"), out=y2)
            return
        for lw in self.layers:
            lw["plan"] = cupy_._plan(x2, lw["wg"], lw["wu"], lw["wd"], self.act, 0.0, self.mode == "given")
        # the split path alternates between two device counters: each launch counts into one
        # and zeroes the other, which the next launch uses. A step of L launches leaves the
        # counter its first launch used dirty when L is odd: argmax_advance zeroes it (see
        # _issue_step), so every step, eager or replayed, starts as the captured one did.
        self._ws = self.layers[0]["plan"]["ws"]
        self._ws["cnt"].fill(0)
        self._ws["parity"] = 0

    # ------------------------------------------------------------------------------------
    def _issue_step(self, count_only: bool = False, launcher=None) -> int:
        """Issue one decode step's kernels on the current stream (or count them); ``launcher``
        (a :class:`Launcher` on that stream) issues the own kernels instead of CuPy."""
        if self.select_kernel not in SELECT_KERNELS or self.list_kernel not in LIST_KERNELS:
            raise ValueError(f"select_kernel must be one of {SELECT_KERNELS} and list_kernel one of "
                             f"{LIST_KERNELS}; got {self.select_kernel!r}, {self.list_kernel!r}")
        if self.gemv_u not in GEMV_US or self.qkv_u not in GEMV_US + (None,):
            raise ValueError(f"gemv_u (and qkv_u, or None) must be one of {GEMV_US}, "
                             f"got {self.gemv_u!r}, {self.qkv_u!r}")
        if self.head_kernel not in HEAD_KERNELS:
            raise ValueError(f"head_kernel must be one of {HEAD_KERNELS}, got {self.head_kernel!r}")
        if self.down_kernel not in DOWN_KERNELS:
            raise ValueError(f"down_kernel must be one of {DOWN_KERNELS}, got {self.down_kernel!r}")
        u8 = "_u8" if self.gemv_u == 8 else ""
        qkv_u8 = "_u8" if (self.qkv_u or self.gemv_u) == 8 else ""
        c, k = self.config, self.k
        i32, f32 = np.int32, np.float32
        D, H, K, Dh, F, V, L_ = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size, c.n_layers
        Dp, Fp, HDp, S = self.Dp, self.Fp, self.HDp, self.max_len
        eps = f32(c.norm_eps)
        gk, uk, thr, gated = i32(self.gate_kind), i32(self.up_kind), f32(self.act_thr), i32(self.act.gated)
        n = 0
        zero, n_zero, record = _NULL, i32(0), _NULL            # counters argmax_advance leaves at 0
        if self.mode == "skip" and self.sparse_kernel == "decode":
            zero, n_zero = self.cnt, i32(L_)
            record = self.counts if self.counts is not None else _NULL
        elif self.sparse_kernel == "split" and L_ % 2:         # see _plan_sparse
            p0 = self._ws["parity"]
            zero, n_zero = self._ws["cnt"][p0:p0 + 1], i32(1)

        def launch(site, fn, grid, block, args, shared_mem=0):
            nonlocal n
            n += 1
            if count_only:
                return
            if launcher is not None and site in self.pdl_sites:
                launcher(fn, grid, block, args, shared_mem=shared_mem)
            else:
                fn(grid, block, args, shared_mem=shared_mem)

        def rows(N):                                           # a warp per row
            return ((N + WARPS - 1) // WARPS,)

        blk = (32 * WARPS,)
        V16 = 16 // self.wdt.itemsize
        ncol = (Dp + 32 * V16 * NV - 1) // (32 * V16 * NV)
        il = self.down_kernel == "interleaved"
        bps = self.down_blocks_per_sm or (blocks_per_sm(k["ffn_down_rows_il"], DOWN_IL_BLOCKS_PER_SM) if il
                                          else DOWN_BLOCKS_PER_SM)
        G = bps * self._sms / ncol                             # the down pass's block rows
        G = max(1, min(int(G) if il else math.ceil(G), -(-F // WARPS)))   # il: at most one wave
        launch("embed", k["embed"], ((D + 255) // 256,), (256,),
               (self.emb, i32(Dp), self.tokens, self.pos, self.x, i32(D), f32(math.sqrt(D)), i32(c.embed_scale)))
        for i, lw in enumerate(self.layers):
            # attention: [norm +] q,k,v + rotary + KV write; attention; o-proj + residual
            launch("qkv", k["qkv_rope" + qkv_u8], rows((H + 2 * K) * Dh // 2), blk,
                   (lw["wqkv"], lw["bqkv"] if lw["bqkv"] is not None else _NULL, self.x, i32(Dp), i32(D), eps,
                    i32(H), i32(K), i32(Dh), self.cos, self.sin, self.pos, self.q, self.kc[i], self.vc[i], i32(S)))
            if self.attn_kernel != "block":                   # (an unknown name: ValueError)
                attn, ns = attn_launch(self.attn_kernel, S)
                launch("attn", k[attn], (H, ns), (256,),
                       (self.q, self.kc[i], self.vc[i], self.o, self.pos, i32(H), i32(K), i32(Dh), i32(S),
                        f32(1.0 / math.sqrt(Dh)), self.attn_part, self.attn_ticket))
            else:
                launch("attn", k["attn"], (H,), (ATTN_THREADS,),
                       (self.q, self.kc[i], self.vc[i], self.o, self.pos, i32(H), i32(K), i32(Dh), i32(S),
                        f32(1.0 / math.sqrt(Dh))), shared_mem=attn_shared_bytes(S, Dh))
            launch("oproj", k["gemv_vec16_add" + u8], rows(D), blk, (lw["wo"], self.o, self.x, i32(D), i32(HDp), i32(D), eps))
            # FFN + residual
            wu = lw["wu"] if lw["wu"] is not None else lw["wg"]
            if self.mode == "dense":
                launch("ffn_up", k["ffn_gateup" + u8], rows(F), blk,
                       (lw["wg"], wu, self.x, self.h, i32(F), i32(Dp), i32(D), eps, gk, uk, thr, gated,
                        self.counts if self.counts is not None else _NULL, self.pos, i32(i), i32(L_)))
                launch("ffn_down", k["gemv_vec16_add" + u8], rows(D), blk, (lw["wdT"], self.h, self.x, i32(D), i32(Fp), i32(D), eps))
            elif self.sparse_kernel == "decode":
                if self.mode == "skip":
                    cnt_i, idx = self.cnt[i:i + 1], self.idx
                    pair = self.select_kernel in ("pair", "split3pair")
                    split3 = self.select_kernel.startswith("split3")
                    first = SELECT_FIRST.get(self.select_kernel,
                                             "ffn_gate_select2" if pair else "ffn_gate_select" + (u8 if split3 else ""))
                    per_warp = GATE_ROWS_PER_WARP.get(self.select_kernel, 1)
                    launch("ffn_up", k[first], rows(-(-F // per_warp)), blk,
                           (lw["wg"], wu, self.x, i32(F), i32(Dp), i32(D), eps, gk, uk, thr,
                            i32(0) if split3 else gated, cnt_i, idx, self.hv))
                    if split3 and self.act.gated:              # the kept neurons' up rows
                        launch("ffn_mid", k["ffn_up_list4"], (min((F + 1) // 2, 8 * self._sms),), blk,
                               (wu, self.x, i32(Dp), i32(D), eps, uk, thr, cnt_i, idx, self.hv))
                else:
                    cnt_i, idx = self.given_cnt[i:i + 1], lw["idx"]
                    quarter = self.list_kernel == "quarter"
                    A = max(1, int(idx.size))
                    launch("ffn_up", k["ffn_gateup_list4" if quarter else "ffn_gateup_list"],
                           ((A + 1) // 2,) if quarter else rows(A), blk,
                           (lw["wg"], wu, self.x, i32(Dp), i32(D), eps, gk, uk, thr, gated, cnt_i, idx, self.hv))
                if il:
                    launch("ffn_down", k["ffn_down_rows_il"], (ncol, G), blk,
                           (cnt_i, idx, self.hv, lw["wd"], self.x, i32(Dp), i32(min(int(idx.size), int(self.hv.size)))))
                else:
                    launch("ffn_down", k["ffn_down_rows"], (ncol, G), blk, (cnt_i, idx, self.hv, lw["wd"], self.x, i32(Dp)))
            else:                                              # the CuPy backend: normed input, y, x += y
                launch("norm", k["rmsnorm"], (1,), (1024,), (self.x, _NULL, self.ones, self.xn, i32(D), eps))
                if self.sparse_kernel == "fused":              # y = FFN(xn), one launch, no sync
                    n += 1
                    if not count_only:
                        self._cupy_.ffn_device(self._x2, lw["wg"], lw["wu"], lw["wd"], self.act.name,
                                               active=lw.get("mask"), out=self._y2)
                else:                                          # gate [+ up] + down, y accumulated
                    plan = lw["plan"]
                    n += 2 if plan["up"] is None else 3
                    if not count_only:
                        self._cupy_._launch(plan, self._x2, lw["wg"], lw["wu"], lw["wd"], lw.get("mask"), self._y2)
                launch("norm", k["rmsnorm"], (1,), (1024,), (self.x, self.y, self.ones, self.scratch, i32(D), eps))
        if self.head_kernel == "fused":                        # logits and the argmax, one launch
            launch("head", k["head_argmax" + u8], rows(V), blk,
                   (self.w_out, self.x, self.logits, i32(V), i32(Dp), i32(D), eps, self.best, self.head_ticket,
                    self.tokens, self.pos, self.n_prompt, i32(S + 1), zero, n_zero, record))
        else:
            launch("head", k["gemv_vec16_norm" + u8], rows(V), blk, (self.w_out, self.x, self.logits, i32(V), i32(Dp), i32(D), eps))
            launch("argmax", k["argmax"], (1,), (1024,),
                   (self.logits, i32(V), self.tokens, self.pos, self.n_prompt, i32(S + 1), zero, n_zero, record))
        return n

    def _capture(self):
        """Capture one step in a CUDA graph (once). The kernels are warm: the caller ran a step.
        With ``pdl`` the own kernels are captured as programmatic dependent launches; if the
        driver refuses that, the step is captured with plain launches (``self.pdl`` = False)."""
        s = self.stream
        launcher = None
        if self.pdl:
            try:
                launcher = Launcher(s, pdl=True)
            except RuntimeError as e:
                warnings.warn(f"GraphDecoder: no programmatic dependent launch ({e}); plain launches",
                              RuntimeWarning, stacklevel=3)
                self.pdl_sites = frozenset()
        with s:
            s.begin_capture()
            try:
                self._issue_step(launcher=launcher)
            finally:
                g = s.end_capture()
        self._graph = g

    def step(self, graph: bool = True) -> None:
        """One decode step (asynchronous, on ``self.stream``): embeds ``tokens[pos]``, writes
        the greedy next token, advances ``pos``."""
        if graph:
            if self._graph is None:
                self._capture()
            self._graph.launch(self.stream)
        else:
            with self.stream:
                self._issue_step()

    # ------------------------------------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens: int, *, graph: bool = True,
                 return_logits: bool = False):
        """Greedy ids of ``max_new_tokens`` tokens after ``prompt_ids``.

        The prompt is run through the same step, one position at a time (its argmax is
        discarded); then each step's argmax is the next input. Nothing is read back until
        the end, unless ``return_logits``.

        Parameters
        ----------
        prompt_ids : sequence of int
            At least one token id.
        max_new_tokens : int
            New tokens to generate (>= 0).
        graph : bool
            Replay the captured CUDA graph (default), or issue the same kernels eagerly
            (for debugging; same tokens).
        return_logits : bool
            Also return the logits that chose each new token, (max_new_tokens, V) NumPy
            float32 (one device read per step).

        Returns
        -------
        list of int
            The new ids (and the logits, as a second value, when asked).

        Raises
        ------
        ValueError, TypeError
            An empty or non-integer prompt, ids outside the vocabulary, or more positions
            than ``max_len``.
        """
        cp = self.cp
        prompt = np.asarray(list(prompt_ids) if not isinstance(prompt_ids, np.ndarray) else prompt_ids)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError(f"prompt_ids must be a non-empty 1-D sequence of ints, got shape {prompt.shape}")
        if prompt.dtype.kind not in "iu":
            raise TypeError(f"prompt_ids must be integers, got dtype {prompt.dtype}")
        V = self.config.vocab_size
        if prompt.min() < 0 or prompt.max() >= V:
            raise ValueError(f"prompt_ids contain an id outside [0, vocab_size={V})")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        n, m = int(prompt.size), int(max_new_tokens)
        if m == 0:
            return ([], np.zeros((0, V), np.float32)) if return_logits else []
        if n + m - 1 > self.max_len:                          # positions 0 .. n+m-2 enter the cache
            raise ValueError(f"prompt ({n}) + max_new_tokens ({m}) - 1 = {n + m - 1} positions exceed "
                             f"max_len={self.max_len}; pass a larger max_len to GraphDecoder")
        s = self.stream
        toks = np.zeros(self.max_len + 1, dtype=np.int32)
        toks[:n] = prompt
        with s:
            self.tokens.set(toks, stream=s)
            self.pos.fill(0)
            self.n_prompt.fill(n)
            if self.counts is not None:
                self.counts.fill(0)
        if graph and self._graph is None:                     # warm the kernels (compile, load) first
            self.step(graph=False)
            with s:
                self.pos.fill(0)
                if self.counts is not None:
                    self.counts.fill(0)
        logits = []
        ev = [cp.cuda.Event() for _ in range(3)]
        ev[0].record(s)
        for _ in range(n - 1):                                # prefill: positions 0 .. n-2
            self.step(graph)
        ev[1].record(s)
        for _ in range(m):                                    # position n-1+j chooses new token j
            self.step(graph)
            if return_logits:
                logits.append(self.logits.get(stream=s))
        ev[2].record(s)
        ev[2].synchronize()
        out = self.tokens[n:n + m].get(stream=s).tolist()
        self.last_timing = dict(prefill_s=cp.cuda.get_elapsed_time(ev[0], ev[1]) / 1e3,
                                decode_s=cp.cuda.get_elapsed_time(ev[1], ev[2]) / 1e3,
                                decode_steps=m, graph=graph)
        if return_logits:
            return out, np.stack(logits)
        return out

    # ------------------------------------------------------------------------------------
    def bytes_per_step(self) -> int:
        """Bytes of weights one dense step must read (the bytes floor's numerator): every
        weight matrix once (unpadded), one embedding row, the LM head."""
        c = self.config
        D, H, K, Dh, F, V = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size
        per_layer = D * (H + 2 * K) * Dh + H * Dh * D + (3 if self.act.gated else 2) * F * D
        return int(self.wdt.itemsize * (c.n_layers * per_layer + V * D + D))
