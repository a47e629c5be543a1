"""Batch-1 (and batched) FFN latency vs activation sparsity: dense BLAS vs neuron skipping.

    python bench/ffn_sparse.py                 # CPU: numpy / torch dense, numba skipping
    python bench/ffn_sparse.py --gpu-only      # GPU: cupy dense (cuBLAS) vs cupy sparse, fp16 + fp32
    python bench/ffn_sparse.py --quick         # tiny sizes, seconds

Each row: median time, speed-up over the dense baseline of the same device, the *ideal*
speed-up (dense bytes / bytes the method must read), the fraction of ideal reached, and
the achieved bandwidth (bytes that must be read / time) against this machine's copy
bandwidth, measured in the same run.

Bytes that must be read (weights dominate; w = bytes per weight, a = fraction active):
dense 3*F*D*w; gate-derived skipping (F + 2*a*F)*D*w (the gate stays dense); a given
active set 3*a*F*D*w. Sparsity is constructed exactly (minisparse.kernels.testing.make_ffn:
a bias feature x[0] = 1 and gate rows biased negative for the inactive neurons). Every
method is validated against the float64 dense FFN before it is timed. Timings are
interleaved (method by method inside each repeat) so that load from other processes
hits all methods alike; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# No process settings here: minisparse makes its own defaults (minisparse/runtime.py: the
# OpenBLAS idle-thread timeout, Numba's threads started with passive OpenMP waiting), so
# these timings are what a plain `import numpy; import minisparse` program gets.
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import minisparse as ms  # noqa: E402
from minisparse.kernels.testing import dense_ffn, make_ffn  # noqa: E402

ACT = "drelu"
SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99]
BATCHES = [1, 2, 4, 8, 16, 32]


# ======================================================================================
# helpers
# ======================================================================================
def rel_err(y, ref) -> float:
    y = np.asarray(y, dtype=np.float64).reshape(ref.shape)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


def validate(name, y, ref, tol):
    e = rel_err(y, ref)
    if not e <= tol:
        raise SystemExit(f"VALIDATION FAILED: {name}: relative error {e:.3g} > {tol:.1g}")
    return e


def time_interleaved(fns: dict, repeats: int, min_time: float = 0.02) -> dict:
    """Median seconds per call of each fn, interleaved across repeats.

    Each measurement runs a fn `n` times back to back, n chosen so one measurement lasts
    >= min_time (so the timer's resolution and call overheads do not dominate).
    """
    ns = {}
    for k, f in fns.items():
        f()                                                           # warm-up (and JIT)
        t0 = time.perf_counter()
        f()
        dt = max(time.perf_counter() - t0, 1e-7)
        ns[k] = max(1, int(min_time / dt))
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            n = ns[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t0) / n)
    LAST_SAMPLES.clear()
    LAST_SAMPLES.update(samples)
    return {k: float(np.median(v)) for k, v in samples.items()}


LAST_SAMPLES: dict = {}          # seconds per call of every repeat of the last time_interleaved


def spread(samples) -> dict:
    """min / 25th / 75th percentile / max of per-call seconds (the noise of a shared machine)."""
    v = np.asarray(samples, dtype=np.float64)
    return dict(t_min=float(v.min()), t_p25=float(np.percentile(v, 25)), t_p75=float(np.percentile(v, 75)),
                t_max=float(v.max()), n=int(v.size))


def cpu_model() -> str:
    """lscpu's model name (what issue 14 asks to report with every CPU figure)."""
    try:
        import subprocess
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def cpu_copy_bandwidth(nbytes: int, repeats: int = 7) -> dict:
    """Copy bandwidth (bytes read + written per second): NumPy (1 thread) and Numba (all)."""
    a = np.random.default_rng(0).random(nbytes // 8)
    b = np.empty_like(a)
    out = {}
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t0)
    out["numpy_copy_GBs"] = 2 * a.nbytes / np.median(ts) / 1e9
    try:
        import numba

        @numba.njit(parallel=True, cache=False)
        def pcopy(dst, src):
            for i in numba.prange(src.shape[0]):
                dst[i] = src[i]

        pcopy(b, a)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pcopy(b, a)
            ts.append(time.perf_counter() - t0)
        out["numba_copy_GBs"] = 2 * a.nbytes / np.median(ts) / 1e9
    except ImportError:
        pass
    out["copy_GBs"] = max(v for k, v in out.items() if k.endswith("_GBs"))
    return out


def ideal_bytes(method: str, F: int, D: int, n_active: int, wbytes: int) -> float:
    if "dense" in method:
        return 3.0 * F * D * wbytes
    if "active" in method:
        return 3.0 * n_active * D * wbytes
    return (F + 2.0 * n_active) * D * wbytes


def print_table(rows, title):
    print(f"\n{title}")
    hdr = (f"{'D x F':>12} {'T':>3} {'sparsity':>8} {'method':<26} {'time':>10} {'speed-up':>8} "
           f"{'ideal':>6} {'of ideal':>8} {'GB/s':>7} {'of copy':>7} {'path':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t = r["time_s"]
        ts = f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"
        print(f"{r['dim']:>5}x{r['ffn_dim']:<6} {r['tokens']:>3} {r['sparsity']:>8.2f} {r['method']:<26} {ts:>10} "
              f"{r['speedup']:>7.2f}x {r['ideal']:>5.2f}x {r['frac_ideal']:>7.0%} {r['GBs']:>7.1f} "
              f"{r['frac_copy']:>6.0%} {r.get('path', ''):>6}")


def make_row(method, D, F, T, sparsity, n_active, t, t_dense, wbytes, copy_GBs, path=""):
    need = ideal_bytes(method, F, D, n_active, wbytes)
    ideal = 3.0 * F * D * wbytes / need if need > 0 else float("inf")
    speed = t_dense / t
    gbs = need / t / 1e9
    return dict(method=method, dim=D, ffn_dim=F, tokens=T, sparsity=sparsity, n_active=int(n_active),
                time_s=t, speedup=speed, ideal=ideal, frac_ideal=speed / ideal if ideal != float("inf") else 0.0,
                GBs=gbs, frac_copy=gbs / copy_GBs, path=path)


# ======================================================================================
# CPU
# ======================================================================================
def dense_numpy(x, wg, wu, wd):
    """The dense drelu FFN with BLAS: two GEMVs (GEMMs), relu*relu, one more GEMV."""
    g = x @ wg.T                                                      # (T, F)
    u = x @ wu.T                                                      # (T, F)
    return (np.maximum(g, 0) * np.maximum(u, 0)) @ wd                 # (T, D)


def torch_dense_fn(x, wg, wu, wd):
    try:
        import torch
    except ImportError:
        return None
    tx, tg, tu, td = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x, wg, wu, wd))

    def f():
        with torch.inference_mode():
            g = tx @ tg.T
            u = tx @ tu.T
            return (torch.relu(g) * torch.relu(u)) @ td
    return f


