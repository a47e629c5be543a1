"""Where the time of the one-launch given kernel (ffn_given1) goes, per phase, on a GPU.

Compiles decode.cu with ``-DGIVEN1_TRACE`` (each block's thread 0 then records clock64() and
%globaltimer at the phase boundaries into a device array) and launches ffn_given1 as the
CuPy backend does (Mistral-7B layer, 90% of the neurons masked out, fp16 and fp32), with L2
flushed before each launch ("cold") or after a warm-up launch ("warm"; "warm1": nslice = 1).
Prints, per phase, the median and the max over blocks in microseconds (clock64 at the
device's rated clock), and writes the medians over 12 launches as JSON.

    python bench/gpu_given1_trace.py [--json bench/results/given1_trace.json]
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupy as cp
from minisparse.kernels import cupy_, decode_cuda
from minisparse.kernels.base import activation_codes
from minisparse.kernels.testing import make_ffn
from minisparse.activations import get_activation
ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "given1_trace.json"))
args = ap.parse_args()
D, F = 4096, 14336
props = cp.cuda.runtime.getDeviceProperties(0)
clk_khz = props["clockRate"]
res = {}
for wdt, W in ((np.float16, "unsigned short"), (np.float32, "float")):
    names = [f"ffn_given1<{W}, {W}, 32, 1>"]
    mod = cp.RawModule(code=decode_cuda.cuda_source(), options=("-std=c++17", "-DGIVEN1_TRACE"), name_expressions=names)
    fn = mod.get_function(names[0])
    tr = mod.get_global("given1_trace"); gtr = mod.get_global("given1_gtrace")
    p = make_ffn(D, F, tokens=1, sparsity=0.9, activation="drelu", dtype=wdt, seed=0)
    x = cp.asarray(p["x"][0].astype(wdt)); wg, wu, wd = (cp.asarray(p[k]) for k in ("w_gate", "w_up", "w_down"))
    mask = cp.asarray(np.isin(np.arange(F), p["active"])).view(cp.uint8)
    out = cp.empty(D, dtype=x.dtype); y32 = cp.zeros(8 * D, cp.float32); cnt = cp.zeros(3, cp.int32)
    gk, uk, thr = activation_codes(get_activation("drelu"), "cupy")
    G = props["multiProcessorCount"]; kmax = -(-F // G)
    flush = cp.empty(256 * 2**20 // 4, cp.float32)
    def launch():
        fn((G,), (1024,), (wg, wu, wd, x, np.int32(D), np.int32(F), mask, np.int32(gk), np.int32(uk), np.float32(thr),
                           np.int32(1), y32, np.int32(NS), out, cnt), shared_mem=40 * kmax)
    for mode, NS in (("cold", 8), ("warm", 8), ("warm1", 1)):
        stats = []
        for rep in range(12):
            if mode == "cold": flush.fill(rep)
            else: launch()  # warm
            cp.cuda.Device().synchronize()
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(); launch(); b.record(); b.synchronize()
            t = cp.ndarray((4096 * 8,), cp.int64, tr).get().reshape(4096, 8)[:G]
            g = cp.ndarray((4096 * 8,), cp.uint64, gtr).get().reshape(4096, 8)[:G].astype(np.int64)
            us = lambda c: c / (clk_khz / 1e3)
            ph = dict(rank=us(t[:, 1] - t[:, 0]), gateup=us(t[:, 2] - t[:, 1]), down_loads=us(t[:, 6] - t[:, 2]),
                      atomics=us(t[:, 3] - t[:, 6]), fence_sync=us(t[:, 4] - t[:, 3]))
            last = int(np.argmax(g[:, 5]))
            g0 = g[:, 0].min()
            row = {k: (float(np.median(v)), float(np.max(v))) for k, v in ph.items()}
            row.update(event_us=cp.cuda.get_elapsed_time(a, b) * 1e3, start_spread_us=float((g[:, 0].max() - g0) / 1e3),
                       all_at_ticket_us=float((g[:, 4].max() - g0) / 1e3), end_us=float((g[last, 5] - g0) / 1e3),
                       last_block_write_cycles_us=float(us(t[last, 5] - t[last, 4])))
            stats.append(row)
        med = {k: (np.median([s[k] for s in stats], axis=0).tolist()) for k in stats[0]}
        res[f"{np.dtype(wdt).name}_{mode}"] = med
        print(np.dtype(wdt).name, mode, json.dumps({k: (np.round(v, 2).tolist()) for k, v in med.items()}))
with open(args.json, "w") as fh:
    json.dump(res, fh, indent=1)
print("wrote", args.json)
