"""A/B: greedy decoding on the host with two versions of minisparse, interleaved.

Checks that a change to the model code (e.g. the NumPy/CuPy seam) leaves the NumPy host
path's speed unchanged. Each round runs both versions in fresh subprocesses, alternating
which goes first, on the same model (Mistral-sized drelu blocks, float32, random weights);
reports the median ms/token of each and their ratio, and that the tokens agree.

    python bench/host_path_ab.py OLD_SRC NEW_SRC [--layers 2 --new-tokens 16 --rounds 5]

OLD_SRC / NEW_SRC are folders holding a ``minisparse`` package (e.g. a git worktree).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
# this folder's minisparse, not an editable install's (its finder sits before sys.path)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]
sys.path.insert(0, sys.argv[5])
import numpy as np
import minisparse as ms
layers, dim, ffn, n = (int(v) for v in sys.argv[1:5])
cfg = ms.ModelConfig(vocab_size=258, dim=dim, n_layers=layers, n_heads=32, n_kv_heads=8, ffn_dim=ffn,
                     max_seq_len=256, activation="drelu")
m = ms.Transformer(cfg, seed=0)
prompt = [256] + list(range(65, 80))
ms.generate(m, prompt, 2, temperature=0)                       # warm-up
t0 = time.perf_counter()
toks = ms.generate(m, prompt, n, temperature=0)
print(json.dumps({"ms_per_token": (time.perf_counter() - t0) / n * 1e3, "tokens": toks, "file": ms.__file__}))
"""


def run(src, a):
    out = subprocess.run([sys.executable, "-c", CHILD, str(a.layers), str(a.dim), str(a.ffn_dim), str(a.new_tokens),
                          os.path.abspath(src)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--ffn-dim", type=int, default=14336)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/host_path_ab.json")
    a = ap.parse_args(argv)
    res = {"old": [], "new": []}
    toks = {}
    for r in range(a.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for k in order:
            o = run(getattr(a, k), a)
            res[k].append(o["ms_per_token"])
            toks[k] = o["tokens"]
            print(f"round {r} {k}: {o['ms_per_token']:.2f} ms/token  ({o['file']})", flush=True)
    mo, mn = statistics.median(res["old"]), statistics.median(res["new"])
    print(f"median ms/token: old {mo:.2f}, new {mn:.2f}, new/old {mn / mo:.3f}; tokens equal: {toks['old'] == toks['new']}")
    with open(a.out, "w") as fh:
        json.dump(dict(vars(a), runs=res, median_old=mo, median_new=mn, ratio=mn / mo,
                       tokens_equal=toks["old"] == toks["new"]), fh, indent=2)


if __name__ == "__main__":
    main()