def cpu_case(p, sparsity, label, repeats, copy_GBs, have_numba, reference_skip, gate_variants=False):
    """Validate every CPU method on one make_ffn case against float64 truth, then time them
    interleaved; one table row per method."""
    x, wg, wu, wd, act_idx = p["x"], p["w_gate"], p["w_up"], p["w_down"], p["active"]
    T, D = x.shape
    F = wg.shape[0]
    ref = dense_ffn(x, wg, wu, wd, ACT)                               # float64 truth
    fns = {"numpy dense": lambda: dense_numpy(x, wg, wu, wd)}
    tf = torch_dense_fn(x, wg, wu, wd)
    if tf is not None:
        fns["torch dense"] = tf
    if reference_skip:
        fns["numpy skip (ref)"] = lambda: ms.sparse_ffn(x, wg, wu, wd, ACT, backend="numpy")
    if have_numba:
        from minisparse.kernels import numba_
        fns["numba skip"] = lambda: ms.sparse_ffn(x, wg, wu, wd, ACT, backend="numba")
        if gate_variants and T == 1:
            default = numba_.GATE_ONE_TOKEN
            other = "numba" if default == "blas" else "blas"

            def other_gate():
                numba_.GATE_ONE_TOKEN = other
                try:
                    return ms.sparse_ffn(x, wg, wu, wd, ACT, backend="numba")
                finally:
                    numba_.GATE_ONE_TOKEN = default
            fns[f"numba skip [{other} gate]"] = other_gate
        fns["numba given active"] = lambda: ms.sparse_ffn(x, wg, wu, wd, ACT, backend="numba",
                                                          active=act_idx)
    for k, f in fns.items():
        y = f()
        validate(f"{k} {label}", y.numpy() if hasattr(y, "numpy") else y, ref, 1e-4)
    paths = {}
    if have_numba:
        st = {}
        ms.sparse_ffn(x, wg, wu, wd, ACT, backend="numba", stats=st)
        paths["numba skip"] = st["path"]
    times = time_interleaved(fns, repeats)
    rows = []
    for k, t in times.items():
        r = make_row(k, D, F, T, sparsity, act_idx.size, t, times["numpy dense"], 4, copy_GBs, paths.get(k, ""))
        r.update(spread(LAST_SAMPLES[k]))
        r["speedup_range"] = [times["numpy dense"] / r["t_p75"], times["numpy dense"] / r["t_p25"]]
        rows.append(r)
    return rows


