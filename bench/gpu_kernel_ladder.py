"""The GPU decode kernels rung by rung (llm.c dev/cuda style): validate each against NumPy, then time it.

Kernels of ``minisparse/kernels/decode.cu`` (the graph decode step of
:class:`minisparse.kernels.decode_cuda.GraphDecoder`), at Mistral-7B shapes, float16 and
float32 weights, batch 1:

* GEMV ``y = W x``: gemv_naive (a thread per row) -> gemv_warp (a warp per row, coalesced
  scalar loads) -> gemv_warp_vec16 (a warp per row, 16-byte loads, 4 in flight per lane);
  cuBLAS (``W @ x`` in CuPy, eager: it cannot be captured) for comparison;
* decode attention: attn_decode_naive (a thread per head) -> attn_decode (a block per head)
  -> attn_decode_split (a block per 32-key chunk, merged by the last block of each head);
* the rest of a step: qkv_rope (RMSNorm + q/k/v GEMV + rotary + KV write), one FFN of a
  Mistral-7B layer at 90% sparsity (dense: ffn_gateup + GEMV; skip: ffn_gate_select +
  ffn_down_rows; given active set, an oracle: ffn_gateup_list + ffn_down_rows; the
  residual add included), argmax_advance, embed, rmsnorm (used by the CuPy-backend paths).

Each kernel's output is poisoned (NaN) before the check and compared with a float64 NumPy
result. Times are GPU times per call from CUDA-graph replays of n calls (no launch gaps of
the host), median of repeats; weight-streaming kernels rotate among enough weight copies
that the 60 MB L2 cannot hold them. GB/s counts the bytes a call must move (weights once,
vectors once); "% copy" compares with a device-to-device copy measured in the same run
(bytes read + written).

    PYTHONPATH=. python3 bench/gpu_kernel_ladder.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import numpy as np

L2_BYTES = 60e6


def graph_time(cp, fns, repeats, n_inner=20):
    """GPU seconds per call: n_inner calls (cycling through fns) captured in a graph, replays
    timed with events, median over repeats."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for f in fns:
            f()
        s.synchronize()
        s.begin_capture()
        for i in range(n_inner):
            fns[i % len(fns)]()
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
    return float(np.median(ts))


def eager_time(cp, fns, repeats, n_inner=20):
    """GPU seconds per call of eager launches (for cuBLAS, which a graph cannot capture)."""
    for f in fns:
        f()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(repeats):
        start.record()
        for i in range(n_inner):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        ts.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / n_inner)
    return float(np.median(ts))


