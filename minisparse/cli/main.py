"""The ``minisparse`` command: ``demo``, ``train``, ``generate``; the parser and the entry point.

    minisparse demo                       train a small dReLU model on the Python stdlib (~3 min)
    minisparse demo --quick               the same in ~20 s (a nano model, 150 steps)
    minisparse train --data my.txt --activation drelu --steps 500 --out runs/mine
    minisparse train --resume runs/mine/checkpoint.safetensors --steps 800
    minisparse generate --model runs/mine --prompt "def "

``profile``, ``relufy`` and ``bench`` live in their own modules of this package; each has a
``register(subparsers)`` that adds its parser and sets ``func`` with
``parser.set_defaults(func=handler)``; ``main`` calls ``handler(args)`` and uses its
return value (None = 0) as the exit status. Shared pieces are in :mod:`.common`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from . import bench, profile, relufy
from .common import (UserError, check_out_dir, fraction, load_any, nonneg_float, nonneg_int, os_error_line,
                     positive_float, positive_int, unit_float)

SUBCOMMANDS = (profile, relufy, bench)    # modules with register(subparsers)


# --------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------
def sparsity_table(fractions: List[float]) -> str:
    """Per-layer exact-zero fraction of the FFN activations, with a bar."""
    lines = ["layer  zeros in h (FFN activations)"]
    for i, f in enumerate(fractions):
        bar = "#" * int(round(f * 40))
        lines.append(f"{i:>5}  {f * 100:5.1f}%  {bar}")
    lines.append(f" mean  {float(np.mean(fractions)) * 100:5.1f}%")
    return "\n".join(lines)


def _stream_text(model, tok, prompt: str, max_new_tokens: int, temperature: float,
                 top_k: Optional[int], top_p: Optional[float], seed: Optional[int],
                 backend: Optional[str] = None, out=None) -> str:
    """Generate after ``prompt``, printing text as it is produced; returns the new text."""
    from ..generate import stream
    out = out or sys.stdout
    ids = tok.encode(prompt, bos=True)
    if not ids:
        raise UserError("the prompt encodes to no tokens and the tokenizer has no BOS; give a --prompt")
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise UserError(f"the prompt is {len(ids)} tokens long but the model's max_seq_len is "
                        f"{model.config.max_seq_len}; shorten the prompt")
    if max_new_tokens > room:
        print(f"(max-new-tokens lowered from {max_new_tokens} to {room}: max_seq_len is "
              f"{model.config.max_seq_len})", file=sys.stderr)
        max_new_tokens = room
    new: List[int] = []
    shown = 0
    for t in stream(model, ids, max_new_tokens, temperature, top_k, top_p, seed, backend,
                    eos_id=getattr(tok, "eos_id", None)):
        new.append(t)
        text = tok.decode(new)
        stable = text[:-1] if text.endswith("\ufffd") else text   # wait for the rest of a UTF-8 char
        if len(stable) > shown:
            out.write(stable[shown:])
            out.flush()
            shown = len(stable)
    text = tok.decode(new)
    out.write(text[shown:] + "\n")
    out.flush()
    return text


def _print_header(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 60 - len(title)))


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------
DEMO = dict(preset="tiny", activation="drelu", max_bytes=2_000_000, steps=800, batch_size=16,
            seq_len=128, lr=3e-3, warmup=30, eval_every=200, eval_batches=8,
            sparsity_batches=4, sample_tokens=200, prompt="def ")
DEMO_QUICK = dict(preset="nano", activation="drelu", max_bytes=300_000, steps=150, batch_size=8,
                  seq_len=64, lr=3e-3, warmup=10, eval_every=50, eval_batches=2,
                  sparsity_batches=2, sample_tokens=60, prompt="def ")


def _threads(args) -> str:
    """Apply --threads (default: auto) to training (minisparse.runtime.set_training_threads:
    a step's batch rows split over the threads, BLAS 1 thread each); returns a header line."""
    from ..runtime import auto_threads, set_training_threads
    n = args.threads if args.threads is not None else auto_threads()
    ok = set_training_threads(n)
    why = ""
    if args.threads is None and n < (os.cpu_count() or 1):
        why = f" (other work keeps cores busy: load average {os.getloadavg()[0]:.1f}; --threads overrides)"
    from ..runtime import _EXPLICIT_TRAIN_WORKERS as workers
    split = f" (a step's batch split over {workers}, BLAS 1 thread each)" if (workers or 1) > 1 else ""
    return f"{n}{split}{why}" if ok else f"BLAS default (could not set {n}; use OPENBLAS_NUM_THREADS)"


def cmd_demo(args) -> int:
    from .common import loss_text
    from ..config import preset
    from ..data import load_corpus
    from ..model import Transformer
    from ..tokenizer import ByteTokenizer
    from ..train import TrainConfig, ffn_zero_fraction, train

    t_start = time.perf_counter()
    threads = _threads(args)
    d = dict(DEMO_QUICK if args.quick else DEMO)
    if args.steps is not None:
        d["steps"] = args.steps
    out = check_out_dir(args.out)
    corpus = load_corpus(None, max_bytes=d["max_bytes"], seed=0)
    cfg = preset(d["preset"], activation=d["activation"])
    model = Transformer(cfg, seed=args.seed)
    print(f"minisparse demo{' (quick)' if args.quick else ''}: a {d['activation']} transformer learns "
          "Python from the standard library on this machine")
    print(f"corpus : {corpus.n_docs} files of {corpus.name} ({corpus.n_bytes / 1e6:.2f} MB; "
          f"{len(corpus.train):,} train / {len(corpus.val):,} val byte tokens)")
    print(f"model  : preset {d['preset']!r}, {cfg.n_layers} layers, dim {cfg.dim}, ffn {cfg.ffn_dim}, "
          f"{model.num_parameters():,} parameters, activation {cfg.activation}")
    tcfg = TrainConfig(steps=d["steps"], batch_size=d["batch_size"], seq_len=d["seq_len"], lr=d["lr"],
                       warmup=min(d["warmup"], d["steps"]), eval_every=d["eval_every"],
                       eval_batches=d["eval_batches"], seed=args.seed, out_dir=str(out),
                       progress=not args.no_progress)
    print(f"train  : {tcfg.steps} steps x {tcfg.batch_size} x {tcfg.seq_len} tokens, AdamW lr {tcfg.lr}, "
          f"warmup {tcfg.warmup} + cosine; threads: {threads}")
    result = train(model, corpus, tcfg)
    t_train = time.perf_counter() - t_start

    _print_header("validation")
    first = result.history[0]["loss"]
    print(f"loss {first:.3f} -> validation loss {loss_text(result.final_val_loss, byte_level=True, digits=3)}; "
          f"uniform guess: {np.log(256):.2f} nats/byte")
    _print_header("FFN sparsity (exact zeros of h on validation text)")
    fr = ffn_zero_fraction(model, corpus, batch_size=d["batch_size"], seq_len=d["seq_len"],
                           n_batches=d["sparsity_batches"])
    print(sparsity_table(fr))
    _print_header(f"sample (prompt {d['prompt']!r}, temperature 0.8, top-k 40)")
    sys.stdout.write(d["prompt"])
    sample = _stream_text(model, ByteTokenizer(), d["prompt"], d["sample_tokens"], 0.8, 40, None, args.seed)
    wall = time.perf_counter() - t_start
    summary = {"val_loss": result.final_val_loss, "first_loss": first, "ffn_zero_fraction": fr,
               "mean_ffn_zero_fraction": float(np.mean(fr)), "steps": tcfg.steps,
               "train_seconds": t_train, "wall_seconds": wall, "quick": bool(args.quick),
               "model_config": cfg.to_dict(), "train_config": tcfg.to_dict(), "sample": d["prompt"] + sample}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "sample.txt").write_text(d["prompt"] + sample + "\n")
    _print_header("outputs")
    for name in ("checkpoint.safetensors", "metrics.jsonl", "loss.png", "summary.json", "sample.txt"):
        if (out / name).exists():
            print(f"  {out / name}")
    print(f"done in {wall:.0f} s. Next: minisparse generate --model {out} --prompt 'import '")
    return 0


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------
_ARCH_FLAGS = {"dim": "dim", "layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads",
               "ffn_dim": "ffn_dim", "activation": "activation", "experts": "n_experts", "top_k": "top_k"}
