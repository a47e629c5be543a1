"""Dense FFN vs 8-expert top-2 MoE vs the same MoE with dReLU experts, at equal activated parameters.

On the embedded corpus (``minisparse.data.load_corpus()``: Python stdlib sources), three
models with the same attention and the same *activated* FFN parameters per token:

    dense       ffn_dim F = 344, swiglu                        (preset "tiny")
    moe         8 experts of F/2 = 172 neurons, top-2, swiglu   (preset "tiny-moe")
    moe-drelu   the same MoE with drelu experts                 (TurboSparse-Mixtral's recipe)

Each is trained with ``minisparse.train`` on the same batches for the same number of
steps; the table gives validation loss, training and inference throughput (tokens/s), and
parameters: total, activated through routing, and activated once zero neurons are skipped
(``count_parameters``: gate computed densely, and with an ideal predictor).

Validation before timing: the MoE layer's dispatch is checked against a per-token loop.

Usage::

    python bench/moe_compare.py            # full run (~10 min on 2 CPU cores)
    python bench/moe_compare.py --quick    # seconds: a smoke test of the script

On a shared machine, ``OPENBLAS_NUM_THREADS=1`` avoids BLAS threads fighting other jobs.

Writes bench/results/moe_compare.json (quick runs write moe_compare_quick.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import minisparse as ms
from minisparse import layers as L
from minisparse.data import load_corpus
from minisparse.moe import moe_forward
from minisparse.stats import count_parameters, moe_stats
from minisparse.train import TrainConfig, evaluate, train

HERE = Path(__file__).resolve().parent


def models(quick: bool):
    if quick:
        base = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)
        F = 64
    else:
        base = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)
        F = 344
    return {
        "dense": ms.ModelConfig(**base, ffn_dim=F, activation="swiglu"),
        "moe-8x top-2": ms.ModelConfig(**base, ffn_dim=F // 2, activation="swiglu", n_experts=8, top_k=2),
        "moe-8x top-2 drelu": ms.ModelConfig(**base, ffn_dim=F // 2, activation="drelu", n_experts=8, top_k=2),
    }


def validate_dispatch() -> float:
    """Max |moe_forward - per-token loop| on random weights (float64); raises if it disagrees."""
    cfg = ms.ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, ffn_dim=6, n_experts=8, top_k=2,
                         activation="drelu")
    m = ms.Transformer(cfg, seed=0, dtype=np.float64)
    pre = "layers.0.feed_forward."
    p = {k: v * 30 for k, v in m.params.items()}
    x = np.random.default_rng(0).normal(size=(13, 8))
    y, _, _ = moe_forward(x, p, pre, cfg, m.act)
    ref = np.zeros_like(y)
    for n in range(len(x)):
        lg = x[n] @ p[pre + "router"]
        top = sorted(range(8), key=lambda e: (-lg[e], e))[:2]
        g = np.exp(lg[top] - lg[top].max()); g /= g.sum()
        for gj, e in zip(g, top):
            ye, _ = L.ffn_forward(x[n:n + 1], p[pre + "experts.w_gate"][e], p[pre + "experts.w_up"][e],
                                  p[pre + "experts.w_down"][e], m.act)
            ref[n] += gj * ye[0]
    err = float(np.abs(y - ref).max())
    if not err < 1e-12:
        raise SystemExit(f"validation failed: MoE dispatch differs from the per-token loop by {err}")
    return err


def inference_tokens_per_s(model, x, repeats: int) -> float:
    """Forward-only throughput on batch x, best of ``repeats`` (the machine is shared)."""
    model(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - t)
    return x.size / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, a few steps (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    quick = args.quick
    steps = args.steps or (6 if quick else 200)
    tc = TrainConfig(steps=steps, batch_size=4 if quick else 16, seq_len=32 if quick else 64,
                     lr=3e-3, warmup=2 if quick else 20, eval_every=0, eval_batches=1,
                     progress=False, log_every=10**9, seed=0)
    corpus = load_corpus(max_bytes=200_000 if quick else 2_000_000)
    err = validate_dispatch()
    print(f"validation: MoE dispatch == per-token loop (max abs diff {err:.1e})")
    print(f"corpus: {corpus}")
    print(f"training: {steps} steps x {tc.batch_size} x {tc.seq_len} tokens, AdamW lr {tc.lr}, same batches for all")

    rng = np.random.default_rng(99)
    x_inf, _ = corpus.get_batch("val", 4 if quick else 8, tc.seq_len, rng)
    x_cnt, _ = corpus.get_batch("val", 4 if quick else 8, tc.seq_len, np.random.default_rng(7))
    rows = []
    for name, cfg in models(quick).items():
        model = ms.Transformer(cfg, seed=0)
        t0 = time.perf_counter()
        every = max(1, steps // 4)
        res = train(model, corpus, tc, callback=lambda step, rec: (step + 1) % every == 0 and print(
            f"    {name}: step {step + 1}/{steps} loss {rec['loss']:.3f}", flush=True))
        wall = time.perf_counter() - t0
        hist = res.history
        val = evaluate(model, corpus, batch_size=8 if quick else 16, seq_len=tc.seq_len,
                       n_batches=2 if quick else 8)
        cnt = count_parameters(model, x_cnt)
        row = dict(
            model=name, activation=cfg.activation, n_experts=cfg.n_experts, top_k=cfg.top_k if cfg.n_experts else None,
            ffn_dim=cfg.ffn_dim, val_loss=val, final_train_loss=float(np.mean([h["loss"] for h in hist[-10:]])),
            train_tokens_per_s=float(np.median([h["tokens_per_s"] for h in hist[1:]] or [hist[0]["tokens_per_s"]])),
            train_wall_s=wall,
            infer_tokens_per_s=inference_tokens_per_s(model, x_inf, 2 if quick else 5),
            total_params=cnt["total"], activated_params=cnt["activated"],
            activated_gate_dense=cnt["activated_gate_dense"], activated_ideal=cnt["activated_ideal"],
            activated_non_embedding=cnt["activated_non_embedding"],
            activated_ideal_non_embedding=cnt["activated_ideal_non_embedding"],
            ffn_active_fraction=cnt["ffn_active_fraction"],
        )
        if cfg.n_experts:
            st = moe_stats(model, x_cnt)
            moe_layers = [s for s in st["layers"] if s["moe"]]
            ratio = float(max(s["load_ratio"] for s in moe_layers))
            row["load_ratio_max_over_min"] = ratio if np.isfinite(ratio) else None   # None: an idle expert
            row["router_entropy"] = float(np.mean([s["router_entropy"] for s in moe_layers]))
            row["tokens_per_expert"] = [s["tokens_per_expert"] for s in moe_layers]
        rows.append(row)
        print(f"  {name:<20} val {val:.4f}  train {row['train_tokens_per_s']:.0f} tok/s  "
              f"({wall:.0f} s)", flush=True)

    hdr = (f"{'model':<20} {'val loss':>8} {'train tok/s':>11} {'infer tok/s':>11} {'total':>9} "
           f"{'activated':>9} {'act. gate-dense':>15} {'act. ideal':>10} {'FFN nz':>6}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['model']:<20} {r['val_loss']:>8.4f} {r['train_tokens_per_s']:>11.0f} "
              f"{r['infer_tokens_per_s']:>11.0f} {r['total_params']:>9,} {r['activated_params']:>9,} "
              f"{r['activated_gate_dense']:>15,.0f} {r['activated_ideal']:>10,.0f} {r['ffn_active_fraction']:>6.1%}")
    print("\nactivated = parameters a token touches through routing (embeddings + head included, the papers' "
          "convention);\ngate-dense / ideal = once zero neurons are skipped (gate computed for all / predictor); "
          "FFN nz = fraction of a token's routed neurons with h != 0.")
    for r in rows:
        if "load_ratio_max_over_min" in r:
            lr_ = r["load_ratio_max_over_min"]
            print(f"{r['model']}: busiest/idlest expert {'inf' if lr_ is None else f'{lr_:.2f}'}, "
                  f"router entropy {r['router_entropy']:.3f} nats (max {np.log(8):.3f})")

    out = Path(args.out) if args.out else HERE / "results" / ("moe_compare_quick.json" if quick else "moe_compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(quick=quick, train_config=tc.to_dict(), corpus=repr(corpus), validation_max_abs_diff=err,
                machine=dict(platform=platform.platform(), python=sys.version.split()[0], numpy=np.__version__,
                             cpus=os.cpu_count(), load_avg=os.getloadavg(),
                             blas_threads=os.environ.get("OPENBLAS_NUM_THREADS")),
                note="tokens/s measured on a shared 2-core CPU machine: compare rows, not absolute numbers")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"\nwrote {out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
