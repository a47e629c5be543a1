"""Where a decode step's time goes: every kernel of one eager GraphDecoder step, timed by
Nsight Compute (``ncu``), beside the bytes it must read.

A Mistral-7B-shaped model cut to 2 layers (dim 4096, ffn 14336, 32/8 heads, vocab 32000),
float16 weights, drelu with 90% of the neurons exactly zero (``exactly_sparse_params``). For
each mode (dense, skip, given) the script runs itself under ncu (``--child MODE``), which
first checks the decoder's tokens and logits against the NumPy model (float64, on the same
half-rounded weights), then times each kernel of one decode step in isolation with the
caches flushed before it (as a 32-layer step streams every weight from memory), and prints
per kernel: us, the bytes its weights take, and the rate. Needs a GPU and ncu on the PATH;
writes JSON.

    python bench/decode_kernel_times.py [--json decode_kernel_times.json]

The step in the graph is faster than the sum of these (programmatic dependent launch lets
a kernel start while the one before it ends); the table says which kernel is far from its
bytes, which is what the next rung should attack.
"""
import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)                                    # decode_gpu: the NumPy reference


def child(mode: str, profile: bool = True) -> None:
    import cupy as cp
    import minisparse as ms
    from minisparse.kernels.decode_cuda import GraphDecoder, exactly_sparse_params
    cfg = ms.ModelConfig(dim=4096, n_layers=2, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000,
                         activation="drelu", max_seq_len=64, tie_embeddings=False)
    p, active = exactly_sparse_params(cfg, sparsity=0.9, seed=1, xp=cp, dtype=np.float32)
    model = ms.Transformer(cfg, params=p)                    # CuPy params: the model lives on the device
    model.to("cupy")
    dec = GraphDecoder(model, mode=mode, weight_dtype="float16", active=active if mode == "given" else None,
                       max_len=16)
    # validation (also the warm-up, not profiled): against NumPy in float64 on the half weights
    from decode_gpu import logit_err, reference
    half = {k: (cp.asnumpy(v).astype(np.float16) if not k.endswith("norm") else cp.asnumpy(v)).astype(np.float64)
            for k, v in p.items()}
    want_ids, want_lg = reference(ms.Transformer(cfg, params=half), [5, 6, 7], 2)
    del half
    ids, lg = dec.generate([5, 6, 7], 2, graph=False, return_logits=True)
    err = logit_err(lg, want_lg)
    ok = ids == want_ids and err <= 1e-3
    print(f"validation {mode}: tokens {'identical' if ids == want_ids else 'DIFFER'} {ids} / NumPy {want_ids}, "
          f"logits rel err {err:.1e}: {'ok' if ok else 'FAILED'}", file=sys.stderr)
    if not ok:
        raise SystemExit(1)
    cp.cuda.Device().synchronize()
    if not profile:
        return
    cp.cuda.profiler.start()
    dec.generate([5], 1, graph=False)                        # one step: embed, 2 layers, head
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.stop()


def kernel_family(name: str) -> str:
    base = name.split("(")[0].split("<")[0].strip()
    return base.replace("void ", "")


def parse(text: str):
    """(kernel name, seconds) in launch order from ncu's --csv output."""
    rows = []
    start = text.find('"ID"')
    if start < 0:
        raise RuntimeError("no CSV table in ncu's output:\n" + text[-2000:])
    for r in csv.DictReader(io.StringIO(text[start:])):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit, v = r["Metric Unit"], float(r["Metric Value"].replace(",", ""))
        scales = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3}
        if unit not in scales:
            raise RuntimeError(f"ncu reported gpu__time_duration in {unit!r}; expected one of {sorted(scales)}")
        scale = scales[unit]
        rows.append((kernel_family(r["Kernel Name"]), v * scale))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default="decode_kernel_times.json")
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--check-only", default=None, metavar="MODE", help="only the validation of MODE, no ncu")
    args = ap.parse_args(argv)
    if args.child or args.check_only:
        child(args.child or args.check_only, profile=not args.check_only)
        return
    if shutil.which(args.ncu) is None:
        print(f"error: Nsight Compute's ncu was not found ({args.ncu!r}); install it or pass --ncu PATH")
        return 2
    D, F, H, K, Dh, V = 4096, 14336, 32, 8, 128, 32000
    A = int(round(0.1 * F))
    weight_bytes = {  # float16 weight bytes each kernel family must read, per launch
        "qkv_rope": (H + 2 * K) * Dh * D * 2, "gemv_warp_vec16": H * Dh * D * 2, "ffn_gateup": 2 * F * D * 2,
        "ffn_gate_block": F * D * 2 + A * D * 2, "ffn_gateup_list4": 2 * A * D * 2, "ffn_down_rows": A * D * 2,
        "ffn_down_rows_il": A * D * 2,
        "head_argmax": V * D * 2}
    out = {}
    for mode in ("dense", "skip", "given"):
        cmd = [args.ncu, "--clock-control", "none", "--profile-from-start", "off", "--metrics",
               "gpu__time_duration.sum", "--csv", "--print-units", "base", sys.executable, os.path.abspath(__file__),
               "--child", mode]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            print(f"{mode}: ncu failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
            out[mode] = dict(error=(p.stdout + p.stderr)[-3000:])
            continue
        val = [ln for ln in p.stderr.splitlines() if ln.startswith("validation")]
        print("\n".join(val))
        rows = parse(p.stdout)
        total = sum(t for _, t in rows)
        print(f"\n{mode}: {len(rows)} kernels, {total * 1e6:.1f} us in all (each alone, caches flushed)")
        recs = []
        for name, t in rows:
            wb = weight_bytes.get(name)
            if name == "gemv_warp_vec16" and mode == "dense" and len([r for r in recs if r["kernel"] == name]) % 2:
                wb = F * D * 2                                # the dense FFN's down GEMV (after the o-projection)
            rate = f"{wb / t / 1e9:7.0f} GB/s" if wb else ""
            recs.append(dict(kernel=name, us=t * 1e6, weight_bytes=wb))
            print(f"  {name:<24} {t * 1e6:8.2f} us  {'' if wb is None else f'{wb / 1e6:7.1f} MB'}  {rate}")
        out[mode] = dict(kernels=recs, total_us=total * 1e6, validation=val)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
