"""The CuPy backend's one-token given-mask path, rung against rung, on a GPU.

Mistral-7B layer (4096 x 14336), drelu, batch 1, fp16 and fp32 weights, 90% and 0% of
the neurons masked out (``make_ffn``'s exact construction). For each rung
(``cupy_.GIVEN1_KERNEL`` "two" and "one"): the relative error against the dense reference,
then ``ffn_device`` and ``sparse_ffn`` timed in a CUDA graph of 20 calls and eagerly (50
plain Python calls), beside torch's cuBLAS dense FFN in a graph (``bench/ffn_sparse.py``'s
``torch_graph_dense``) and eagerly. The eager share is the issue's measure: the eager
speed-up over eager cuBLAS as a fraction of the graph speed-up over cuBLAS in a graph.
``sparse_ffn`` gets a (D,) vector made once, as a user's decode loop has it (round 7 sliced
``x[0]`` inside the timed call: CuPy's indexing then cost ~4-6 us of Python per call). ``--host``: the Python time per call of the given path's pieces
(the GPU work queues behind). Prints a line per rung and writes JSON.

    python bench/gpu_given1_probe.py [--host] [--rounds N] [--no-4sets] [--json given1_probe.json]

Each rung also runs with ``cupy_.GIVEN1_DRIVER_LAUNCH`` off (a CuPy RawKernel call) and on
(cuLaunchKernel on argument slots filled once), in thread-block clusters of 2 and 4
(``cupy_.GIVEN1_CLUSTER``), and at 90% cycling over 4 copies of the weights (L2 cold, as a
model's layers would be).

(The round-6 logs ``bench/results/given1_probe_r6_*.log`` and ``given1_host_r6.log`` come from
the same code run from a scratch folder during round 6; round 7's ``given1_probe_r7_*`` from
this file with ``x[0]`` sliced inside the timed ``sparse_ffn`` call and no eager torch row.)
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import cupy as cp  # noqa: E402

import minisparse as ms  # noqa: E402
from minisparse.kernels import cupy_  # noqa: E402
from minisparse.kernels.testing import dense_ffn, make_ffn  # noqa: E402
import ffn_sparse as fs  # noqa: E402

D, F = 4096, 14336
CONFIGS = [("two", 32, 1, 1, True, 1), ("one", 32, 1, 1, False, 1), ("one", 32, 1, 1, True, 1),
           ("one", 32, 1, 1, True, 2)]
# (clusters of 4 measured slower on the H200 in round 7: 26.8 against 15.6 us fp16, given1_probe_r7_call2.log)
# kernel, warps, blocks per SM, slices, driver launch (cupy_.GIVEN1_DRIVER_LAUNCH: cuLaunchKernel on cached
# argument slots, or a RawKernel call), blocks per thread-block cluster (cupy_.GIVEN1_CLUSTER)


def graph_time(f, n_inner=20, repeats=15):
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for _ in range(3):
            f()
        s.synchronize()
        s.begin_capture()
        for _ in range(n_inner):
            f()
        g = s.end_capture()
        g.launch(s)
        s.synchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        ts = []
        for _ in range(repeats):
            a.record(s)
            g.launch(s)
            b.record(s)
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b) / 1e3 / n_inner)
    return float(np.median(ts))


def eager_time(f, n_inner=50, repeats=15):
    for _ in range(5):
        f()
    cp.cuda.Device().synchronize()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(repeats):
        a.record()
        for _ in range(n_inner):
            f()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) / 1e3 / n_inner)
    return float(np.median(ts))


def torch_eager_dense(p, wdt, n_inner=50, repeats=15):
    """Dense drelu FFN with torch (cuBLAS), plain eager calls: seconds per call, or None."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    wg, wu, wd = (torch.from_numpy(p[k].astype(wdt)).to("cuda") for k in ("w_gate", "w_up", "w_down"))
    x = torch.from_numpy(p["x"][0].astype(wdt)).to("cuda")

    def f():
        return (torch.relu(wg @ x) * torch.relu(wu @ x)) @ wd
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n_inner):
            f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / n_inner)
    del wg, wu, wd
    torch.cuda.empty_cache()
    return float(np.median(ts))