def rel_err(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if not np.isfinite(got).all():
        return float("inf")                                            # an unwritten (NaN-poisoned) output
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check(name, got, want, tol, failures):
    e = rel_err(got, want)
    ok = e <= tol
    print(f"  validate {name}: rel err {e:.2e} ({'ok' if ok else 'FAIL'}, tol {tol:.0e})")
    if not ok:
        failures.append(name)
    return e


def print_table(rows, title):
    print(f"\n{title}")
    print(f"{'kernel':<44} {'shape':<26} {'us':>9} {'GB/s':>8} {'% copy':>7} {'x rung 1':>9}  rel err")
    for r in rows:
        print(f"{r['kernel']:<44} {r['shape']:<26} {r['us']:9.2f} {r['GBs']:8.0f} {r['pct_copy']:6.0f}% "
              f"{r['x_first']:8.1f}x  " + ("   (h only)" if r['rel_err'] is None else f"{r['rel_err']:.1e}"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None, help="default bench/results/gpu_kernel_ladder.json")
    ap.add_argument("--skip-gemv", action="store_true", help="leave out the GEMV ladder (the slowest part)")
    ap.add_argument("--ffn-only", action="store_true", help="only the FFN rows (no GEMV, no attention)")
    ap.add_argument("--gemv-u", action="store_true",
                    help="also the GEMV rung with 8 loads in flight per lane (y += W x, every GEMV shape)")
    ap.add_argument("--dtypes", default="float16,float32", help="weight dtypes, comma-separated")
    args = ap.parse_args(argv)
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # no CuPy / no GPU: say so, no traceback
        print(f"error: this benchmark needs CuPy and a CUDA GPU ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from minisparse.kernels import decode_cuda as dc
    from minisparse.kernels.testing import make_ffn
    from minisparse.layers import rope_tables

    repeats = args.repeats or (5 if args.quick else 15)
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    buf = cp.empty((256 if args.quick else 2048) * 1024 ** 2 // 4, dtype=cp.float32)
    buf2 = cp.empty_like(buf)
    t_copy = eager_time(cp, [lambda: cp.copyto(buf2, buf)], repeats, n_inner=5)
    copy_GBs = 2 * buf.nbytes / t_copy / 1e9
    del buf, buf2
    print(f"GPU: {gpu}; copy bandwidth {copy_GBs:.0f} GB/s (read + write)")

    if args.quick:
        D, F, H, K, Dh, V, S_list = 512, 1792, 8, 2, 64, 4000, [16, 144]
    else:
        D, F, H, K, Dh, V, S_list = 4096, 14336, 32, 8, 128, 32000, [16, 144, 1024]
    rng = cp.random.RandomState(0)
    failures, rows = [], []
    i32, f32 = np.int32, np.float32

    def row(kernel, shape, dtype, t, nbytes, first_t, err):
        r = dict(kernel=kernel, shape=shape, dtype=dtype, us=t * 1e6, GBs=nbytes / t / 1e9,
                 pct_copy=100 * nbytes / t / 1e9 / copy_GBs, x_first=first_t / t, rel_err=err, bytes=nbytes)
        rows.append(r)
        return r

    if args.ffn_only:
        args.skip_gemv, S_list = True, []
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("float16", "float32") for d in dtypes):
        print(f"error: --dtypes takes float16 and/or float32, got {args.dtypes!r}", file=sys.stderr)
        return 2
    for wname, wdt in ((d, np.dtype(d).type) for d in dtypes):
        k = dc.kernels(wdt)
        wb = np.dtype(wdt).itemsize
        trows = []
        # ------------------------------------------------------------------ GEMV ladder
        gemv_shapes = (("ffn gate/up", F, D), ("ffn down (W^T)", D, F), ("q,k,v", (H + 2 * K) * Dh, D),
                       ("o-proj", D, H * Dh), ("LM head", V, D))
        for label, N, Kd in (() if args.skip_gemv else gemv_shapes):
            nbytes = N * Kd * wb + 4 * (Kd + N)
            sets = max(1, math.ceil(3 * L2_BYTES / (N * Kd * wb)))
            Ws = [dc.pad_rows(cp, rng.standard_normal((N, Kd), dtype=cp.float32) * 0.02, wdt) for _ in range(sets)]
            x = cp.zeros(Ws[0].shape[1], dtype=cp.float32)
            x[:Kd] = rng.standard_normal(Kd, dtype=cp.float32)
            want = Ws[0].get().astype(np.float64) @ x.get().astype(np.float64)
            y = cp.empty(N, dtype=cp.float32)
            first = None
            for kind in ("naive", "warp", "vec16"):
                y.fill(np.nan)
                dc.gemv(Ws[0], x, y, kind=kind, K=Kd)
                err = check(f"gemv_{kind} {label} {wname}", y.get(), want, 1e-5, failures)
                reps = 3 if kind == "naive" else repeats
                t = graph_time(cp, [lambda W=W: dc.gemv(W, x, y, kind=kind, K=Kd) for W in Ws], reps,
                               n_inner=4 if kind == "naive" else 20)
                first = first or t
                trows.append(row(f"gemv_{kind}" if kind != "vec16" else "gemv_warp_vec16",
                                 f"{label} {N}x{Kd}", wname, t, nbytes, first, err))
            xw = x[:Kd].astype(wdt)
            Wv = [W[:, :Kd] for W in Ws]                                 # strided views: cuBLAS lda
            yb = Wv[0] @ xw
            err = check(f"cublas {label} {wname}", yb.get(), want, 1e-5 if wdt == np.float32 else 3e-3, failures)
            t = eager_time(cp, [lambda W=W: W @ xw for W in Wv], repeats)
            trows.append(row("cuBLAS W @ x (eager)", f"{label} {N}x{Kd}", wname, t, nbytes, first, err))
            del Ws, Wv
            cp.get_default_memory_pool().free_all_blocks()
        # ------------------------------------------------------ GEMV: loads in flight per lane
        for label, N, Kd in (gemv_shapes if args.gemv_u else ()):
            nbytes = N * Kd * wb + 4 * (Kd + N)
            sets = max(1, math.ceil(3 * L2_BYTES / (N * Kd * wb)))
            Ws = [dc.pad_rows(cp, rng.standard_normal((N, Kd), dtype=cp.float32) * 0.02, wdt) for _ in range(sets)]
            x = cp.zeros(Ws[0].shape[1], dtype=cp.float32)
            x[:Kd] = rng.standard_normal(Kd, dtype=cp.float32)
            want = Ws[0].get().astype(np.float64) @ x.get().astype(np.float64)
            y = cp.zeros(N, dtype=cp.float32)
            ld = i32(Ws[0].shape[1])
            first = None
            for name in ("gemv_vec16_add", "gemv_vec16_add_u8"):
                fn = k[name]
                call = lambda W, fn=fn: fn(((N + 7) // 8,), (256,), (W, x, y, i32(N), ld, i32(Kd), f32(1e-6)))
                y.fill(0)
                call(Ws[0])
                err = check(f"{name} {label} {wname}", y.get(), want, 1e-5, failures)
                t = graph_time(cp, [lambda W=W: call(W) for W in Ws], repeats)
                first = first or t
                trows.append(row("gemv_warp_vec16 (y += W x), U = " + ("8" if name.endswith("u8") else "4") +
                                 " loads in flight", f"{label} {N}x{Kd}", wname, t, nbytes, first, err))
            del Ws
            cp.get_default_memory_pool().free_all_blocks()
        # ------------------------------------------------------------------ attention
        for S in S_list:
            q = rng.standard_normal(H * Dh, dtype=cp.float32)
            kc = rng.standard_normal((K, S, Dh), dtype=cp.float32)
            vc = rng.standard_normal((K, S, Dh), dtype=cp.float32)
            o = cp.empty(H * Dh, dtype=cp.float32)
            pos = cp.array([S - 1], dtype=cp.int32)
            scratch = cp.empty((H, S), dtype=cp.float32)
            scale = f32(1 / math.sqrt(Dh))
            qh = q.get().astype(np.float64).reshape(H, Dh)
            kh, vh = kc.get().astype(np.float64), vc.get().astype(np.float64)
            rep = H // K
            sc = np.einsum("hd,hsd->hs", qh, kh[np.arange(H) // rep]) / math.sqrt(Dh)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            want = np.einsum("hs,hsd->hd", p, vh[np.arange(H) // rep]).reshape(-1)
            calls = {
                "attn_decode_naive": lambda: k["attn_naive"](((H + 31) // 32,), (32,),
                                                             (q, kc, vc, o, pos, i32(H), i32(K), i32(Dh), i32(S),
                                                              scale, scratch)),
                "attn_decode": lambda: k["attn"]((H,), (dc.ATTN_THREADS,), (q, kc, vc, o, pos, i32(H), i32(K), i32(Dh),
                                                                          i32(S), scale),
                                                 shared_mem=dc.attn_shared_bytes(S, Dh)),
                "attn_decode_split": lambda: k["attn_split"]((H, dc.attn_splits(S)), (256,),
                                                             (q, kc, vc, o, pos, i32(H), i32(K), i32(Dh), i32(S),
                                                              scale, part, ticket)),
            }
            part = cp.zeros(H * dc.attn_splits(S) * (Dh + 2), dtype=cp.float32)
            ticket = cp.zeros(H, dtype=cp.int32)
            first = None
            nbytes = 2 * K * S * Dh * 4 + 2 * H * Dh * 4
            for name, f in calls.items():
                o.fill(np.nan)
                f()
                err = check(f"{name} S={S}", o.get(), want, 1e-5, failures)
                t = graph_time(cp, [f], repeats)
                first = first or t
                trows.append(row(name, f"H{H}/K{K} Dh{Dh} S{S}", "float32", t, nbytes, first, err))
        # ------------------------------------------------------------------ the rest of a step
        Dp = dc._pad(D)
        x = cp.zeros(Dp, dtype=cp.float32)
        x[:D] = rng.standard_normal(D, dtype=cp.float32)
        sc_ = cp.zeros(Dp, dtype=cp.float32)
        sc_[:D] = 1 + 0.1 * rng.standard_normal(D, dtype=cp.float32)
        xn = cp.empty(Dp, dtype=cp.float32)
        xh, sh = x.get()[:D].astype(np.float64), sc_.get()[:D].astype(np.float64)
        want = xh / np.sqrt(np.mean(xh * xh) + 1e-5) * sh
        f = lambda: k["rmsnorm"]((1,), (1024,), (x, dc._NULL, sc_, xn, i32(D), f32(1e-5)))  # (backend FFN paths)
        xn.fill(np.nan)
        f()
        err = check("rmsnorm", xn.get()[:D], want, 1e-5, failures)
        t = graph_time(cp, [f], repeats)
        trows.append(row("rmsnorm", f"D{D}", "float32", t, 12 * D, t, err))

        S = 144
        eps = 1e-5
        rstd = 1.0 / np.sqrt(np.mean(xh * xh) + eps)                  # RMSNorm is fused into the GEMVs below
        R = (H + 2 * K) * Dh
        sets = max(1, math.ceil(3 * L2_BYTES / (R * D * wb)))
        Wqs = [dc.pad_rows(cp, rng.standard_normal((R, D), dtype=cp.float32) * 0.02, wdt) for _ in range(sets)]
        cos, sin = (cp.asarray(a[:, :Dh // 2].astype(np.float32)) for a in rope_tables(Dh, S, 1e4, np.float64))
        qb = cp.empty(H * Dh, dtype=cp.float32)
        kc = cp.full((K, S, Dh), np.nan, dtype=cp.float32)
        vc = cp.full((K, S, Dh), np.nan, dtype=cp.float32)
        pos = cp.array([S - 5], dtype=cp.int32)
        fq = [lambda W=W: k["qkv_rope"](((R // 2 + 7) // 8,), (256,),
                                        (W, dc._NULL, x, i32(Dp), i32(D), f32(eps), i32(H), i32(K), i32(Dh),
                                         cos, sin, pos, qb, kc, vc, i32(S))) for W in Wqs]
        qb.fill(np.nan)
        fq[0]()
        lin = rstd * (Wqs[0].get().astype(np.float64)[:, :D] @ xh)
        half, pp = Dh // 2, S - 5
        c_, s_ = cos.get()[pp].astype(np.float64), sin.get()[pp].astype(np.float64)

        def rot(v):                                                     # rotate-half, per head
            v = v.reshape(-1, Dh)
            a, b = v[:, :half], v[:, half:]
            return np.concatenate([a * c_ - b * s_, b * c_ + a * s_], axis=1).reshape(-1)
        want = np.concatenate([rot(lin[:H * Dh]), rot(lin[H * Dh:(H + K) * Dh]), lin[(H + K) * Dh:]])
        got = np.concatenate([qb.get(), kc.get()[:, pp].reshape(-1), vc.get()[:, pp].reshape(-1)])
        err = check(f"qkv_rope (norm fused) {wname}", got, want, 1e-5, failures)
        t = graph_time(cp, fq, repeats)
        trows.append(row("qkv_rope (norm+rope+KV)", f"{R}x{D}", wname, t, R * D * wb, t, err))
        del Wqs, fq

        # ------------------------------------------------------------------ one FFN at 90% sparsity
        # x raw (the norm is fused), exactly 10% of the neurons active (kernels.testing.make_ffn)
        pf = make_ffn(D, F, tokens=1, sparsity=0.9, activation="drelu", dtype=np.float32, seed=0)
        A = int(pf["active"].size)
        x0 = cp.zeros(Dp, dtype=cp.float32)
        x0[:D] = cp.asarray(pf["x"][0])
        xr = cp.zeros(Dp, dtype=cp.float32)                            # the residual the FFN adds to
        xh0 = pf["x"][0].astype(np.float64)
        xn0 = xh0 / np.sqrt(np.mean(xh0 * xh0) + eps)
        Wg = dc.pad_rows(cp, cp.asarray(pf["w_gate"]), wdt)
        Wu = dc.pad_rows(cp, cp.asarray(pf["w_up"]), wdt)
        Wd = dc.pad_rows(cp, cp.asarray(pf["w_down"]), wdt)             # (F, Dp) neuron-major
        WdT = dc.pad_rows(cp, cp.asarray(pf["w_down"]).T, wdt)          # (D, Fp)
        f64 = lambda a: a.get().astype(np.float64)
        wg64, wu64, wd64 = f64(Wg)[:, :D], f64(Wu)[:, :D], f64(Wd)[:, :D]
        want = (np.maximum(wg64 @ xn0, 0) * np.maximum(wu64 @ xn0, 0)) @ wd64
        h = cp.empty(dc._pad(F), dtype=cp.float32)
        hv = cp.empty(F, dtype=cp.float32)
        idx = cp.empty(F, dtype=cp.int32)
        cnt = cp.zeros(1, dtype=cp.int32)
        gidx = cp.asarray(pf["active"].astype(np.int32))
        gcnt = cp.asarray(np.array([A], dtype=np.int32))
        V16 = 16 // wb
        ncol = (Dp + 32 * V16 * dc.NV - 1) // (32 * V16 * dc.NV)
        sms = int(props["multiProcessorCount"])
        G = max(1, -(-dc.DOWN_BLOCKS_PER_SM * sms // ncol))
        dense_args = lambda: (Wg, Wu, x0, h, i32(F), i32(Dp), i32(D), f32(eps), i32(0), i32(0), f32(0), i32(1),
                              dc._NULL, pos, i32(0), i32(1))
        ffns = {
            "FFN dense: ffn_gateup + gemv": [
                lambda: k["ffn_gateup"](((F + 7) // 8,), (256,), dense_args()),
                lambda: k["gemv_vec16_add"](((D + 7) // 8,), (256,), (WdT, h, xr, i32(D), i32(dc._pad(F)), i32(D), f32(eps)))],
            "FFN skip: gate_select + down_rows": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_select"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                       i32(0), i32(0), f32(0), i32(1), cnt, idx, hv)),
                lambda: k["ffn_down_rows"]((ncol, G), (256,), (cnt, idx, hv, Wd, xr, i32(Dp)))],
            "FFN given (oracle): gateup_list + down_rows": [
                lambda: k["ffn_gateup_list"](((A + 7) // 8,), (256,), (Wg, Wu, x0, i32(Dp), i32(D), f32(eps), i32(0),
                                                                        i32(0), f32(0), i32(1), gcnt, gidx, hv)),
                lambda: k["ffn_down_rows"]((ncol, G), (256,), (gcnt, gidx, hv, Wd, xr, i32(Dp)))],
            "FFN skip: gate_select2 + down_rows": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_select2"](((F + 15) // 16,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                         i32(0), i32(0), f32(0), i32(1), cnt, idx, hv)),
                lambda: k["ffn_down_rows"]((ncol, G), (256,), (cnt, idx, hv, Wd, xr, i32(Dp)))],
            "FFN given (oracle): gateup_list4 + down_rows": [
                lambda: k["ffn_gateup_list4"](((A + 1) // 2,), (256,), (Wg, Wu, x0, i32(Dp), i32(D), f32(eps), i32(0),
                                                                         i32(0), f32(0), i32(1), gcnt, gidx, hv)),
                lambda: k["ffn_down_rows"]((ncol, G), (256,), (gcnt, gidx, hv, Wd, xr, i32(Dp)))],
            "  (given first half alone: gateup_list)": [
                lambda: k["ffn_gateup_list"](((A + 7) // 8,), (256,), (Wg, Wu, x0, i32(Dp), i32(D), f32(eps), i32(0),
                                                                        i32(0), f32(0), i32(1), gcnt, gidx, hv))],
            "  (given first half alone: gateup_list4)": [
                lambda: k["ffn_gateup_list4"](((A + 1) // 2,), (256,), (Wg, Wu, x0, i32(Dp), i32(D), f32(eps), i32(0),
                                                                         i32(0), f32(0), i32(1), gcnt, gidx, hv))],
            "FFN skip: gate pass + up_list4 + down_rows": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_select"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                       i32(0), i32(0), f32(0), i32(0), cnt, idx, hv)),
                lambda: k["ffn_up_list4"]((min((F + 1) // 2, 8 * sms),), (256,), (Wu, x0, i32(Dp), i32(D), f32(eps),
                                                                                  i32(0), f32(0), cnt, idx, hv)),
                lambda: k["ffn_down_rows"]((ncol, G), (256,), (cnt, idx, hv, Wd, xr, i32(Dp)))],
            "FFN skip: gate_block (block reads its kept up rows) + down_rows": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_block"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                      i32(0), i32(0), f32(0), i32(1), cnt, idx, hv)),
                lambda: k["ffn_down_rows"]((ncol, G), (256,), (cnt, idx, hv, Wd, xr, i32(Dp)))],
            "FFN skip: gate_block8 (8 loads in flight) + down_rows": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_block8"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                       i32(0), i32(0), f32(0), i32(1), cnt, idx, hv)),
                lambda: k["ffn_down_rows"]((ncol, G), (256,), (cnt, idx, hv, Wd, xr, i32(Dp)))],
            "  (skip first half alone: gate_block)": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_block"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                      i32(0), i32(0), f32(0), i32(1), cnt, idx, hv))],
            "  (skip first half alone: gate_block8)": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_block8"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                       i32(0), i32(0), f32(0), i32(1), cnt, idx, hv))],
            "  (skip first half alone: gate pass, 8 loads in flight)": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_block8"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                       i32(0), i32(0), f32(0), i32(0), cnt, idx, hv))],
            "  (skip first half alone: dense gate GEMV, norm fused)": [
                lambda: k["gemv_vec16_norm"](((F + 7) // 8,), (256,), (Wg, x0, h, i32(F), i32(Dp), i32(D), f32(eps)))],
            "  (skip first half alone: dense gate GEMV + a memset node, as the gate-pass rows)": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["gemv_vec16_norm"](((F + 7) // 8,), (256,), (Wg, x0, h, i32(F), i32(Dp), i32(D), f32(eps)))],
            "  (skip first half alone: gate pass, 2 rows/warp)": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_select2"](((F + 15) // 16,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                         i32(0), i32(0), f32(0), i32(0), cnt, idx, hv))],
            "  (skip first half alone: gate pass)": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_select"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                       i32(0), i32(0), f32(0), i32(0), cnt, idx, hv))],
            "  (skip first half alone: gate_select)": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_select"](((F + 7) // 8,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                       i32(0), i32(0), f32(0), i32(1), cnt, idx, hv))],
            "  (skip first half alone: gate_select2)": [
                lambda: cp.cuda.runtime.memsetAsync(cnt.data.ptr, 0, 4, cp.cuda.get_current_stream().ptr),
                lambda: k["ffn_gate_select2"](((F + 15) // 16,), (256,), (Wg, Wu, x0, i32(F), i32(Dp), i32(D), f32(eps),
                                                                         i32(0), i32(0), f32(0), i32(1), cnt, idx, hv))],
        }
        nbytes = {"dense": 3 * F * D * wb, "skip": (F + 2 * A) * D * wb, "given": 3 * A * D * wb}
        half_bytes = {"gateup_list": 2 * A * D * wb, "gateup_list4": 2 * A * D * wb, "gate_select2": (F + A) * D * wb,
                      "gate_select": (F + A) * D * wb, "gate pass": F * D * wb, "gate pass, 2 rows/warp": F * D * wb,
                      "gate_block": (F + A) * D * wb, "gate_block8": (F + A) * D * wb,
                      "gate pass, 8 loads in flight": F * D * wb, "dense gate GEMV, norm fused": F * D * wb,
                      "dense gate GEMV + a memset node, as the gate-pass rows": F * D * wb}
        t_dense = None
        for name, calls in ffns.items():
            xr.fill(0)
            for f in calls:
                f()
            if name.startswith("  ("):                               # a first half alone: timed, checked via its h
                t = graph_time(cp, [lambda calls=calls: [f() for f in calls]], repeats)
                kname = name.split(": ")[1].rstrip(")")
                trows.append(row(name, f"{F}x{D} A={A}", wname, t, half_bytes[kname], t_dense, None))
                continue
            err = check(f"{name} {wname}", xr.get()[:D], want, 1e-5, failures)
            call = lambda calls=calls: [f() for f in calls]
            t = graph_time(cp, [call], repeats)
            t_dense = t_dense or t
            kind = name.split()[1].rstrip(":")
            r = row(name, f"{F}x{D} A={A}", wname, t, nbytes[kind], t_dense, err)
            r["x_rung1_is"] = "speed-up over the dense FFN"
            trows.append(r)
        del Wg, Wu, Wd, WdT
        cp.get_default_memory_pool().free_all_blocks()

        logits = rng.standard_normal(V, dtype=cp.float32)
        toks = cp.zeros(S + 1, dtype=cp.int32)
        pos0 = cp.zeros(1, dtype=cp.int32)
        npr = cp.zeros(1, dtype=cp.int32)
        f = lambda: k["argmax"]((1,), (1024,), (logits, i32(V), toks, pos0, npr, i32(S + 1), dc._NULL, i32(0),
                                                 dc._NULL))
        f()
        ok = int(toks.get()[1]) == int(np.argmax(logits.get()))
        print(f"  validate argmax_advance: {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append("argmax")
        t = graph_time(cp, [f], repeats)
        trows.append(row("argmax_advance", f"V{V}", "float32", t, 4 * V, t, 0.0 if ok else float("inf")))

        table = dc.pad_rows(cp, rng.standard_normal((V, D), dtype=cp.float32), wdt)
        toks[0] = 7
        pos0.fill(0)
        f = lambda: k["embed"](((D + 255) // 256,), (256,), (table, i32(Dp), toks, pos0, x, i32(D), f32(1), i32(0)))
        x.fill(np.nan)
        f()
        err = check(f"embed {wname}", x.get()[:D], table.get()[7, :D].astype(np.float64), 1e-7, failures)
        t = graph_time(cp, [f], repeats)
        trows.append(row("embed", f"D{D}", wname, t, D * (wb + 4), t, err))
        del table
        cp.get_default_memory_pool().free_all_blocks()
        print_table(trows, f"GPU {gpu}, {wname} weights, batch 1 (copy bandwidth {copy_GBs:.0f} GB/s)")

    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     "gpu_kernel_ladder" + ("_quick" if args.quick else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(dict(gpu=gpu, copy_GBs=copy_GBs, cupy=cp.__version__, platform=platform.platform(),
                       quick=args.quick, rows=rows, failures=failures), fh, indent=1)
    print(f"\nwrote {path}")
    if failures:
        print(f"VALIDATION FAILED: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
