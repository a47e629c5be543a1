"""``minisparse relufy``: swap a model's FFN activation for a ReLU-family one and recover.

    minisparse relufy MODEL --to drelu --steps 300 --out runs/relufied
    minisparse relufy MODEL --to reglu --steps 300 --l1 1e-3 --fatrelu 0.01 --shift 0.05

MODEL is a minisparse checkpoint (file, or folder holding checkpoint.safetensors) or a
Hugging Face folder (config.json + *.safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import check_out_dir, finite_float, load_any, load_data, nonneg_float, nonneg_int, positive_float, positive_int


def cmd_relufy(args) -> int:
    from ..checkpoint import save
    from ..train import TrainConfig
    from ..sparsity.relufy import relufy
    check_out_dir(args.out)
    model, tok = load_any(args.model)
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


def register(subparsers) -> None:
    """Add ``relufy`` to the ``minisparse`` command's subparsers."""
    p = subparsers.add_parser(
        "relufy", help="swap a model's FFN activation for ReLU/dReLU and continue training",
        description="ReLUfication: replace MODEL's activation (e.g. swiglu) by a ReLU-family one "
                    "(reglu, drelu, relu2glu; relu/relu2 for plain models), continue training for --steps, "
                    "optionally with a ProSparse L1 penalty and a final FATReLU threshold. Prints loss and "
                    "sparsity before, right after the swap, and after recovery.")
    p.add_argument("model", help="checkpoint file, training folder, or Hugging Face folder")
    p.add_argument("--to", default="drelu", help="target activation (default drelu)")
    p.add_argument("--steps", type=nonneg_int, default=300, help="recovery training steps (default 300)")
    p.add_argument("--shift", type=finite_float, default=0.0, help="ReLU(x - shift) instead of ReLU(x)")
    p.add_argument("--l1", type=nonneg_float, default=0.0, help="ProSparse L1 penalty on h (default 0)")
    p.add_argument("--fatrelu", type=positive_float, default=None, help="final FATReLU threshold")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--eval-batches", type=positive_int, default=8)
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib corpus)")
    p.add_argument("--max-bytes", type=positive_int, default=2_000_000)
    p.add_argument("--out", default="runs/relufied", help="output folder (checkpoint, relufy.json, metrics)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_relufy)
