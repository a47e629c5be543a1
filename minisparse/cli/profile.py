"""``minisparse profile``: per-layer FFN activation sparsity of a model, with plots.

    minisparse profile runs/demo/checkpoint.safetensors            # per-layer table + plots
    minisparse profile MODEL --data my.txt --out runs/profile

MODEL is a minisparse checkpoint (file, or folder holding checkpoint.safetensors) or a
Hugging Face folder (config.json + *.safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import check_out_dir, float_list, load_any, load_data, nonneg_float, positive_int


def _fmt_pct(x) -> str:
    return "   -  " if x is None or not np.isfinite(x) else f"{x:6.1%}"


def profile_table(rows) -> str:
    """The per-layer table of :meth:`Recorder.summary` rows."""
    head = (f"{'layer':>5} {'expert':>6} {'tokens':>7} {'zeros':>6} {'<1e-2':>6} {'CETT.2':>6} {'t_CETT':>8} "
            f"{'n@80%':>6} {'reuse':>6} {'dead':>5} {'p50|h|':>8} {'p99|h|':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e = "-" if r["expert"] is None else ("shared" if r["expert"] == -1 else str(r["expert"]))
        lines.append(f"{r['layer']:>5} {e:>6} {r['tokens']:>7} {_fmt_pct(r['exact_zero'])} "
                     f"{_fmt_pct(r.get('below_0.01'))} {_fmt_pct(r.get('cett_sparsity'))} "
                     f"{r.get('cett_threshold', float('nan')):>8.4f} {_fmt_pct(r['neurons_80'])} "
                     f"{_fmt_pct(r['reuse'])} {r['dead_neurons']:>5} {r['p50']:>8.4f} {r['p99']:>8.4f}")
    return "\n".join(lines)


def cmd_profile(args) -> int:
    from ..sparsity import plots
    from ..sparsity.quality import loss_vs_sparsity
    from ..sparsity.recorder import Recorder
    from ..tokenizer import ByteTokenizer
    from .common import loss_text
    check_out_dir(args.out)
    model, tok = load_any(args.model)
    corpus = load_data(args.data, tok, args.max_bytes)
    byte_level = isinstance(tok, ByteTokenizer)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    ek = dict(batch_size=args.batch_size, seq_len=seq_len, n_batches=args.batches)
    rec = Recorder(seed=0)
    rec.record(model, corpus, progress=not args.no_progress, **ek)
    rows = rec.summary(model, cett_target=args.cett)
    print(f"model {args.model}: activation {model.config.activation}, {model.config.n_layers} layers, "
          f"F={model.config.ffn_dim}; data {corpus.name}; {rows[0]['tokens'] if rows else 0} tokens per dense FFN")
    print(profile_table(rows))
    print(f"overall exact-zero fraction: {rec.mean_exact_zero():.1%}   (CETT target {args.cett})")
    curve = None
    if not args.no_quality:
        curve = loss_vs_sparsity(model, corpus, args.topk, **ek)
        print("validation loss under top-k sparsity (keep the largest |h| per token):")
        for p in curve:
            print(f"  top-k {p['target']:>5.0%}: loss {loss_text(p['loss'], byte_level)}  "
                  f"({p['loss'] / curve[0]['loss'] - 1:+.2%})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "activation": model.config.activation, "data": corpus.name, "eval": ek,
              "layers": rows, "exact_zero": rec.mean_exact_zero(), "topk": curve}
    (out / "profile.json").write_text(json.dumps(report, indent=1, default=float))
    written = [out / "profile.json"]
    if not args.no_plots:
        dense = [k for k in rec.keys() if k[1] is None]
        written.append(plots.plot_sparsity_per_layer(
            {model.config.activation: [rec.stats[k].exact_zero_fraction() for k in dense]}, out / "sparsity_per_layer.png"))
        freqs = {f"layer {k[0]}" + ("" if k[1] is None else f" expert {k[1]}"): rec.stats[k].frequency() for k in rec.keys()}
        written.append(plots.plot_neuron_frequency(freqs, out / "neuron_frequency.png"))
        hist = {f"layer {k[0]}" + ("" if k[1] is None else f" expert {k[1]}"): rec.stats[k].values.sample()
                for k in rec.keys()}
        written.append(plots.plot_activation_histograms(hist, out / "activation_hist.png"))
        if curve:
            written.append(plots.plot_loss_vs_sparsity({model.config.activation: curve}, out / "loss_vs_sparsity.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def register(subparsers) -> None:
    """Add ``profile`` to the ``minisparse`` command's subparsers."""
    p = subparsers.add_parser(
        "profile", help="measure a model's FFN activation sparsity, per layer",
        description="Run MODEL over validation text and print, per layer (and expert): exact-zero "
                    "fraction, |h|<0.01, CETT sparsity and threshold, the share of activations from the "
                    "hottest 10% of neurons, reuse between consecutive tokens, dead neurons and |h| "
                    "quantiles; then the validation loss under top-k sparsity. Writes profile.json and plots.")
    p.add_argument("model", help="checkpoint file, training folder, or Hugging Face folder")
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib corpus)")
    p.add_argument("--max-bytes", type=positive_int, default=2_000_000)
    p.add_argument("--batches", type=positive_int, default=8, help="validation batches (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--cett", type=nonneg_float, default=0.2, help="CETT target (default 0.2)")
    p.add_argument("--topk", type=float_list, default=[0.0, 0.5, 0.8, 0.85, 0.9],
                   help="top-k sparsities to evaluate (default 0,0.5,0.8,0.85,0.9)")
    p.add_argument("--no-quality", action="store_true", help="skip the loss-vs-sparsity evaluation")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="runs/profile", help="folder for profile.json and plots")
    p.set_defaults(func=cmd_profile)