_TRAIN_FLAGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr",
                "warmup": "warmup", "seed": "seed", "l1": "l1", "eval_every": "eval_every",
                "grad_accum": "grad_accum", "weight_decay": "weight_decay", "save_every": "save_every",
                "grad_clip": "grad_clip"}


def _model_config_from_args(args):
    from ..config import PRESETS, preset
    name = args.preset or "tiny"
    if name.lower() not in PRESETS:
        raise UserError(f"unknown --preset {name!r}; choose one of {sorted(PRESETS)}")
    over = {field: getattr(args, flag) for flag, field in _ARCH_FLAGS.items() if getattr(args, flag) is not None}
    if args.kv_heads is None and args.heads is not None:
        base_kv = PRESETS[name.lower()].get("n_kv_heads")
        if base_kv is not None and args.heads % base_kv:
            over["n_kv_heads"] = args.heads          # the preset's KV heads do not divide: plain MHA
    seq_len = args.seq_len or 128
    over["max_seq_len"] = max(PRESETS[name.lower()].get("max_seq_len", 256), seq_len)
    try:
        return preset(name, **over)
    except (ValueError, KeyError) as e:
        raise UserError(str(e).strip('"')) from None


RUN_FILES = ("checkpoint.safetensors", "metrics.jsonl", "loss.png", "routing.png", "routing.jsonl")


