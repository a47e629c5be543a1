"""End-to-end greedy generation, tokens/s: dense NumPy vs the neuron-skipping backends.

    python bench/decode_e2e.py              # 2 layers of dim 4096, ffn 14336, ~90% drelu sparsity
    python bench/decode_e2e.py --layers 4 --new-tokens 32
    python bench/decode_e2e.py --quick      # dim 256, ffn 768: seconds

The model is one whose FFNs dominate the cost (as in a 7B model, where the FFN holds ~2/3
of the weights): Mistral-7B-sized blocks (dim 4096, 32 heads, 8 KV heads, ffn 14336)
with a byte vocabulary, float32.

How ~90% of the FFN neurons are made exactly zero (random weights, no training): every
token embedding has a large constant first coordinate (``tok_embeddings[:, 0] = 300``
while the rest are N(0, 0.02)). It dominates the residual stream (attention and FFN
outputs add ~1 per coordinate, i.e. ~80 in norm), so after RMSNorm every FFN input has
``x[0] ~ +60`` while a random gate row contributes only ~N(0, 0.3) through the other
coordinates. Column 0 of ``w_gate`` is then a per-neuron bias: -0.2 (pre-activation
~ -12) for the 90% "inactive" neurons, +0.2 for the 10% active ones, chosen at random per
layer. The same constant in every embedding shifts all logits equally, so the greedy
tokens still depend on the rest. The fraction active is measured from the backend's stats.

Both runs produce the same greedy tokens (checked) before the tokens/s are compared.
Timings are interleaved (dense, sparse, dense, sparse ...) and the median is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# No process settings here: minisparse makes its own defaults (minisparse/runtime.py: the
# OpenBLAS idle-thread timeout, Numba's threads started with passive OpenMP waiting), so
# these timings are what a plain program gets.
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import minisparse as ms  # noqa: E402


def build_model(dim, ffn_dim, n_layers, n_heads, n_kv_heads, active_frac, seed=0) -> ms.Transformer:
    cfg = ms.ModelConfig(vocab_size=258, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         ffn_dim=ffn_dim, activation="drelu", max_seq_len=128)
    rng = np.random.default_rng(seed)
    out_std = 0.02 / np.sqrt(2 * n_layers)
    params = {}
    for name, shape in ms.Transformer.param_shapes(cfg).items():
        if name.endswith("norm"):
            params[name] = np.ones(shape, np.float32)
            continue
        std = out_std if name.endswith(("wo", "w_down")) else 0.02
        w = rng.standard_normal(size=shape, dtype=np.float32)
        w *= np.float32(std)
        params[name] = w
    params["tok_embeddings"][:, 0] = 300.0                            # the bias feature
    n_active = int(round(active_frac * ffn_dim))
    for i in range(n_layers):
        wg = params[f"layers.{i}.feed_forward.w_gate"]                # (F, D)
        wg[:, 0] = -0.2                                               # inactive: pre-activation ~ -8
        wg[rng.choice(ffn_dim, n_active, replace=False), 0] = 0.2     # active: ~ +8
    return ms.Transformer(cfg, params=params)


def decode_rate(model, prompt, n_new, backend):
    """(tokens, seconds per decoded token) for greedy generation; prefill excluded."""
    toks, stamps = [], []
    for t in ms.stream(model, prompt, max_new_tokens=n_new, temperature=0, backend=backend):
        toks.append(t)
        stamps.append(time.perf_counter())
    return toks, (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="dim 256, ffn 768: seconds")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--active", type=float, default=0.10, help="fraction of active FFN neurons")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["numba"],
                    help="sparse backends to compare with dense NumPy (cupy copies the NumPy weights to "
                         "the GPU on every call: not meaningful end to end)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        dim, ffn, heads, kv = 256, 768, 4, 2
        args.new_tokens = min(args.new_tokens, 8)
        args.repeats = min(args.repeats, 2)
    else:
        dim, ffn, heads, kv = 4096, 14336, 32, 8
    t0 = time.perf_counter()
    model = build_model(dim, ffn, args.layers, heads, kv, args.active)
    n_ffn = sum(v.size for k, v in model.params.items() if "feed_forward" in k)
    print(f"model: {args.layers} layers, dim {dim}, ffn {ffn}, drelu; {model.num_parameters() / 1e6:.0f}M "
          f"parameters ({n_ffn / model.num_parameters():.0%} in FFNs), float32; built in "
          f"{time.perf_counter() - t0:.1f} s; load average {os.getloadavg()}")
    prompt = [256, 72, 101, 108]
    # correctness first: same greedy tokens; and the sparsity the backends see
    want, _ = decode_rate(model, prompt, 4, None)
    for b in args.backends:
        got, _ = decode_rate(model, prompt, 4, b)
        if got != want:
            raise SystemExit(f"VALIDATION FAILED: backend {b} generated {got}, dense {want}")
    model.backend = args.backends[0]
    cache = ms.KVCache(model.config, 1, model.dtype)
    model(np.array([prompt]), cache=cache)
    model(np.array([[want[0]]]), cache=cache)
    fracs = [s["fraction"] for s in model.ffn_stats]
    model.backend = None
    print(f"fraction of FFN neurons active per decode step, per layer: {[round(f, 4) for f in fracs]}")
    # bytes per decoded token: every weight once (dense); the skipping kernels read the gate,
    # and up/down rows of active neurons only
    a = float(np.mean(fracs))
    total = 4 * model.num_parameters()
    ffn_bytes = 4 * n_ffn
    ideal = total / (total - ffn_bytes + ffn_bytes * (1 + 2 * a) / 3)
    rates = {k: [] for k in ["dense"] + args.backends}
    for _ in range(args.repeats):
        for k in rates:
            toks, spt = decode_rate(model, prompt, args.new_tokens, None if k == "dense" else k)
            rates[k].append(1.0 / spt)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    print(f"\n{'backend':<10} {'tokens/s':>9} {'speed-up':>9} {'ideal':>7}   (median of {args.repeats}, "
          f"{args.new_tokens} new tokens each)")
    for k, v in med.items():
        print(f"{k:<10} {v:>9.2f} {v / med['dense']:>8.2f}x {1.0 if k == 'dense' else ideal:>6.2f}x")
    res = dict(dim=dim, ffn_dim=ffn, layers=args.layers, active_fraction=fracs, tokens_per_s=med,
               samples=rates, speedup={k: v / med["dense"] for k, v in med.items()}, ideal=ideal,
               loadavg=os.getloadavg(), quick=args.quick, cpus=os.cpu_count())
    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     "decode_e2e" + ("_quick" if args.quick else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