def bench_cpu_targets(repeats, copy_GBs):
    """Issue 14's CPU targets: Mistral-7B layer, batch 1, fp32, 0% and 90% sparsity."""
    have_numba = "numba" in ms.backends()
    rows = []
    for s in (0.9, 0.0):
        p = make_ffn(4096, 14336, tokens=1, sparsity=s, activation=ACT, dtype=np.float32, seed=0)
        rows += cpu_case(p, s, f"targets s={s}", repeats, copy_GBs, have_numba, reference_skip=False,
                         gate_variants=True)
    print_table(rows, "CPU targets: D=4096, F=14336, batch 1, fp32 (median; spread in the JSON)")
    for r in rows:
        print(f"  {r['sparsity']:.2f} {r['method']:<26} median {r['time_s'] * 1e3:8.2f} ms  "
              f"p25-p75 {r['t_p25'] * 1e3:.2f}-{r['t_p75'] * 1e3:.2f} ms  min {r['t_min'] * 1e3:.2f} ms  "
              f"speed-up {r['speedup']:.2f}x (p25-p75 time: {r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}x)")
    return rows


def bench_cpu(shapes, sparsities, batches, repeats, copy_GBs):
    have_numba = "numba" in ms.backends()
    rows = []
    for D, F in shapes:
        # ---- batch 1 vs sparsity
        for s in sparsities:
            p = make_ffn(D, F, tokens=1, sparsity=s, activation=ACT, dtype=np.float32, seed=0)
            rows += cpu_case(p, s, f"D={D} F={F} s={s}", repeats, copy_GBs, have_numba, reference_skip=True)
        print_table([r for r in rows if r["dim"] == D and r["tokens"] == 1], f"CPU, D={D}, F={F}, batch 1, fp32")
        # ---- batch 1..32 at 90% (union of the batch's active neurons = 10%)
        brows = []
        for T in batches:
            p = make_ffn(D, F, tokens=T, sparsity=0.9, activation=ACT, dtype=np.float32, seed=T)
            brows += cpu_case(p, 0.9, f"T={T}", repeats, copy_GBs, have_numba, reference_skip=False)
        print_table(brows, f"CPU, D={D}, F={F}, batch 1..{batches[-1]}, 90% sparse union, fp32")
        rows += brows
    return rows


