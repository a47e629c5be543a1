"""``minisparse profile`` and ``minisparse relufy``: subcommands added to the main CLI.

    minisparse profile runs/demo/checkpoint.safetensors            # per-layer table + plots
    minisparse profile MODEL --data my.txt --out runs/profile
    minisparse relufy MODEL --to drelu --steps 300 --out runs/relufied
    minisparse relufy MODEL --to reglu --steps 300 --l1 1e-3 --fatrelu 0.01 --shift 0.05

MODEL is a minisparse checkpoint (file, or folder holding checkpoint.safetensors) or a
Hugging Face folder (config.json + *.safetensors). ``minisparse.cli`` calls
:func:`register` to add the subcommands.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..cli import check_out_dir


def load_model(path: str):
    """(model, tokenizer) from a checkpoint or an HF folder; registers shifted activations."""
    from ..checkpoint import FILENAME, read_metadata
    from ..cli import load_any
    from .relufy import ensure_activation
    p = Path(path).expanduser()
    ck = p if p.is_file() else p / FILENAME
    if ck.is_file():
        try:
            act = read_metadata(ck)["config"]["activation"]
            ensure_activation(act)
        except (KeyError, ValueError, TypeError):
            pass  # load() below reports what is wrong with the file
    return load_any(path)


def load_data(path, tokenizer, max_bytes: int):
    """A Corpus for the model: byte tokens via load_corpus, or the model's own tokenizer."""
    from ..data import Corpus, load_corpus, split_tokens
    from ..tokenizer import ByteTokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return load_corpus(path, max_bytes=max_bytes)
    byte_corpus = load_corpus(path, max_bytes=max_bytes)      # reads the same files, deterministically
    text = bytes(int(t) for t in byte_corpus.train if t < 256) + bytes(int(t) for t in byte_corpus.val if t < 256)
    ids = np.asarray(tokenizer.encode(text.decode("utf-8", errors="replace")), dtype=np.int64)
    train, val = split_tokens(ids, 0.1, 0)
    return Corpus(train, val, byte_corpus.name + " (model tokenizer)", byte_corpus.n_bytes, byte_corpus.n_docs)


def _fmt_pct(x) -> str:
    return "   -  " if x is None or not np.isfinite(x) else f"{x:6.1%}"