def _claim_run_folder(out: Path, overwrite: bool) -> None:
    """A fresh run may not write over another run: refuse a folder that holds files, unless
    ``--overwrite`` (which deletes the earlier run's files first, so nothing of it is mixed in)."""
    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    if not overwrite:
        shown = ", ".join(present[:4]) + (" ..." if len(present) > 4 else "")
        raise UserError(f"--out {str(out)!r} already holds files ({shown}); continue that run with "
                        f"--resume {out}, replace it with --overwrite, or choose another --out")
    from ..checkpoint import FILENAME, remove_stale_tmp
    remove_stale_tmp(out / FILENAME)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _resumed_run(args, given_train: dict):
    """(model, train-config dict, out folder, start step) of ``--resume``: the header and the
    weights here; :func:`~minisparse.train.train` reads the optimizer state itself."""
    from ..checkpoint import checkpoint_path, load, read_metadata
    arch = [f"--{k.replace('_', '-')}" for k in list(_ARCH_FLAGS) + ["preset", "dtype"] if getattr(args, k) is not None]
    if arch:
        raise UserError(f"{', '.join(arch)} cannot be combined with --resume: the model comes from the checkpoint")
    meta = read_metadata(args.resume)
    extra = meta.get("extra") or {}
    saved = extra.get("train_config")
    if saved is None:
        raise UserError(f"{args.resume} holds no training config; it cannot be resumed")
    out = args.out or str(checkpoint_path(args.resume).parent)
    src = extra.get("corpus") or {}
    if args.data is None and src.get("path"):          # the run's own corpus, read the same way
        args.data = src["path"]
        for key in ("max_bytes", "val_fraction"):
            if getattr(args, key) is None and src.get(key) is not None:
                setattr(args, key, src[key])
    return load(args.resume), {**saved, **given_train}, out, meta.get("step") or 0


def _fresh_run(args, given_train: dict):
    from ..model import Transformer
    dtype = {"float32": np.float32, "float64": np.float64}[args.dtype or "float32"]
    model = Transformer(_model_config_from_args(args), seed=args.seed or 0, dtype=dtype)
    out = args.out or "runs/train"
    _claim_run_folder(check_out_dir(out), args.overwrite)
    return model, dict(given_train), out, 0