def rungs(sets4=True):
    rows = []
    for wdt, sp in ((np.float16, 0.9), (np.float32, 0.9), (np.float16, 0.0), (np.float32, 0.0)):
        p = make_ffn(D, F, tokens=1, sparsity=sp, activation="drelu", dtype=wdt, seed=0)
        ref = dense_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu")
        x = cp.asarray(p["x"].astype(wdt))                               # (1, D)
        x1 = x[0]                                                        # (D,): a user's vector
        wg, wu, wd = (cp.asarray(p[k]) for k in ("w_gate", "w_up", "w_down"))
        mask = cp.asarray(np.isin(np.arange(F), p["active"]))
        out = cp.empty((1, D), dtype=x.dtype)
        tg = fs.torch_graph_dense(p, wdt, ref, 15)
        te = torch_eager_dense(p, wdt)
        row = dict(dtype=np.dtype(wdt).name, sparsity=sp, torch_graph_us=tg * 1e6, torch_eager_us=te * 1e6,
                   configs=[])
        print(f"\n{np.dtype(wdt).name} sparsity {sp}: torch dense graph {tg * 1e6:.1f} us, eager {te * 1e6:.1f} us")
        copies = None
        if sets4 and sp > 0:                   # 4 copies of the weights, cycled: L2 cold, as a model's layers
            copies = [(wg, wu, wd)] + [tuple(a.copy() for a in (wg, wu, wd)) for _ in range(3)]
        for kern, nw, bps, sl, drv, cl in CONFIGS:
            cupy_.GIVEN1_KERNEL, cupy_.GIVEN1_WARPS, cupy_.GIVEN1_BLOCKS_PER_SM, cupy_.GIVEN1_SLICES = kern, nw, bps, sl
            cupy_.GIVEN1_DRIVER_LAUNCH, cupy_.GIVEN1_CLUSTER = drv, cl
            f = lambda: cupy_.ffn_device(x, wg, wu, wd, "drelu", active=mask, out=out)           # noqa: E731
            g = lambda: ms.sparse_ffn(x1, wg, wu, wd, "drelu", backend="cupy", active=mask)    # noqa: E731
            err = float(np.abs(f().get().astype(np.float64) - ref).max() / np.abs(ref).max())
            t_g, t_e, t_s, t_sg = graph_time(f), eager_time(f), eager_time(g), graph_time(g)
            c = dict(kernel=kern, warps=nw, blocks_per_sm=bps, slices=sl, driver_launch=drv, cluster=cl, rel_err=err,
                     graph_us=t_g * 1e6, eager_us=t_e * 1e6, sparse_ffn_eager_us=t_s * 1e6,
                     sparse_ffn_graph_us=t_sg * 1e6, x_torch_graph=tg / t_g,
                     eager_share=(te / t_e) / (tg / t_g), sparse_ffn_eager_share=(te / t_s) / (tg / t_sg))
            line = (f"  {kern} NW={nw} slices={sl} bps={bps} cl={cl} {'driver' if drv else 'RawKernel'}: err {err:.1e}  "
                    f"graph {t_g * 1e6:6.1f} us ({tg / t_g:4.2f}x torch)  ffn_device eager {t_e * 1e6:6.1f} "
                    f"({te / t_e:4.2f}x eager torch: {c['eager_share'] * 100:3.0f}% of the graph's)  sparse_ffn eager "
                    f"{t_s * 1e6:6.1f} ({te / t_s:4.2f}x: {c['sparse_ffn_eager_share'] * 100:3.0f}%) graph {t_sg * 1e6:6.1f}")
            if copies is not None:
                it = iter(range(10 ** 9))

                def cyc(it=it):
                    a, b, w = copies[next(it) % len(copies)]
                    return cupy_.ffn_device(x, a, b, w, "drelu", active=mask, out=out)
                t4 = graph_time(cyc)
                c.update(graph_4sets_us=t4 * 1e6, x_torch_graph_4sets=tg / t4)
                line += f"  4 weight sets: graph {t4 * 1e6:6.1f} us ({tg / t4:4.2f}x torch)"
            row["configs"].append(c)
            print(line)
        rows.append(row)
        cupy_.GIVEN1_CLUSTER = "auto"
        del wg, wu, wd, copies
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def host_breakdown():
    """Python time per call of the given path's pieces (medians of 7 x 200 calls)."""
    p = make_ffn(D, F, tokens=1, sparsity=0.9, activation="drelu", dtype=np.float16, seed=0)
    x = cp.asarray(p["x"][0].astype(np.float16))
    wg, wu, wd = (cp.asarray(p[k]) for k in ("w_gate", "w_up", "w_down"))
    mask = cp.asarray(np.isin(np.arange(F), p["active"]))
    x2, out = x.reshape(1, -1), cp.empty((1, D), cp.float16)
    def drv(on, f):
        def g():
            cupy_.GIVEN1_DRIVER_LAUNCH = on
            f()
        return g
    act = ms.get_activation("drelu")
    codes, out1 = cupy_._given1_codes(x, wg, act, 0.0), cp.empty((D,), cp.float16)
    lean = lambda: ms.sparse_ffn(x, wg, wu, wd, "drelu", backend="cupy", active=mask)   # noqa: E731
    dev = lambda: cupy_.ffn_device(x2, wg, wu, wd, "drelu", active=mask, out=out)       # noqa: E731
    cases = {
        "sparse_ffn given (lean path), driver launch": lean,
        "sparse_ffn given (lean path), RawKernel call": lean,
        "ffn_device given, driver launch": dev,
        "ffn_device given, RawKernel call": dev,
        "  cupy_.sparse_ffn_cached (no front door)": lambda: cupy_.sparse_ffn_cached(x, wg, wu, wd, "drelu",
                                                                                   active=mask),
        "  cupy_._given1 alone (out given), driver launch": lambda: cupy_._given1(x, wg, wu, wd, act, mask, out1,
                                                                                 codes),
        "cupy.empty(4096 fp16)": lambda: cp.empty((D,), cp.float16),
        "x[0] of a (1, D) CuPy array (indexing)": lambda: x2[0],
        "Device().id + get_current_stream().ptr": lambda: (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr),
        "runtime.getDevice() + get_current_stream().ptr": lambda: (cp.cuda.runtime.getDevice(),
                                                                   cp.cuda.get_current_stream().ptr),
    }
    res = {}
    for name, f in cases.items():
        cupy_.GIVEN1_DRIVER_LAUNCH = "RawKernel" not in name
        for _ in range(200):
            f()
        cp.cuda.Device().synchronize()
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(200):
                f()
            ts.append((time.perf_counter() - t) / 200)
            cp.cuda.Device().synchronize()
        res[name] = float(np.median(ts) * 1e6)
        print(f"{name:50s} {res[name]:7.2f} us host per call")
    cupy_.GIVEN1_DRIVER_LAUNCH = True
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", action="store_true", help="also the host time per call of the pieces")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the rungs this many times (a spread)")
    ap.add_argument("--no-4sets", action="store_true", help="skip the rows cycling over 4 weight copies")
    ap.add_argument("--json", default="given1_probe.json")
    args = ap.parse_args(argv)
    res = dict(cpu=fs.cpu_model(), gpu=cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
    print("CPU:", res["cpu"], " GPU:", res["gpu"])
    if args.host:
        res["host_us"] = host_breakdown()
    res["rounds"] = []
    for r in range(args.rounds):
        print(f"\n=== round {r + 1} of {args.rounds}")
        res["rounds"].append(rungs(sets4=not args.no_4sets))
    res["rows"] = res["rounds"][-1]
    with open(args.json, "w") as fh:
        json.dump(res, fh, indent=1)
    print("wrote", args.json)


if __name__ == "__main__":
    main()