def profile_table(rows) -> str:
    """The per-layer table of :meth:`Recorder.summary` rows."""
    head = (f"{'layer':>5} {'expert':>6} {'tokens':>7} {'zeros':>6} {'<1e-2':>6} {'CETT.2':>6} {'t_CETT':>8} "
            f"{'hot10':>6} {'reuse':>6} {'dead':>5} {'p50|h|':>8} {'p99|h|':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e = "-" if r["expert"] is None else ("shared" if r["expert"] == -1 else str(r["expert"]))
        lines.append(f"{r['layer']:>5} {e:>6} {r['tokens']:>7} {_fmt_pct(r['exact_zero'])} "
                     f"{_fmt_pct(r.get('below_0.01'))} {_fmt_pct(r.get('cett_sparsity'))} "
                     f"{r.get('cett_threshold', float('nan')):>8.4f} {_fmt_pct(r['hot10_coverage'])} "
                     f"{_fmt_pct(r['reuse'])} {r['dead_neurons']:>5} {r['p50']:>8.4f} {r['p99']:>8.4f}")
    return "\n".join(lines)


def cmd_profile(args) -> int:
    from . import plots
    from .quality import loss_vs_sparsity
    from .recorder import Recorder
    check_out_dir(args.out)
    model, tok = load_model(args.model)
    corpus = load_data(args.data, tok, args.max_bytes)
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
            print(f"  top-k {p['target']:>5.0%}: loss {p['loss']:.4f}  ({p['loss'] / curve[0]['loss'] - 1:+.2%})")
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


def cmd_relufy(args) -> int:
    from ..checkpoint import save
    from ..train import TrainConfig
    from .relufy import relufy
    check_out_dir(args.out)
    model, tok = load_model(args.model)
    corpus = load_data(args.data, tok, args.max_bytes)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    out = Path(args.out)
    cfg = TrainConfig(steps=max(args.steps, 1), batch_size=args.batch_size, seq_len=seq_len, lr=args.lr,
                      warmup=max(1, args.steps // 10), eval_every=0, eval_batches=args.eval_batches,
                      l1=args.l1, progress=not args.no_progress, out_dir=str(out) if args.steps else None)
    res = relufy(model, args.to, shift=args.shift, corpus=corpus, steps=args.steps, l1=args.l1,
                 fatrelu_threshold=args.fatrelu, train_config=cfg, eval_batches=args.eval_batches,
                 eval_batch_size=args.batch_size, eval_seq_len=seq_len)
    print(res)
    out.mkdir(parents=True, exist_ok=True)
    path = save(res.model, out / "checkpoint.safetensors", extra={"relufy": res.report})
    (out / "relufy.json").write_text(json.dumps(res.report, indent=1, default=float))
    print(f"wrote {path} and {out / 'relufy.json'}")
    return 0


def _float_list(s: str):
    try:
        v = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        import argparse
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,0.5,0.9, got {s!r}") from None
    return v


def register(subparsers) -> None:
    """Add ``profile`` and ``relufy`` to the ``minisparse`` command's subparsers."""
    from ..cli import _nonneg_float, _nonneg_int, _positive_float, _positive_int

    p = subparsers.add_parser(
        "profile", help="measure a model's FFN activation sparsity, per layer",
        description="Run MODEL over validation text and print, per layer (and expert): exact-zero "
                    "fraction, |h|<0.01, CETT sparsity and threshold, the share of activations from the "
                    "hottest 10%% of neurons, reuse between consecutive tokens, dead neurons and |h| "
                    "quantiles; then the validation loss under top-k sparsity. Writes profile.json and plots.")
    p.add_argument("model", help="checkpoint file, training folder, or Hugging Face folder")
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib corpus)")
    p.add_argument("--max-bytes", type=_positive_int, default=2_000_000)
    p.add_argument("--batches", type=_positive_int, default=8, help="validation batches (default 8)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--cett", type=_nonneg_float, default=0.2, help="CETT target (default 0.2)")
    p.add_argument("--topk", type=_float_list, default=[0.0, 0.5, 0.8, 0.85, 0.9],
                   help="top-k sparsities to evaluate (default 0,0.5,0.8,0.85,0.9)")
    p.add_argument("--no-quality", action="store_true", help="skip the loss-vs-sparsity evaluation")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="runs/profile", help="folder for profile.json and plots")
    p.set_defaults(func=cmd_profile)

    p = subparsers.add_parser(
        "relufy", help="swap a model's FFN activation for ReLU/dReLU and continue training",
        description="ReLUfication: replace MODEL's activation (e.g. swiglu) by a ReLU-family one "
                    "(reglu, drelu, relu2glu; relu/relu2 for plain models), continue training for --steps, "
                    "optionally with a ProSparse L1 penalty and a final FATReLU threshold. Prints loss and "
                    "sparsity before, right after the swap, and after recovery.")
    p.add_argument("model", help="checkpoint file, training folder, or Hugging Face folder")
    p.add_argument("--to", default="drelu", help="target activation (default drelu)")
    p.add_argument("--steps", type=_nonneg_int, default=300, help="recovery training steps (default 300)")
    p.add_argument("--shift", type=float, default=0.0, help="ReLU(x - shift) instead of ReLU(x)")
    p.add_argument("--l1", type=_nonneg_float, default=0.0, help="ProSparse L1 penalty on h (default 0)")
    p.add_argument("--fatrelu", type=_positive_float, default=None, help="final FATReLU threshold")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--eval-batches", type=_positive_int, default=8)
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib corpus)")
    p.add_argument("--max-bytes", type=_positive_int, default=2_000_000)
    p.add_argument("--out", default="runs/relufied", help="output folder (checkpoint, relufy.json, metrics)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_relufy)
