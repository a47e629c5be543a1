"""Training throughput of the NumPy reference against the same model trained with PyTorch (CPU).

Reference configuration (issue 3): dim 256, 4 layers, 8 heads, ffn 688, seq 256, batch 16,
for swiglu and drelu. One training step = forward + hand-written backward + global-norm
clipping + AdamW, in minisparse; forward + autograd + clip_grad_norm_ + torch.optim.AdamW
in PyTorch, on a model written here in torch with the same architecture and the same
initial weights (copied from the minisparse model).

Before timing, both implementations are run in float64 on the same weights and batch and
their losses and every gradient are compared (the hand-written backward against autograd).

Reported: tokens/s of each, the ratio minisparse / PyTorch (issue 14: >= 1.0), and the share
of this machine's float32 matmul rate (an n x n x n sgemm, measured in the same run) that
training reaches, counting FLOPs as 6 * parameters * tokens + attention
(12 * layers * B * H * T^2 * Dh: QK^T and PV, forward and backward, unmasked as computed).

    python bench/train_throughput.py            # full: 8 timed steps per implementation
    python bench/train_throughput.py --quick    # 2 timed steps, for a smoke test
    python bench/train_throughput.py --threads 1 --steps 10
    python bench/train_throughput.py --activations swiglu --fused-ab 30   # the fused SwiGLU pass, on/off
    python bench/train_throughput.py --fast-ab 20          # round 7's fast paths (norm, AdamW, dReLU, mask), on/off
    python bench/train_throughput.py --steps 6 --no-fast   # the step before round 7, against PyTorch

On a shared machine step times vary by 10-20% from one step to the next; the steps of the
two implementations alternate, and besides the ratio of the medians the script reports the
median and range of the per-step ratios (PyTorch's step i / minisparse's step i, taken
side by side).

Writes bench/results/train_throughput.json (or train_throughput_quick.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import minisparse as ms
from minisparse.train import AdamW, accumulate_grads, clip_grads, keep_freed_memory, set_training_threads

HERE = Path(__file__).resolve().parent
REF = dict(dim=256, n_layers=4, n_heads=8, ffn_dim=688, max_seq_len=256)
SEQ, BATCH = 256, 16
LR, WD, BETAS, EPS, CLIP = 1e-3, 0.1, (0.9, 0.95), 1e-8, 1.0


# --------------------------------------------------------------------------------------
# the same model in PyTorch
# --------------------------------------------------------------------------------------
def torch_model(model: ms.Transformer, dtype):
    """Leaf tensors copied from a minisparse model, and a loss function over them."""
    import torch
    import torch.nn.functional as F

    c = model.config
    P = {k: torch.tensor(np.array(v), dtype=dtype, requires_grad=True) for k, v in model.params.items()}
    cos, sin = (torch.tensor(np.array(t), dtype=dtype) for t in
                ms.layers.rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, np.float64))
    H, K, Dh = c.n_heads, c.n_kv_heads, c.head_dim
    gate = {"swiglu": F.silu, "drelu": F.relu, "reglu": F.relu}[c.activation]
    up = {"swiglu": lambda u: u, "drelu": F.relu, "reglu": lambda u: u}[c.activation]

    def rms(x, w):
        scale = (1 + w) if c.norm_offset else w
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * scale

    def rope(x, T):
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:T] + rot * sin[:T]

    def loss_fn(x_ids, y_ids):
        B, T = x_ids.shape
        x = P["tok_embeddings"][x_ids]                                       # (B, T, D)
        for i in range(c.n_layers):
            p = f"layers.{i}."
            hn = rms(x, P[p + "attention_norm"])
            q = (hn @ P[p + "attention.wq"]).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
            k = (hn @ P[p + "attention.wk"]).view(B, T, K, Dh).transpose(1, 2)
            v = (hn @ P[p + "attention.wv"]).view(B, T, K, Dh).transpose(1, 2)
            q, k = rope(q, T), rope(k, T)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=(K != H))
            x = x + o.transpose(1, 2).reshape(B, T, H * Dh) @ P[p + "attention.wo"]
            hn = rms(x, P[p + "ffn_norm"])
            f = p + "feed_forward."
            h = gate(hn @ P[f + "w_gate"].T) * up(hn @ P[f + "w_up"].T)          # (B, T, F)
            x = x + h @ P[f + "w_down"]
        w_out = P["tok_embeddings"] if c.tie_embeddings else P["output"]
        logits = rms(x, P["norm"]) @ w_out.T                                  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_ids.reshape(-1))

    return P, loss_fn


def validate(act: str, x, y) -> dict:
    """float64: minisparse's loss and hand-written gradients against torch autograd."""
    import torch
    model = ms.Transformer(ms.ModelConfig(activation=act, **REF), seed=0, dtype=np.float64)
    loss, grads = model.loss_and_grads(x, y)
    P, loss_fn = torch_model(model, torch.float64)
    tl = loss_fn(torch.tensor(x), torch.tensor(y))
    tl.backward()
    worst = max(float(np.max(np.abs(grads[k] - P[k].grad.numpy())) / (np.max(np.abs(P[k].grad.numpy())) + 1e-30))
                for k in grads)
    dl = abs(loss - tl.item())
    ok = dl < 1e-9 and worst < 1e-7
    if not ok:
        raise SystemExit(f"validation failed for {act}: |loss diff| {dl:.2e}, worst relative grad diff {worst:.2e}")
    return {"loss_abs_diff": dl, "worst_grad_rel_diff": worst}


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def time_steps(step, n_warmup: int, n_steps: int):
    """Wall-clock seconds of n_steps calls after n_warmup untimed ones."""
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def minisparse_step_fn(act, x, y, workers: int = 1):
    """train()'s step: accumulate_grads (the batch rows split over ``workers`` threads, BLAS 1
    thread each, as train() does with training_workers()), clipping, AdamW (their NumPy work
    also in ``workers`` threads, as in train())."""
    model = ms.Transformer(ms.ModelConfig(activation=act, **REF), seed=0, dtype=np.float32)
    opt = AdamW(model.params, LR, BETAS, EPS, WD)

    def step():
        loss, grads, _ = accumulate_grads(model, [(x, y)], workers=workers)
        clip_grads(grads, CLIP, workers)
        opt.step(model.params, grads, LR, workers)
        return loss
    return model, step


