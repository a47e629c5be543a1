"""dReLU vs SwiGLU at ~10M parameters and ~50M tokens, trained on the GPU by minisparse itself.

Each (activation, seed) run trains ``Transformer(...).to("cupy")`` with ``minisparse.train``
(the same code as on the CPU) on the embedded corpus (the Python standard library's
sources, byte-level), then moves the model back to the host and measures:

* validation loss (nats/byte) on fixed validation batches, at 4 points of the run;
* exact-zero fraction of the FFN activations;
* the loss when each token keeps only its top 10% |h| (TurboSparse Table 3's rule, 90%).

The same seed gives the same initialisation-seed and data order for every activation
(paired design); runs go in parallel as separate processes sharing the GPU. The parent
prints mean ± sd per activation and the paired drelu - swiglu difference with a 95% t
interval, and writes JSON.

    python bench/science_gpu.py --seeds 0 1 --steps 3000        # on a GPU machine
    python bench/science_gpu.py --device numpy --steps 5 --dim 32 --layers 1 --ffn-dim 64 --batch 2 --seq 32  # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def one_run(a) -> dict:
    import numpy as np
    import minisparse as ms
    from minisparse.data import load_corpus
    from minisparse.sparsity.quality import loss_vs_sparsity
    from minisparse.train import TrainConfig, evaluate, ffn_zero_fraction, train
    corpus = load_corpus(max_bytes=int(a.max_bytes))
    cfg = ms.ModelConfig(vocab_size=258, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads,
                         ffn_dim=a.ffn_dim, max_seq_len=a.seq, activation=a.activation)
    model = ms.Transformer(cfg, seed=a.seed).to(a.device)
    tc = TrainConfig(steps=a.steps, batch_size=a.batch, seq_len=a.seq, lr=a.lr, warmup=max(1, a.steps // 20),
                     eval_every=max(1, a.steps // 4), eval_batches=a.eval_batches, seed=a.seed, progress=False)
    t0 = time.perf_counter()
    res = train(model, corpus, tc)
    train_s = time.perf_counter() - t0
    model.to("numpy")
    ev = dict(batch_size=16, seq_len=a.seq, n_batches=a.eval_batches)
    val = evaluate(model, corpus, **ev)
    sweep = loss_vs_sparsity(model, corpus, [0.0, 0.9], **ev)
    zeros = ffn_zero_fraction(model, corpus, batch_size=8, seq_len=a.seq, n_batches=4)
    return dict(activation=a.activation, seed=a.seed, params=model.num_parameters(),
                tokens=a.steps * a.batch * a.seq, train_s=train_s,
                curve=[(r["step"] + 1, r["val_loss"]) for r in res.history if "val_loss" in r],
                val_loss=val, topk90_loss=sweep[1]["loss"], topk90_rise=sweep[1]["loss"] / sweep[0]["loss"] - 1,
                exact_zeros=float(np.mean(zeros)))


def mean_sd(v):
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else float("nan"))


def paired_ci(d):
    n = len(d)
    m = statistics.mean(d)
    if n < 2:
        return m, float("nan"), float("nan")
    h = T975.get(n - 1, 1.96) * statistics.stdev(d) / math.sqrt(n)
    return m, m - h, m + h


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", nargs="+", default=["swiglu", "drelu"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--device", default="cupy")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ffn-dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--max-bytes", type=float, default=30e6)
    ap.add_argument("--tf32", action="store_true",
                    help="let cuBLAS use TF32 tensor cores for float32 matmuls (CUPY_TF32=1): ~10 mantissa bits")
    ap.add_argument("--out", default="bench/results/science_gpu.json")
    ap.add_argument("--activation", help=argparse.SUPPRESS)       # child process: one run
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.activation is not None:
        print(json.dumps(one_run(a)))
        return 0
    procs = {}
    base = [a for a in (argv or sys.argv[1:]) if a]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if a.tf32:
        env["CUPY_TF32"] = "1"
    for act in a.activations:
        for s in a.seeds:
            cmd = [sys.executable, __file__, *base, "--activation", act, "--seed", str(s)]
            procs[(act, s)] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    runs = []
    for key, p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            print(f"run {key} failed:\n{err[-3000:]}")
            continue
        runs.append(json.loads(out.strip().splitlines()[-1]))
    if not runs:
        return 1
    r0 = runs[0]
    print(f"\n{r0['params'] / 1e6:.1f}M parameters, {r0['tokens'] / 1e6:.1f}M tokens per run, "
          f"device {a.device}{' (TF32 matmuls)' if a.tf32 else ''}; train time per run {min(r['train_s'] for r in runs):.0f}-{max(r['train_s'] for r in runs):.0f} s")
    print(f"{'activation':<10} {'seeds':>5} {'val loss':>16} {'top-10% loss rise':>18} {'exact zeros':>12}")
    by = {}
    for act in a.activations:
        rs = sorted((r for r in runs if r["activation"] == act), key=lambda r: r["seed"])
        by[act] = rs
        if not rs:
            continue
        vm, vs = mean_sd([r["val_loss"] for r in rs])
        tm, ts = mean_sd([r["topk90_rise"] for r in rs])
        zm, _ = mean_sd([r["exact_zeros"] for r in rs])
        print(f"{act:<10} {len(rs):>5} {vm:>9.4f} ± {vs:.4f} {tm:>+11.2%} ± {ts:.2%} {zm:>12.1%}")
    summary = {}
    if len(a.activations) == 2:
        x, y = a.activations
        pairs = [(rx, ry) for rx in by[x] for ry in by[y] if rx["seed"] == ry["seed"]]
        d = [ry["val_loss"] - rx["val_loss"] for rx, ry in pairs]
        if d:
            m, lo, hi = paired_ci(d)
            summary = dict(pair=f"{y} - {x}", diffs=d, mean=m, ci95=[lo, hi])
            print(f"paired {y} - {x} validation loss: {m:+.4f} (95% t interval [{lo:+.4f}, {hi:+.4f}], n={len(d)})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(args={k: v for k, v in vars(a).items() if k not in ("activation", "seed")},
                                           runs=runs, paired=summary), indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