# ======================================================================================
# GPU
# ======================================================================================
def torch_graph_dense(p, wdt, ref, repeats, n_inner=20):
    """Dense drelu FFN with torch (cuBLAS), captured in a CUDA graph: seconds per call, or None."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    tdt = torch.float16 if wdt == np.float16 else torch.float32
    wg, wu, wd = (torch.from_numpy(p[k].astype(wdt)).to("cuda") for k in ("w_gate", "w_up", "w_down"))
    x = torch.from_numpy(p["x"][0].astype(wdt)).to("cuda").to(tdt)

    def f():
        return (torch.relu(wg @ x) * torch.relu(wu @ x)) @ wd

    validate("torch dense", f().float().cpu().numpy(), ref, 2e-2 if wdt == np.float16 else 1e-4)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_inner):
            f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / n_inner)
    del g, wg, wu, wd
    torch.cuda.empty_cache()
    return float(np.median(ts))


def bench_gpu(shapes, sparsities, repeats, sweep=False):
    import cupy as cp

    from minisparse.kernels import get_backend
    get_backend("cupy")
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])

    def gpu_time(f, n_inner=50):
        """Median per-call seconds over `repeats` event-timed batches of n_inner calls."""
        for _ in range(5):
            f()
        cp.cuda.Device().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        ts = []
        for _ in range(repeats):
            start.record()
            for _ in range(n_inner):
                f()
            end.record()
            end.synchronize()
            ts.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / n_inner)
        return float(np.median(ts))

    def graph_time(f, n_inner=20):
        """GPU time per call: n_inner calls captured in a CUDA graph, replays timed with events.

        Removes the host's launch overhead (Python + CuPy, ~6+ us per launch), so this is
        the kernels' own time, back to back. Returns (seconds, None) or (None, error)."""
        s = cp.cuda.Stream(non_blocking=True)
        try:
            with s:
                for _ in range(4):
                    f()
                s.synchronize()
                s.begin_capture()
                for _ in range(n_inner):
                    f()
                g = s.end_capture()
                g.launch(s)
                s.synchronize()
                start, end = cp.cuda.Event(), cp.cuda.Event()
                ts = []
                for _ in range(repeats):
                    start.record(s)
                    g.launch(s)
                    end.record(s)
                    end.synchronize()
                    ts.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / n_inner)
            return float(np.median(ts)), None
        except Exception as e:  # capture unsupported for some op: report, do not hide
            try:
                s.end_capture()
            except Exception:
                pass
            return None, f"{type(e).__name__}: {e}"

    # copy bandwidth (bytes read + written), same run
    buf = cp.empty(2 * 1024 ** 3 // 4, dtype=cp.float32)
    buf2 = cp.empty_like(buf)
    t_copy = gpu_time(lambda: cp.copyto(buf2, buf), n_inner=5)
    copy_GBs = 2 * buf.nbytes / t_copy / 1e9
    del buf, buf2
    cp.get_default_memory_pool().free_all_blocks()
    print(f"\nGPU: {name}; copy bandwidth {copy_GBs:.0f} GB/s (read + write)")

    relu_mul = cp.ElementwiseKernel("T g, T u", "T h", "h = (g > (T)0 && u > (T)0) ? (T)(g * u) : (T)0",
                                    "bench_drelu")
    rows, sweeps = [], []
    for D, F in shapes:
        for wdt in (np.float16, np.float32):
            wbytes = np.dtype(wdt).itemsize
            for s in sparsities:
                p = make_ffn(D, F, tokens=1, sparsity=s, activation=ACT, dtype=wdt, seed=0)
                ref = dense_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], ACT)
                x = cp.asarray(p["x"][0].astype(wdt))                 # x in the weights' dtype
                wg, wu, wd = (cp.asarray(p[k]) for k in ("w_gate", "w_up", "w_down"))
                mask = cp.asarray(np.isin(np.arange(F), p["active"]))   # predicted set, on device

                def dense():
                    return relu_mul(wg @ x, wu @ x) @ wd             # cuBLAS GEMVs + 1 fused kernel

                from minisparse.kernels import cupy_

                def kernel(kind, f):                   # an older path: no two-launch given-mask path
                    def g():
                        old, cupy_.SPARSE_KERNEL = cupy_.SPARSE_KERNEL, kind
                        old1, cupy_.GIVEN1 = cupy_.GIVEN1, False
                        try:
                            return f()
                        finally:
                            cupy_.SPARSE_KERNEL, cupy_.GIVEN1 = old, old1
                    return g

                x2, out = x.reshape(1, D), cp.empty((1, D), dtype=x.dtype)
                fns = {"cupy dense": dense,
                       "cupy skip": lambda: ms.sparse_ffn(x, wg, wu, wd, ACT, backend="cupy"),
                       "cupy given active": lambda: ms.sparse_ffn(x, wg, wu, wd, ACT, backend="cupy",
                                                                  active=mask),
                       "ffn_device skip": lambda: cupy_.ffn_device(x2, wg, wu, wd, ACT, out=out),
                       "ffn_device given active": lambda: cupy_.ffn_device(x2, wg, wu, wd, ACT, active=mask, out=out)}
                for k in ("cupy skip", "cupy given active"):
                    fns[k + " [fused]"] = kernel("fused", fns[k])
                    fns[k + " [3 launches]"] = kernel("split", fns[k])
                del fns["cupy skip"]                   # = [fused]; given active: the two-launch path (default)
                tol = 2e-2 if wdt == np.float16 else 1e-4
                for k, f in fns.items():
                    validate(f"{k} D={D} F={F} s={s} {np.dtype(wdt).name}", f().get(), ref, tol)
                times = {k: gpu_time(f) for k, f in fns.items()}
                graphs = {k: graph_time(f) for k, f in fns.items() if k != "cupy dense"}
                # The rows above call one weight set again and again: at 90% the active rows
                # (35 MB fp16) stay in the 60 MB L2, which a model's next layer never finds.
                # The same calls cycling over 4 copies of the weights (L2 cold, as in a model):
                copies = [(wg, wu, wd)] + [tuple(a.copy() for a in (wg, wu, wd)) for _ in range(3)]
                for k, kw in (("ffn_device skip", {}), ("ffn_device given active", {"active": mask})):
                    it = iter(range(10 ** 9))

                    def cyc(kw=kw, it=it):
                        a, b, c = copies[next(it) % len(copies)]
                        return cupy_.ffn_device(x2, a, b, c, ACT, out=out, **kw)
                    graphs[k + " [4 weight sets]"] = graph_time(cyc)
                del copies
                # CuPy cannot capture cuBLAS calls in a graph; torch can: the dense GPU time
                tg = torch_graph_dense(p, wdt, ref, repeats)
                graphs["cupy dense"] = (tg, None) if tg else (None, "torch with CUDA unavailable")
                for k, t in times.items():
                    r = make_row(k, D, F, 1, s, p["active"].size, t, times["cupy dense"], wbytes, copy_GBs)
                    r["dtype"] = np.dtype(wdt).name
                    r["timing"] = "eager"
                    rows.append(r)
                for k, (t, err) in graphs.items():
                    if t is None:
                        print(f"  graph capture failed for {k}: {err}")
                        continue
                    t_dense = graphs["cupy dense"][0] or times["cupy dense"]
                    name = "torch dense [graph]" if k == "cupy dense" else k + " [graph]"
                    r = make_row(name, D, F, 1, s, p["active"].size, t, t_dense, wbytes, copy_GBs)
                    r["dtype"] = np.dtype(wdt).name
                    r["timing"] = "graph"
                    rows.append(r)
                if sweep and s == 0.9:
                    for bps in (1, 2, 3, 4, 6):
                        cupy_.FUSED_BLOCKS_PER_SM = bps
                        tsk, _ = graph_time(fns["cupy skip [fused]"])
                        tac, _ = graph_time(fns["cupy given active [fused]"])
                        print(f"  sweep {np.dtype(wdt).name} ffn_fused blocks/SM={bps}: skip "
                              f"{tsk * 1e6 if tsk else float('nan'):.1f} us, given active "
                              f"{tac * 1e6 if tac else float('nan'):.1f} us")
                        sweeps.append(dict(dtype=np.dtype(wdt).name, dim=D, ffn_dim=F, fused_blocks_per_sm=bps,
                                           skip_s=tsk, active_s=tac))
                    cupy_.FUSED_BLOCKS_PER_SM = 2
                del wg, wu, wd
                cp.get_default_memory_pool().free_all_blocks()
            print_table([r for r in rows if r["dim"] == D and r["dtype"] == np.dtype(wdt).name],
                        f"GPU {name}, D={D}, F={F}, batch 1, {np.dtype(wdt).name} weights")
    from minisparse.kernels import cupy_
    return rows, dict(gpu=name, copy_GBs=copy_GBs, sweeps=sweeps, compile_notes=list(cupy_.COMPILE_NOTES))