def cmd_train(args) -> int:
    from ..data import load_corpus
    from ..train import TrainConfig, ffn_zero_fraction, train
    from .common import loss_text
    from .routing import RoutingMonitor

    threads = _threads(args)
    given_train = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    model, tc, out, start = (_resumed_run if args.resume else _fresh_run)(args, given_train)
    check_out_dir(out)
    tc.update(out_dir=out, progress=not args.no_progress)
    try:
        tcfg = TrainConfig.from_dict(tc) if args.resume else TrainConfig(**tc)
    except ValueError as e:
        raise UserError(str(e)) from None
    corpus = load_corpus(args.data, max_bytes=args.max_bytes if args.max_bytes is not None else 2_000_000,
                         val_fraction=args.val_fraction if args.val_fraction is not None else 0.1)
    c = model.config
    print(f"corpus : {corpus.name}: {corpus.n_docs} document(s), {corpus.n_bytes:,} bytes "
          f"({len(corpus.train):,} train / {len(corpus.val):,} val tokens)")
    print(f"model  : {c.n_layers} layers, dim {c.dim}, heads {c.n_heads}/{c.n_kv_heads} kv, ffn {c.ffn_dim}, "
          f"{c.activation}" + (f", {c.n_experts} experts top-{c.top_k}" if c.n_experts else "")
          + f", {model.num_parameters():,} parameters, {model.dtype}")
    print(f"train  : steps {start}..{tcfg.steps}, {tcfg.batch_size} x {tcfg.seq_len} tokens"
          f"{f' x {tcfg.grad_accum} accumulated' if tcfg.grad_accum > 1 else ''}, lr {tcfg.lr}, out {out}, "
          f"threads: {threads}")
    routing = RoutingMonitor(model, corpus, tcfg.seq_len, out) if c.n_experts else None
    result = train(model, corpus, tcfg, resume=args.resume, callback=routing)
    print(f"validation loss {loss_text(result.final_val_loss, byte_level=True)}")
    if routing is not None:
        routing.plot()
    fr = ffn_zero_fraction(model, corpus, batch_size=min(8, tcfg.batch_size), seq_len=tcfg.seq_len, n_batches=2)
    print(sparsity_table(fr))
    for name in RUN_FILES:
        if (Path(out) / name).exists():
            print(f"wrote {Path(out) / name}")
    return 0


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    model, tok = load_any(args.model)
    sys.stdout.write(args.prompt)                   # the continuation streams after it
    _stream_text(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                 args.top_p, args.seed, backend=args.backend)
    return 0