def torch_step_fn(act, x, y):
    import torch
    model = ms.Transformer(ms.ModelConfig(activation=act, **REF), seed=0, dtype=np.float32)
    P, loss_fn = torch_model(model, torch.float32)
    decay = [p for p in P.values() if p.ndim >= 2]
    no_decay = [p for p in P.values() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    tx, ty = torch.tensor(x), torch.tensor(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(tx, ty)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(P.values()), CLIP)
        opt.step()
        return loss.item()
    return step


def fused_ab(act, x, y, workers: int, pairs: int) -> dict:
    """minisparse's step with the fused SwiGLU pass on and off (layers.FUSED_SWIGLU; the same
    bits either way), interleaved step by step in one process, the order alternating by pair:
    the paired speed-up (off / on) is the fused pass's effect with the machine's drift
    taken out, which run-to-run ratios against PyTorch (+-5% here) cannot resolve."""
    model = ms.Transformer(ms.ModelConfig(activation=act, **REF), seed=0, dtype=np.float32)
    got = {}
    for flag in (True, False):                   # validate: the same bits both ways (2 x 128 tokens)
        ms.layers.FUSED_SWIGLU = flag
        got[flag] = model.loss_and_grads(x[:2, :128], y[:2, :128])
    same = got[True][0] == got[False][0] and all(np.array_equal(got[True][1][k], got[False][1][k])
                                                 for k in got[True][1])
    if not same:
        raise SystemExit(f"validation failed for {act}: the fused pass and the NumPy lines differ")
    _, step = minisparse_step_fn(act, x, y, workers)
    for flag in (True, False):                   # warm-up (and the kernels' first call)
        ms.layers.FUSED_SWIGLU = flag
        step()
    t = {True: [], False: []}
    for i in range(pairs):
        for flag in ((True, False) if i % 2 == 0 else (False, True)):
            ms.layers.FUSED_SWIGLU = flag
            t0 = time.perf_counter()
            step()
            t[flag].append(time.perf_counter() - t0)
    ms.layers.FUSED_SWIGLU = True
    r = np.array(t[False]) / np.array(t[True])
    return dict(activation=act, pairs=pairs, validated_bit_for_bit=True, fused_s=t[True], numpy_lines_s=t[False],
                fused_s_median=float(np.median(t[True])), numpy_lines_s_median=float(np.median(t[False])),
                paired_speedup_median=float(np.median(r)), paired_speedup_range=[float(r.min()), float(r.max())])


def set_fast(on: bool) -> None:
    """Round 7's fast paths of the step (issue 14): RMSNorm, AdamW and the ReLU-gated FFN lines
    as one Numba pass each, attention's causal mask as a Numba loop; off: the NumPy lines (see
    minisparse._fused; SwiGLU's fused pass of round 6 is --no-fused)."""
    import importlib
    train_mod = importlib.import_module("minisparse.train")     # the module (ms.train is the function)
    ms.layers.FUSED_NORM = ms.layers.FUSED_ATTENTION = ms.layers.FUSED_RELU_GLU = train_mod.FUSED_ADAMW = on


def fast_ab(act, x, y, workers: int, pairs: int) -> dict:
    """minisparse's whole step (accumulate_grads + clip + AdamW) with round 7's fast paths on
    and off (:func:`set_fast`), interleaved step by step in one process, the order
    alternating by pair; each variant has its own model and optimizer, started from the
    same weights (the fast RMSNorm rounds differently, so the two runs drift apart by
    rounding). Paired speed-up = off / on."""
    steps = {}
    for flag in (True, False):
        set_fast(flag)
        steps[flag] = minisparse_step_fn(act, x, y, workers)[1]
        steps[flag]()                            # warm-up (and the kernels' first call)
        steps[flag]()
    t = {True: [], False: []}
    for i in range(pairs):
        for flag in ((True, False) if i % 2 == 0 else (False, True)):
            set_fast(flag)
            t0 = time.perf_counter()
            steps[flag]()
            t[flag].append(time.perf_counter() - t0)
    set_fast(True)
    r = np.array(t[False]) / np.array(t[True])
    return dict(activation=act, pairs=pairs, fast_s=t[True], numpy_lines_s=t[False],
                fast_s_median=float(np.median(t[True])), numpy_lines_s_median=float(np.median(t[False])),
                paired_speedup_median=float(np.median(r)), paired_speedup_range=[float(r.min()), float(r.max())])


def cpu_model() -> str:
    """lscpu's model name (issue 14 asks for it with every CPU figure)."""
    import subprocess
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """Best float32 GFLOP/s of an n x n x n NumPy matmul (the machine's BLAS sgemm)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(time_steps(lambda: a @ b, 0, reps))
    return 2 * n ** 3 / best / 1e9


def train_flops(model: ms.Transformer, tokens: int, B: int, T: int) -> float:
    c = model.config
    attn = 12 * c.n_layers * B * c.n_heads * T * T * c.head_dim
    return 6 * model.num_parameters() * tokens + attn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 timed steps per implementation")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per implementation (default 8)")
    ap.add_argument("--activations", default="swiglu,drelu")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_throughput[_quick].json)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both NumPy's OpenBLAS and PyTorch (default: all cores)")
    ap.add_argument("--no-split", action="store_true",
                    help="minisparse runs the whole batch on one thread with BLAS on --threads (the step before "
                         "train() split batches over threads)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="do not apply minisparse.train.keep_freed_memory (which train() applies)")
    ap.add_argument("--no-fused", action="store_true",
                    help="SwiGLU's element-wise lines as NumPy passes (minisparse.layers.FUSED_SWIGLU = False) "
                         "instead of the fused Numba pass; the same bits, for a before/after comparison")
    ap.add_argument("--fused-ab", type=int, default=0, metavar="PAIRS",
                    help="instead of the PyTorch comparison: PAIRS interleaved minisparse steps with the fused "
                         "SwiGLU pass on and off, the paired speed-up (writes train_throughput_fused_ab.json)")
    ap.add_argument("--no-fast", action="store_true",
                    help="round 7's fast paths off (RMSNorm, AdamW, dReLU/ReGLU lines, attention's mask as NumPy "
                         "lines: minisparse.layers.FUSED_NORM / FUSED_ATTENTION / FUSED_RELU_GLU, "
                         "minisparse.train.FUSED_ADAMW = False)")
    ap.add_argument("--fast-ab", type=int, default=0, metavar="PAIRS",
                    help="instead of the PyTorch comparison: PAIRS interleaved minisparse steps with round 7's "
                         "fast paths on and off, the paired speed-up (writes train_throughput_fast_ab.json)")
    args = ap.parse_args(argv)
    if args.no_fused:
        ms.layers.FUSED_SWIGLU = False
    set_fast(not args.no_fast)
    fast = not args.no_fast and ms._fused.more_kernels() is not None
    fused = ms.layers.FUSED_SWIGLU and ms._fused.kernels() is not None      # imports Numba here, not in a step
    # what minisparse.train.train() does for its runs; process-wide, so PyTorch gets it too
    malloc_tuned = False if args.default_malloc else keep_freed_memory()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    n_steps = args.steps or (2 if args.quick else 8)
    acts = args.activations.split(",")
    threads = args.threads or os.cpu_count() or 1
    blas_set = set_training_threads(threads)
    try:                                         # train()'s rule (minisparse.runtime.training_workers)
        import threadpoolctl  # noqa: F401
        can_split = blas_set and threads >= 2
    except ImportError:
        can_split = False
    workers = threads if can_split and not args.no_split else 1
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
        print("torch is not installed: timing minisparse alone (pip install torch for the comparison)")

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (BATCH, SEQ + 1))
    x, y = data[:, :-1], data[:, 1:]
    tokens = BATCH * SEQ

    peak = matmul_rate()
    model_name = cpu_model()
    print(f"machine: {model_name}, {os.cpu_count()} CPUs, load average "
          f"{load_start[0] if load_start else float('nan'):.1f}; float32 matmul (2048^3, NumPy BLAS): "
          f"{peak:.1f} GFLOP/s; glibc keeps freed memory: {malloc_tuned}; threads: {threads} "
          f"(OpenBLAS set: {blas_set}); minisparse splits the batch over {workers} thread(s); fused SwiGLU pass: {fused}; "
          f"round-7 fast paths: {fast}")
    # the in-process A/Bs: round 7's fast paths (--fast-ab) or round 6's fused SwiGLU pass (--fused-ab)
    for pairs, run_ab, on, label in ((args.fast_ab, fast_ab, "fast", "fast paths"), (args.fused_ab, fused_ab, "fused", "fused")):
        if not pairs:
            continue
        ab = []
        for act in acts:
            ab.append(run_ab(act, x, y, workers, pairs))
            print(f"{act}: {label} {ab[-1][on + '_s_median'] * 1e3:.0f} ms/step, NumPy lines "
                  f"{ab[-1]['numpy_lines_s_median'] * 1e3:.0f} ms/step; paired speed-up "
                  f"{ab[-1]['paired_speedup_median']:.3f}x [{ab[-1]['paired_speedup_range'][0]:.2f}, "
                  f"{ab[-1]['paired_speedup_range'][1]:.2f}] over {pairs} pairs")
        out = Path(args.out) if args.out else HERE / "results" / f"train_throughput_{on}_ab.json"
        out.write_text(json.dumps({f"{on}_ab": ab, "machine": {
            "cpu_model": model_name, "cpus": os.cpu_count(), "threads": threads, "minisparse_batch_split_workers": workers,
            "fused_swiglu": fused, "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}},
            indent=2))
        print(f"\nwrote {out}")
        return
    rows, checks = [], {}
    for act in acts:
        if torch is not None:
            checks[act] = validate(act, x[:2, :64], y[:2, :64])
            print(f"validated {act}: loss diff {checks[act]['loss_abs_diff']:.1e}, worst grad rel diff "
                  f"{checks[act]['worst_grad_rel_diff']:.1e} (float64, minisparse vs torch autograd)")
        model, step = minisparse_step_fn(act, x, y, workers)
        flops = train_flops(model, tokens, BATCH, SEQ)
        impls = [("minisparse", step)]
        if torch is not None:
            impls.append(("pytorch", torch_step_fn(act, x, y)))
        for _, fn in impls:                      # warm-up
            fn()
        wall = {name: [] for name, _ in impls}
        cpu = {name: [] for name, _ in impls}
        for _ in range(n_steps):                 # interleaved: both see the same machine load
            for name, fn in impls:
                t, c = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        res = {}
        for name, _ in impls:
            med = float(np.median(wall[name]))
            res[name] = dict(impl=name, activation=act, step_s_median=med, step_s_best=min(wall[name]),
                             cpu_s_median=float(np.median(cpu[name])), tokens_per_s=tokens / med,
                             gflops=flops / med / 1e9, fraction_of_matmul_peak=flops / med / 1e9 / peak,
                             times=wall[name], cpu_times=cpu[name])
        if "pytorch" in res:
            res["minisparse"]["ratio_vs_pytorch"] = res["pytorch"]["step_s_median"] / res["minisparse"]["step_s_median"]
            res["minisparse"]["cpu_ratio_vs_pytorch"] = res["pytorch"]["cpu_s_median"] / res["minisparse"]["cpu_s_median"]
            paired = [t / m for t, m in zip(wall["pytorch"], wall["minisparse"])]   # side by side, step by step
            res["minisparse"]["paired_ratios"] = paired
            res["minisparse"]["paired_ratio_median"] = float(np.median(paired))
            res["minisparse"]["paired_ratio_range"] = [min(paired), max(paired)]
        rows += list(res.values())

    print(f"\n{'impl':<11} {'act':<7} {'ms/step':>9} {'cpu ms':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'vs torch':>9} {'(cpu)':>6}  per-step ratios: median [min, max]")
    for r in rows:
        ratio = f"{r['ratio_vs_pytorch']:.2f}x" if "ratio_vs_pytorch" in r else ""
        cratio = f"{r['cpu_ratio_vs_pytorch']:.2f}x" if "cpu_ratio_vs_pytorch" in r else ""
        paired = (f"  {r['paired_ratio_median']:.2f}x [{r['paired_ratio_range'][0]:.2f}, "
                  f"{r['paired_ratio_range'][1]:.2f}]" if "paired_ratio_median" in r else "")
        print(f"{r['impl']:<11} {r['activation']:<7} {r['step_s_median'] * 1e3:9.0f} {r['cpu_s_median'] * 1e3:8.0f} "
              f"{r['tokens_per_s']:9.0f} {r['gflops']:8.1f} {r['fraction_of_matmul_peak'] * 100:6.1f}% {ratio:>9} "
              f"{cratio:>6}{paired}")
    m = ms.Transformer(ms.ModelConfig(**REF), seed=0)
    out = Path(args.out) if args.out else HERE / "results" / f"train_throughput{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps({
        "config": {**REF, "seq_len": SEQ, "batch_size": BATCH, "parameters": m.num_parameters()},
        "tokens_per_step": tokens, "flops_per_step": {a: train_flops(m, tokens, BATCH, SEQ) for a in acts},
        "matmul_gflops_float32": peak, "results": rows, "validation": checks,
        "machine": {"cpu_model": model_name, "cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(),
                    "python": sys.version.split()[0], "numpy": np.__version__,
                    "torch": getattr(torch, "__version__", None),
                    "torch_threads": torch.get_num_threads() if torch is not None else None,
                    "load_average_at_start": load_start, "load_average_at_end": load,
                    "malloc_keeps_freed_memory": malloc_tuned, "threads": threads,
                    "openblas_threads_set": blas_set, "minisparse_batch_split_workers": workers,
                    "fused_swiglu": fused, "round7_fast_paths": fast},
        "timed_steps": n_steps,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