# ======================================================================================
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--gpu-only", action="store_true", help="only the CuPy rows")
    ap.add_argument("--cpu-only", action="store_true", help="only the CPU rows")
    ap.add_argument("--sweep", action="store_true", help="GPU: also sweep the kernels' grid sizes at 90%%")
    ap.add_argument("--targets", action="store_true",
                    help="only issue 14's target cases (Mistral-7B layer, batch 1; CPU 0%%/90%%, GPU 0/90%%)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per method (median)")
    ap.add_argument("--json", default=None, help="write results here (default bench/results/ffn_sparse_{cpu,gpu}.json)")
    args = ap.parse_args(argv)
    if args.quick:
        shapes, sparsities, batches, repeats = [(64, 192), (256, 768)], [0.0, 0.9], [1, 4], 3
    else:
        shapes, sparsities, batches, repeats = [(512, 1536), (4096, 14336)], SPARSITIES, BATCHES, 9
    repeats = args.repeats or repeats
    if args.targets:
        shapes, sparsities = [(4096, 14336)], [0.0, 0.9]
        repeats = args.repeats or 15
    result = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpu_model=cpu_model(),
                               runtime=ms.runtime.describe(),
                               cpus=os.cpu_count(), numpy=np.__version__, loadavg_start=os.getloadavg(),
                               threads_env={k: os.environ.get(k) for k in
                                            ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}),
                  act=ACT, quick=args.quick)
    out_default = os.path.join(os.path.dirname(__file__), "results")
    if not args.gpu_only:
        bw = cpu_copy_bandwidth(64 * 1024 ** 2 if args.quick else 512 * 1024 ** 2)
        try:
            import numba
            result["machine"]["numba_threads"] = numba.get_num_threads()
        except ImportError:
            pass
        print(f"CPU copy bandwidth: {bw}")
        result["cpu_bandwidth"] = bw
        if args.targets:
            result["cpu"] = bench_cpu_targets(repeats, bw["copy_GBs"])
        else:
            result["cpu"] = bench_cpu(shapes, sparsities, batches, repeats, bw["copy_GBs"])
        path = args.json or os.path.join(out_default, "ffn_sparse_cpu" + ("_quick" if args.quick else "") + ".json")
    if not args.cpu_only and (args.gpu_only or "cupy" in ms.backends()):
        gpu_shapes = [(256, 768)] if args.quick else [(4096, 14336)] if args.targets else [(4096, 14336), (512, 1536)]
        result["gpu"], result["gpu_info"] = bench_gpu(gpu_shapes, sparsities, 7 if args.quick else args.repeats or 15,
                                                      sweep=args.sweep)
        path = args.json or os.path.join(out_default, "ffn_sparse_gpu" + ("_quick" if args.quick else "") + ".json")
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["machine"]["runtime"] = ms.runtime.describe()
    print(f"load average at start {result['machine']['loadavg_start']}, at end {result['machine']['loadavg_end']}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