# --------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------
THREADS_HELP = ("threads for training: a step's batch rows split over them, BLAS 1 thread each (default: "
                "the cores the load average says are free; on busy cores more threads only wait for each other)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="minisparse",
        description="Activation-sparse (dReLU, ReLUfication) and Mixture-of-Experts transformers in NumPy.")
    from .. import __version__
    ap.add_argument("--version", action="version", version=f"minisparse {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for register in (_register_demo, _register_train, _register_generate, *(m.register for m in SUBCOMMANDS)):
        register(sub)
    return ap


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a small dReLU model on the Python stdlib (~3 min on 2 cores)",
                       description="Train a tiny dReLU transformer on the Python standard library's "
                                   "sources, then print its validation loss, per-layer FFN sparsity "
                                   "and a sample.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help=f"a ~20 s version ({DEMO_QUICK['preset']} model, {DEMO_QUICK['steps']} steps)")
    p.add_argument("--steps", type=positive_int, help="override the number of training steps")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of init, batches and sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.set_defaults(func=cmd_demo)


def _register_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a text file or folder (or the stdlib)",
                       description="Train a minisparse model. Architecture: --preset plus overrides. "
                                   "Outputs go to --out: checkpoint.safetensors, metrics.jsonl, loss.png.")
    g = p.add_argument_group("model (ignored with --resume)")
    g.add_argument("--preset", help="base configuration: nano, tiny (default), small, tiny-moe")
    g.add_argument("--dim", type=positive_int, help="residual width D")
    g.add_argument("--layers", type=positive_int, help="number of blocks")
    g.add_argument("--heads", type=positive_int, help="query heads")
    g.add_argument("--kv-heads", type=positive_int, help="key/value heads (GQA)")
    g.add_argument("--ffn-dim", type=positive_int, help="FFN neurons F (per expert)")
    g.add_argument("--activation", help="FFN activation: swiglu, drelu, reglu, relu, drelu:0.05, ...")
    g.add_argument("--experts", type=nonneg_int, help="experts per MoE layer (0 = dense)")
    g.add_argument("--top-k", type=positive_int, help="experts per token (MoE)")
    g.add_argument("--dtype", choices=("float32", "float64"), help="parameter dtype (default float32)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, help="optimizer steps (default 300)")
    g.add_argument("--batch-size", type=positive_int, help="sequences per step (default 16)")
    g.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default 128)")
    g.add_argument("--lr", type=positive_float, help="peak learning rate (default 3e-3)")
    g.add_argument("--warmup", type=nonneg_int, help="warmup steps (default 30)")
    g.add_argument("--weight-decay", type=nonneg_float, help="AdamW weight decay (default 0.1)")
    g.add_argument("--grad-clip", type=nonneg_float, help="global gradient-norm clip, 0 = off (default 1)")
    g.add_argument("--grad-accum", type=positive_int, help="micro-batches per step (default 1)")
    g.add_argument("--l1", type=nonneg_float, help="ProSparse activation penalty: l1 * sum over neurons of |h|, per token, each FFN (default 0)")
    g.add_argument("--eval-every", type=nonneg_int, help="validate every N steps (default 100)")
    g.add_argument("--save-every", type=nonneg_int, help="checkpoint every N steps (default: at the end)")
    g.add_argument("--seed", type=nonneg_int, help="seed of init and batches (default 0)")
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data", help="text file or folder of text files (default: the Python stdlib)")
    g.add_argument("--max-bytes", type=positive_int, help="read at most this many bytes (default 2000000)")
    g.add_argument("--val-fraction", type=fraction, help="share held out for validation, in [0, 1) (default 0.1)")
    g.add_argument("--out", help="output folder (default runs/train; with --resume, the checkpoint's)")
    g.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out folder that holds an earlier run (its files are deleted)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.set_defaults(func=cmd_train)


def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained model",
                       description="Stream text from a minisparse checkpoint (file or folder) or a "
                                   "Hugging Face model folder (config.json + *.safetensors).")
    p.add_argument("--model", required=True, help="checkpoint file, training folder, or HF folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a file)")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=200,
                   help="tokens to generate after the prompt (default 200; capped by the model's max_seq_len)")
    p.add_argument("--temperature", type=nonneg_float, default=0.8,
                   help="divide the logits by this before sampling; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=unit_float, default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches p, in (0, 1] "
                        "(default: off)")
    p.add_argument("--seed", type=nonneg_int, default=None,
                   help="seed of the sampler: the same seed gives the same text (default: a fresh one each run)")
    p.add_argument("--backend", default=None, help="sparse FFN backend for decoding (numpy, numba, cupy)")
    p.set_defaults(func=cmd_generate)


_NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d)")


def _join_negative_values(argv: List[str]) -> List[str]:
    """``--lr -1e-3`` -> ``--lr=-1e-3``: argparse takes ``-1e-3`` for an option (it knows only
    plain negative numbers), so the value's own check can say what is wrong with it."""
    out: List[str] = []
    for tok in argv:
        if out and _NEGATIVE_NUMBER.match(tok) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError):
        return os_error_line(e)
    text = str(e).strip().strip('"') or type(e).__name__
    return " ".join(text.split())


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``minisparse`` console script; returns the exit status.

    A mistake in the arguments or the inputs ends in one ``minisparse COMMAND: error: ...``
    line on stderr and a non-zero status, never in a traceback (``MINISPARSE_DEBUG=1``
    shows the traceback of errors that are not argument mistakes).
    """
    ap = build_parser()
    args = ap.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"minisparse {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, TypeError, ImportError, FloatingPointError, MemoryError,
            RuntimeError, RecursionError) as e:
        if os.environ.get("MINISPARSE_DEBUG"):
            raise
        what = "" if isinstance(e, (OSError, ValueError, KeyError, ImportError, FloatingPointError)) \
            else f"{type(e).__name__}: "
        print(f"minisparse {args.command}: error: {what}{_one_line(e)}\n(set MINISPARSE_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
