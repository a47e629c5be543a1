"""The speed a user gets from ``Transformer`` on the GPU: the model API, eager, no tricks.

The issue's reproduction: a model of 2 Mistral-sized drelu blocks (dim 4096, ffn 14336,
32 query / 8 KV heads, vocab 32000), greedy decoding after a 16-token prompt, float32,
timed through the public API only:

    host numpy          ms.generate(model)                        (the NumPy reference, this CPU)
    host + cupy FFNs    Transformer(backend="cupy"), weights on the host (copied per call: the old way)
    device eager        model.to("cupy"); ms.generate(model)      (the same code on CuPy arrays)
    device eager skip   ... backend="cupy": sparse FFN kernels on device-resident weights
    device graph        GraphDecoder(model, weight_dtype="float32"), dense / skip

Every row's tokens are checked against the host NumPy row first. The weights are random
(normal, std 0.02) with the FFN gate biased so that ~90% of neurons are inactive for
every token: ``kernels.decode_cuda.exactly_sparse_params`` where available, else plain
random weights (then ~50% of drelu neurons are zero). Prints a table and writes JSON.

    python bench/decode_device.py [--layers 2] [--new-tokens 32] [--out bench/results/decode_device.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minisparse as ms  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def timed_generate(fn, n_new: int, repeats: int):
    """(tokens, best seconds per new token) over ``repeats`` runs after one warm-up."""
    toks = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) / n_new)
    return toks, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--ffn-dim", type=int, default=14336)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/decode_device.json")
    a = ap.parse_args(argv)
    cfg = ms.ModelConfig(vocab_size=32000, dim=a.dim, n_layers=a.layers, n_heads=32, n_kv_heads=8,
                         ffn_dim=a.ffn_dim, max_seq_len=256, activation="drelu", tie_embeddings=False)
    try:
        from minisparse.kernels.decode_cuda import exactly_sparse_params
        params, _active = exactly_sparse_params(cfg, sparsity=0.9, seed=0, dtype=np.float32)
        construction = "exactly_sparse_params(sparsity=0.9)"
    except Exception as e:  # noqa: BLE001 - report and fall back to random weights
        params = ms.Transformer.init_params(cfg, seed=0, dtype=np.float32)
        construction = f"random init ({type(e).__name__})"
    prompt = list(np.random.default_rng(0).integers(0, cfg.vocab_size, size=16))
    n = a.new_tokens
    rows = []

    host = ms.Transformer(cfg, params={k: v.copy() for k, v in params.items()})
    ref, t = timed_generate(lambda: ms.generate(host, prompt, n, temperature=0), n, a.repeats)
    rows.append(("host numpy", t, ref))

    import warnings
    import cupy as cp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # the "weights on the host" warning is the point here
        old = ms.Transformer(cfg, params={k: v.copy() for k, v in params.items()}, backend="cupy")
        toks, t = timed_generate(lambda: ms.generate(old, prompt, n, temperature=0), n, 1)
    rows.append(("host params + backend=cupy (old way)", t, toks))

    dev = ms.Transformer(cfg, params={k: v.copy() for k, v in params.items()}).to("cupy")

    def sync_gen(**kw):
        out = ms.generate(dev, prompt, n, temperature=0, **kw)
        cp.cuda.Device().synchronize()
        return out
    for name, kw in (("device eager (dense)", {}), ("device eager, backend=cupy (skip)", dict(backend="cupy"))):
        toks, t = timed_generate(lambda kw=kw: sync_gen(**kw), n, a.repeats)
        rows.append((name, t, toks))
    try:
        from minisparse.kernels.decode_cuda import GraphDecoder
        for mode in ("dense", "skip"):
            dec = GraphDecoder(dev, mode=mode, weight_dtype="float32")
            toks, t = timed_generate(lambda dec=dec: dec.generate(prompt, n), n, a.repeats)
            rows.append((f"device graph, {mode} (GraphDecoder)", t, toks))
    except Exception as e:  # noqa: BLE001
        print(f"GraphDecoder rows skipped: {type(e).__name__}: {e}")

    gpu = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"\n{a.layers} blocks, dim {a.dim}, ffn {a.ffn_dim}, 32/8 heads, vocab 32000, float32, "
          f"{construction}; {n} new tokens after 16; CPU {cpu_model()}, GPU {gpu}")
    print(f"{'path':<42} {'ms/token':>9} {'tokens/s':>9} {'vs host':>8}  tokens == host")
    t_host = rows[0][1]
    out = []
    for name, t, toks in rows:
        same = toks == ref
        print(f"{name:<42} {t * 1e3:>9.2f} {1 / t:>9.1f} {t_host / t:>7.2f}x  {same}")
        out.append(dict(path=name, ms_per_token=t * 1e3, tokens_per_s=1 / t, speedup_vs_host=t_host / t,
                        tokens_equal_host=same))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(cpu=cpu_model(), gpu=gpu, layers=a.layers, dim=a.dim, ffn_dim=a.ffn_dim,
                                           new_tokens=n, construction=construction, rows=out), indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
