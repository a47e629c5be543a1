"""Reproduce TurboSparse's activation comparison at laptop scale, with seeds and intervals.

Song et al. 2024, "Turbo Sparse: Achieving LLM SOTA Performance with Minimal Activated
Parameters" (arXiv 2406.05955): dReLU (relu(gate) * relu(up)) trains as well as SwiGLU
(Table 2) while ~90% of its FFN activations are exactly zero, and it keeps its quality when
only the top 10% of neurons per token are kept, where SwiGLU does not (Table 3).

The script works in three steps, each resumable, so runs can be spread over processes and
machines and analysed later:

1. ``train``: one *run* = (activation, seed, steps, lr, depth) trains a model on the
   embedded corpus (Python stdlib sources) and saves its checkpoint and history under
   ``--ckpt-root`` (default ``runs/turbosparse/``, git-ignored). Runs are **paired**: the
   seed fixes both the initial weights (identical across activations, whose parameters
   have the same shapes) and the data order, so swiglu seed 3 and drelu seed 3 see the
   same batches. ``--relufy`` also ReLUfies each seed's base swiglu model to reglu and
   drelu and trains a swiglu of the same total length (equal-budget comparison).
2. ``analyse``: every measurement of one checkpoint, on the **whole validation split** cut
   into non-overlapping windows (bootstrap CIs over windows), written as one JSON per run
   under ``bench/results/turbosparse/``.
3. ``report``: aggregates the per-run JSONs: mean +- sd over seeds per activation,
   paired differences with 95% t intervals, the published numbers beside ours in the
   papers' units, and writes ``bench/results/reproduce_turbosparse_summary.json``.

    python bench/reproduce_turbosparse.py train --models swiglu,drelu --seeds 0-4
    python bench/reproduce_turbosparse.py analyse
    python bench/reproduce_turbosparse.py report
    python bench/reproduce_turbosparse.py --quick   # all three steps on nano models (~1 min)

On a shared machine run one BLAS thread per process (OMP_NUM_THREADS=1
OPENBLAS_NUM_THREADS=1): a multi-threaded BLAS spinning under contention made each training
step ~15x more expensive in CPU time (3.9 vs 0.27 CPU-seconds per step of the tiny model).

The corpus is read from ``bench/data/turbosparse_corpus.tar.gz`` (the first 74 files of
CPython 3.11.7's standard library), not from the running Python's own stdlib, so every
machine trains and validates on the same tokens (each run's JSON records their hashes).

Nothing here is imported by the package; nothing asserts on the numbers.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RUNS_JSON = RESULTS / "turbosparse"
CKPT_ROOT = ROOT / "runs" / "turbosparse"
TOPK = (0.0, 0.5, 0.8, 0.85, 0.9)
ACTS = ("swiglu", "geglu", "reglu", "drelu", "relu")

# The published numbers, copied from the papers' text (see ../shared/PAPERS.md of the
# project notes, and the papers themselves). Units are the papers' own.
PUBLISHED = {
    "turbosparse": {
        "source": "Song et al. 2024, TurboSparse, arXiv:2406.05955 v2",
        "setting": ("~300M params (hidden 1024, 24 layers, 16 heads, ctx 2048, vocab 32000), fineweb 5B tokens, "
                    "AdamW lr 1e-4 cosine, batch 128 x 2048; perplexity on WikiText-2"),
        "table2_train_loss": {"drelu": 3.154, "swiglu": 3.146},
        "table2_wikitext2_ppl": {"drelu": 28.45, "swiglu": 28.48},
        "table3_topk_sparsity": [0.0, 0.5, 0.8, 0.85, 0.9],
        "table3_ppl": {"drelu": [28.45, 28.45, 28.45, 28.65, 29.19],
                       "swiglu": [28.48, 28.62, 36.28, 48.55, 112.36]},
        "table10_downstream_avg": {"drelu": 42.23, "swiglu": 42.18},
        "table1_exact_zero": {"Llama-2-7B": 0.40, "ReLULlama-7B": 0.67, "ShiftedReLULlama-7B": 0.71},
        "sec6_2_inactive": {"TurboSparse-Mistral-7B": 0.90, "TurboSparse-Mixtral-47B (per expert)": 0.85},
    },
    "prosparse": {"source": "Song et al. 2024, ProSparse, arXiv:2402.13516",
                  "predictor_recall": 0.9234, "predictor_predicted_sparsity": 0.7875,
                  "exact_zero": {"ProSparse-7B": 0.8932, "ProSparse-13B": 0.8880, "ProSparse-1B": 0.8789,
                                 "ReluLLaMA-7B": 0.6698, "ReluLLaMA-13B": 0.7156}},
    "powerinfer": {"source": "Song et al. 2024, PowerInfer, arXiv:2312.12456",
                   "neurons_for_80pct_of_activations": {"OPT-30B": 0.26, "LLaMA2-ReGLU-70B": 0.43,
                                                        "LLaMA2-SwiGLU-70B": 0.69}},
    "relu2wins": {"source": "Zhang et al. 2024, ReLU^2 Wins, arXiv:2402.03804", "cett_target": 0.2},
}


# ------------------------------------------------------------------------------------------
# settings and run keys
# ------------------------------------------------------------------------------------------
def scale(args) -> dict:
    """The training scale of this invocation (what the keys and the JSONs record)."""
    q = args.quick
    return {"preset": args.preset or ("nano" if q else "tiny"),
            "steps": int(args.steps) if getattr(args, "steps", None) else int(round((150 if q else 800) * args.steps_mult)),
            "batch_size": args.batch_size or 16, "seq_len": args.seq_len or (64 if q else 128),
            "corpus_bytes": 400_000 if q else 2_000_000, "quick": q}


def run_key(act: str, seed: int, steps: int, lr: float, layers: int, preset: str, relufy_steps: int = 0,
            device: str = "numpy") -> str:
    k = f"{preset}_L{layers}_{act.replace('->', '-to-')}_st{steps}"
    if relufy_steps:
        k += f"+{relufy_steps}"
    return k + f"_lr{lr:g}_seed{seed}" + ("_gpu" if device == "cupy" else "")


def parse_seeds(s: str):
    out = []
    for part in s.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def machine() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}


def _gpu_name():
    try:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:          # the name is a record only
        return f"unknown ({type(e).__name__})"


# The corpus every committed run used: the first 74 .py files of CPython 3.11.7's standard
# library (2,003,464 bytes; the embedded corpus of the machine the first runs were made on).
# The embedded corpus is *this* Python's stdlib, which differs between versions (3.12 has
# other files), so the script reads the archived copy: the same tokens on any machine.
CORPUS_ARCHIVE = HERE / "data" / "turbosparse_corpus.tar.gz"
CORPUS_SHA1 = {2_000_000: ("cdd49a16a93ae1e8", "ac68fe296ce4a6d5"),      # (train, val) tokens, 16 hex digits
               400_000: ("f71fb0457a2600f1", "4e14708251caf39e")}


def _sha1(a) -> str:
    import hashlib
    return hashlib.sha1(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()[:16]


def _corpus(sc):
    """The training corpus at this scale: the archived stdlib files (CORPUS_ARCHIVE), or the
    embedded corpus of this Python if the archive is missing; warns when the tokens are not
    the ones the committed runs used."""
    import shutil
    import tarfile
    import tempfile
    from minisparse.data import load_corpus
    if CORPUS_ARCHIVE.exists():
        tmp = Path(tempfile.mkdtemp(prefix="turbosparse_corpus_"))
        try:
            with tarfile.open(CORPUS_ARCHIVE) as tar:
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, **kw)
            c = load_corpus(tmp, max_bytes=sc["corpus_bytes"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        c.name = "python-stdlib-3.11.7 (bench/data/turbosparse_corpus.tar.gz)"
    else:
        c = load_corpus(max_bytes=sc["corpus_bytes"])
    want = CORPUS_SHA1.get(sc["corpus_bytes"])
    if want and (_sha1(c.train), _sha1(c.val)) != want:
        print(f"warning: the corpus tokens differ from those of the committed runs ({CORPUS_ARCHIVE} missing "
              "or changed?): results are not comparable with bench/results/turbosparse/", file=sys.stderr)
    return c


# ------------------------------------------------------------------------------------------
# step 1: training
# ------------------------------------------------------------------------------------------
def _train_cfg(steps, sc, lr, seed, warmup=None, progress=False):
    from minisparse.train import TrainConfig
    return TrainConfig(steps=steps, batch_size=sc["batch_size"], seq_len=sc["seq_len"], lr=lr,
                       warmup=warmup if warmup is not None else max(1, steps // 20),
                       eval_every=max(1, steps // 4), eval_batches=8, seed=seed, progress=progress,
                       log_every=max(1, steps // 10))


def _save_run(model, folder: Path, meta: dict) -> None:
    import minisparse as ms
    folder.mkdir(parents=True, exist_ok=True)
    ms.save(model, folder / "model.safetensors")
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, default=float))
    tmp.replace(folder / "meta.json")


def _history(h):
    return [{k: r[k] for k in ("step", "loss", "val_loss") if k in r} for r in h]


def train_base(act, seed, sc, lr, layers, corpus, root: Path, force=False, device: str = "numpy") -> Path:
    """Train one from-scratch run (skipped when its checkpoint exists). ``device="cupy"``
    trains on the GPU (same initial weights and batches; the key gets ``_gpu``); the
    checkpoint is saved from the host either way, and ``analyse`` runs on the CPU."""
    import minisparse as ms
    from minisparse.train import ffn_zero_fraction, train
    key = run_key(act, seed, sc["steps"], lr, layers, sc["preset"], device=device)
    folder = root / key
    if (folder / "meta.json").exists() and not force:
        print(f"[{key}] exists, skipped", flush=True)
        return folder
    model = ms.Transformer(ms.preset(sc["preset"], activation=act, n_layers=layers), seed=seed)
    if device != "numpy":
        model.to(device)
    cfg = _train_cfg(sc["steps"], sc, lr, seed)
    traj = []

    def track(step, rec):   # exact-zero sparsity along training
        if "val_loss" in rec:
            z = ffn_zero_fraction(model, corpus, batch_size=4, seq_len=sc["seq_len"], n_batches=2)
            traj.append({"step": step + 1, "val_loss": rec["val_loss"], "exact_zero": float(np.mean(z))})

    t0, c0 = time.perf_counter(), time.process_time()
    r = train(model, corpus, cfg, callback=track)
    if device != "numpy":
        model.to("numpy")
    meta = {"key": key, "kind": "base", "device": device, "gpu": _gpu_name() if device != "numpy" else None,
            "activation": act, "seed": seed, "lr": lr, "layers": layers,
            "steps": sc["steps"], "scale": sc, "train_config": cfg.to_dict(), "params": model.num_parameters(),
            "train_wall_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
            "final_val_loss_sampled": r.final_val_loss, "history": _history(r.history),
            "corpus": {"name": corpus.name, "train_sha1": _sha1(corpus.train), "val_sha1": _sha1(corpus.val)},
            "sparsity_during_training": traj, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    _save_run(model, folder, meta)
    print(f"[{key}] trained in {meta['train_wall_s']:.0f} s wall / {meta['train_cpu_s']:.0f} s CPU, "
          f"val loss (8 sampled batches) {r.final_val_loss:.4f}", flush=True)
    return folder


def train_relufied(seed, sc, lr, layers, corpus, root: Path, relufy_lr: float, force=False, equal_budget=True,
                   targets=("reglu", "drelu")):
    """ReLUfy seed's base swiglu to reglu and drelu (+steps//2), and train an equal-budget swiglu."""
    import minisparse as ms
    from minisparse.sparsity import relufy
    rsteps = sc["steps"] // 2
    base = root / run_key("swiglu", seed, sc["steps"], lr, layers, sc["preset"])
    if not (base / "meta.json").exists():
        train_base("swiglu", seed, sc, lr, layers, corpus, root)
    for to in targets:
        key = run_key(f"swiglu->{to}", seed, sc["steps"], lr, layers, sc["preset"], relufy_steps=rsteps)
        folder = root / key
        if (folder / "meta.json").exists() and not force:
            print(f"[{key}] exists, skipped", flush=True)
            continue
        model = ms.load(base / "model.safetensors")
        cfg = _train_cfg(rsteps, sc, relufy_lr, seed + 1000, warmup=max(1, rsteps // 10))
        t0, c0 = time.perf_counter(), time.process_time()
        rr = relufy(model, to, corpus=corpus, steps=rsteps, train_config=cfg, eval_batches=8,
                    eval_batch_size=sc["batch_size"], eval_seq_len=sc["seq_len"])
        meta = {"key": key, "kind": "relufied", "activation": f"swiglu->{to}", "seed": seed, "lr": lr,
                "relufy_lr": relufy_lr, "layers": layers, "steps": sc["steps"], "relufy_steps": rsteps,
                "scale": sc, "params": rr.model.num_parameters(), "train_wall_s": time.perf_counter() - t0,
                "train_cpu_s": time.process_time() - c0, "relufy_report": rr.report,
                "history": _history(rr.history), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        _save_run(rr.model, folder, meta)
        print(rr, flush=True)
    # the equal-budget base: swiglu trained from scratch for steps + steps // 2 (the same run
    # as `train --models swiglu --steps-mult 1.5`)
    if equal_budget:
        sc2 = dict(sc, steps=sc["steps"] + rsteps)
        train_base("swiglu", seed, sc2, lr, layers, corpus, root, force=force)


# ------------------------------------------------------------------------------------------
# step 2: analysis of one checkpoint on the whole validation split
# ------------------------------------------------------------------------------------------
def val_windows(corpus, T: int, max_windows: int = 0):
    """(n, T + 1) non-overlapping windows of the validation split: window i holds tokens
    i*T .. i*T + T, so the targets (its last T tokens) of different windows never overlap
    and together cover the split once (n = (len(val) - 1) // T)."""
    v = np.asarray(corpus.val)
    n = (len(v) - 1) // T
    if max_windows:
        n = min(n, max_windows)
    idx = np.arange(n)[:, None] * T + np.arange(T + 1)[None, :]          # (n, T+1)
    return v[idx].astype(np.int64)


def window_losses(model, windows, hook=None, batch: int = 16, run=None):
    """(n,) mean next-token cross-entropy of each window (nats per byte-token), float64."""
    out = []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        x, y = w[:, :-1], w[:, 1:]
        logits = (run(model, x) if run is not None else model(x, ffn_hook=hook)).astype(np.float64)  # (B, T, V)
        m = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]          # (B, T)
        nll = lse - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        out.append(nll.mean(axis=1))
    return np.concatenate(out)


def bootstrap_ci(num, den=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap over windows of mean(num) (or mean(num) / mean(den), paired)."""
    rng = np.random.default_rng(seed)
    num = np.asarray(num, dtype=np.float64)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    stat = num[idx].mean(axis=1)
    if den is not None:
        stat = stat / np.asarray(den, dtype=np.float64)[idx].mean(axis=1)
    a = (1 - level) / 2
    return [float(np.quantile(stat, a)), float(np.quantile(stat, 1 - a))]


def neurons_for_share(weights, share: float = 0.8) -> float:
    """Smallest fraction of neurons whose (sorted, largest first) weights cover ``share`` of the total."""
    c = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    tot = c.sum()
    if tot <= 0:
        return float("nan")
    k = int(np.searchsorted(np.cumsum(c) / tot, share - 1e-12) + 1)
    return k / len(c)


def predictor_sweep(model, corpus, windows, sc, recalls=(0.8, 0.9, 0.95, 0.98, 0.99, 0.995), n_eval_windows=256):
    """PowerInfer/Deja Vu predictors (rank 32) fitted on training text; per target recall
    (tuned on held-out training text), the recall and predicted sparsity on validation text
    and the validation loss with every FFN keeping only its predicted neurons."""
    from minisparse.predictor import evaluate as p_eval, loss_with_predictors, record, train_predictor, tune_threshold
    rng = np.random.default_rng(777)
    T, B = sc["seq_len"], sc["batch_size"]
    train_batches = [corpus.get_batch("train", B, T, rng)[0] for _ in range(10)]
    data = record(model, train_batches)
    w = windows[:n_eval_windows]
    vdata = record(model, [w[i:i + B, :-1] for i in range(0, len(w), B)])
    preds, holdout = {}, {}
    for key, (x, y) in data.items():
        n_hold = len(x) // 5
        preds[key] = train_predictor(x[n_hold:], y[n_hold:], rank=32, epochs=10, lr=3e-3, seed=0)
        holdout[key] = (x[:n_hold], y[:n_hold])

    def loss_with(ps):
        return float(np.mean([loss_with_predictors(model, ps, w[i:i + B, :-1], w[i:i + B, 1:])
                              for i in range(0, len(w), B)]))

    dense = loss_with({})
    rows = []
    for r in recalls:
        for key, p in preds.items():
            tune_threshold(p, *holdout[key], target_recall=r)
        ev = [p_eval(p, *vdata[key]) for key, p in preds.items()]
        tp = sum(e["recall"] * (1 - e["true_sparsity"]) * e["n"] for e in ev)
        pos = sum((1 - e["true_sparsity"]) * e["n"] for e in ev)
        rows.append({"target_recall": r, "val_recall": tp / pos if pos else 1.0,
                     "predicted_sparsity": float(np.mean([e["predicted_sparsity"] for e in ev])),
                     "true_sparsity": float(np.mean([e["true_sparsity"] for e in ev])),
                     "loss": (lp := loss_with(preds)), "loss_ratio": lp / dense,
                     "ppl_ratio": float(np.exp(lp - dense))})
    return {"dense_loss": dense, "eval_tokens": int(len(w) * T), "rank": 32, "rows": rows}


def analyse_run(folder: Path, out_dir: Path, max_windows: int = 0, subset_all: bool = False) -> dict:
    """Every measurement of one checkpoint; writes out_dir/<key>.json."""
    import minisparse as ms
    from minisparse.sparsity import Recorder, Threshold, TopK, calibrate_cett
    meta = json.loads((folder / "meta.json").read_text())
    sc = meta["scale"]
    corpus = _corpus(sc)
    model = ms.load(folder / "model.safetensors")
    L = model.config.n_layers
    T = sc["seq_len"]
    t0, c0 = time.perf_counter(), time.process_time()
    windows = val_windows(corpus, T, max_windows)
    rec = Recorder(value_reservoir=20000, row_reservoir=256, seed=0)
    dense = window_losses(model, windows, run=rec.run)                       # (n,) + statistics
    res = {"key": meta["key"], "activation": meta["activation"], "seed": meta["seed"], "lr": meta["lr"],
           "layers": meta["layers"], "steps": meta["steps"], "relufy_steps": meta.get("relufy_steps", 0),
           "params": meta["params"], "scale": sc, "kind": meta["kind"],
           "train_device": meta.get("device", "numpy"), "train_gpu": meta.get("gpu"),
           "corpus": {"train_sha1": _sha1(corpus.train), "val_sha1": _sha1(corpus.val),
                      "trained_on": meta.get("corpus")},
           "val": {"windows": int(len(windows)), "window_tokens": T, "tokens": int(len(windows) * T),
                   "split_tokens": int(len(corpus.val))},
           "val_loss": float(dense.mean()), "val_loss_ci": bootstrap_ci(dense),
           "val_loss_se": float(dense.std(ddof=1) / np.sqrt(len(dense)))}
    st = [rec.stats[(i, None)] for i in range(L)]
    res["exact_zero"] = float(np.mean([s.exact_zero_fraction() for s in st]))
    res["exact_zero_per_layer"] = [s.exact_zero_fraction() for s in st]
    res["dead_neurons"] = int(sum(int((s.neuron_active == 0).sum()) for s in st))
    res["dead_neurons_per_layer"] = [int((s.neuron_active == 0).sum()) for s in st]
    res["n_neurons"] = int(sum(s.n_neurons for s in st))
    res["neurons_for_80pct_nonzeros"] = float(np.mean([neurons_for_share(s.neuron_active) for s in st]))
    res["neurons_for_80pct_abs_mass"] = float(np.mean([neurons_for_share(s.neuron_abs_sum) for s in st]))
    res["consecutive_reuse"] = float(np.nanmean([s.reuse() for s in st]))
    # top-k (TurboSparse Table 3): per token keep the (1 - s) share of largest |h|. The 90%
    # point on the whole split; 50/80/85% on the first quarter of the windows (CPU budget),
    # stored as the dense loss of the whole split + the paired change on those windows.
    res["topk"] = {"0": float(dense.mean())}
    res["topk_ratio_ci"], res["topk_windows"] = {}, {}
    n_sub = len(windows) if subset_all else max(1, len(windows) // 4)
    for sp in TOPK[1:]:
        n = len(windows) if sp == 0.9 else n_sub
        lk = window_losses(model, windows[:n], hook=TopK(sp))
        res["topk"][f"{sp:g}"] = float(dense.mean() + (lk - dense[:n]).mean())
        res["topk_ratio_ci"][f"{sp:g}"] = bootstrap_ci(lk, dense[:n])
        res["topk_windows"][f"{sp:g}"] = int(n)
    # CETT-0.2 (ReLU^2 Wins): calibrated on the training split, evaluated on validation
    rec_tr = Recorder(value_reservoir=1, row_reservoir=1024, seed=1)
    rec_tr.record(model, corpus, split="train", n_batches=8, batch_size=sc["batch_size"], seq_len=T, seed=4321)
    cal = calibrate_cett(model, target=0.2, recorder=rec_tr)
    rule = Threshold({k: v["threshold"] for k, v in cal.items()})
    lc = window_losses(model, windows, hook=rule)
    res["cett02"] = {"calibration_sparsity": float(np.mean([cal[(i, None)]["sparsity"] for i in range(L)])),
                     "calibration_cett": [cal[(i, None)]["cett"] for i in range(L)],
                     "eps": [cal[(i, None)]["eps"] for i in range(L)],
                     "val_sparsity": float(rule.sparsity), "loss": float(lc.mean()),
                     "loss_ratio_ci": bootstrap_ci(lc, dense)}
    if res["exact_zero"] > 0.3:
        res["predictor"] = predictor_sweep(model, corpus, windows, sc)
    res["train"] = {k: meta.get(k) for k in ("train_wall_s", "train_cpu_s", "history", "sparsity_during_training",
                                            "relufy_report", "final_val_loss_sampled")}
    res["neuron_frequency"] = [round(float(f), 5) for s in st for f in s.frequency()]
    res["analysis_wall_s"], res["analysis_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    res["machine"], res["date"] = machine(), time.strftime("%Y-%m-%d %H:%M:%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{meta['key']}.json").write_text(json.dumps(res, indent=1, default=float))
    print(f"[{meta['key']}] analysed in {res['analysis_wall_s']:.0f} s: val loss {res['val_loss']:.4f} "
          f"[{res['val_loss_ci'][0]:.4f}, {res['val_loss_ci'][1]:.4f}] on {res['val']['tokens']} tokens, "
          f"zeros {res['exact_zero']:.1%}, top-k 90% x{res['topk']['0.9'] / res['topk']['0']:.4f}", flush=True)
    return res


def cmd_analyse(args) -> int:
    root = Path(args.ckpt_root)
    out = Path(args.out_json) if args.out_json else (RUNS_JSON if not args.quick else RESULTS / "turbosparse_quick")
    for folder in sorted(root.glob(args.runs)):
        if not (folder / "meta.json").exists():
            continue
        if (out / f"{folder.name}.json").exists() and not args.force:
            continue
        lock = out / f".{folder.name}.lock"          # another process is analysing this run
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock.mkdir()
        except FileExistsError:
            continue
        try:
            analyse_run(folder, out, args.max_windows, subset_all=args.quick)
        finally:
            lock.rmdir()
    return 0


# ------------------------------------------------------------------------------------------
# step 3: the report over seeds
# ------------------------------------------------------------------------------------------
# two-sided 95% quantiles of Student's t, df = 1..30 (no scipy needed)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_ci(x, level_t=_T975):
    """mean, sd and the 95% t interval of the mean of ``x`` (nan interval for one value)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    m = float(x.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": m, "sd": float("nan"), "ci": [float("nan"), float("nan")]}
    sd = float(x.std(ddof=1))
    h = level_t[min(n - 1, len(level_t)) - 1] * sd / math.sqrt(n)
    return {"n": n, "mean": m, "sd": sd, "ci": [m - h, m + h]}


def _load_runs(folder: Path):
    runs = []
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        r.setdefault("train_device", "numpy")       # runs analysed before --device existed trained on the CPU
        runs.append(r)
    return runs


def _curve(r):
    """(step, sampled val loss) at the trainer's evaluations (1/4 .. 4/4 of the run)."""
    return [(h["step"] + 1, h["val_loss"]) for h in r["train"]["history"] if "val_loss" in h]


def _paired(g_a, g_b, field):
    """t interval of a[field] - b[field] over the seeds both groups have."""
    b = {r["seed"]: r for r in g_b}
    return t_ci([r[field] - b[r["seed"]][field] for r in g_a if r["seed"] in b])


def _fmt_ci(st, f="+.4f"):
    if st["n"] == 0:
        return "-"
    if st["n"] == 1:
        return f"{st['mean']:{f}} (1 pair)"
    return f"{st['mean']:{f}} [{st['ci'][0]:{f}}, {st['ci'][1]:{f}}]"


def _devname(dev):
    return "GPU (CuPy)" if dev == "cupy" else "CPU"


def _group(runs, **want):
    return [r for r in runs if all(r.get(k) == v for k, v in want.items())]


def _pm(st, fmt="{:.4f}"):
    if st["n"] == 0:
        return "-"
    if st["n"] == 1:
        return fmt.format(st["mean"]) + " (1 seed)"
    return (fmt + " ± " + fmt).format(st["mean"], st["sd"])


def _pct(st):
    if st["n"] == 0:
        return "-"
    return f"{st['mean']:.1%}" + (f" ± {st['sd']:.1%}" if st["n"] > 1 else " (1 seed)")


def _ratio(r, sp):
    return math.exp(r["topk"][f"{sp:g}"] - r["topk"]["0"])


def _best_predictor_point(r, max_ppl_ratio=1.01):
    rows = [x for x in r.get("predictor", {}).get("rows", []) if x["ppl_ratio"] <= max_ppl_ratio]
    return max(rows, key=lambda x: x["predicted_sparsity"]) if rows else None


def _figures(runs, base, acts, tag: str, out_dir: Path = RESULTS) -> None:
    """Seed-band figures: ppl ratio vs top-k sparsity beside TurboSparse's Table 3, and the
    sampled validation loss along training."""
    from minisparse.sparsity import plots
    P = PUBLISHED["turbosparse"]
    series = {a: [[_ratio(r, sp) for sp in TOPK] for r in _group(runs, activation=a, **base)] for a in acts}
    ref = {f"TurboSparse {a} (published, 300M)": [v / P["table3_ppl"][a][0] for v in P["table3_ppl"][a]]
           for a in ("swiglu", "drelu")}
    plots.plot_seed_bands([100 * s for s in TOPK], series, out_dir / f"turbosparse_ppl_ratio_vs_topk{tag}.png",
                          xlabel="top-k sparsity (% of neurons zeroed per token)",
                          ylabel="perplexity / dense perplexity", logy=True, reference=ref,
                          title="top-k sparsity: ours (mean ± sd over seeds) and TurboSparse Table 3")
    curves = {}
    for a in acts:
        rows = []
        for r in _group(runs, activation=a, **base):
            rows.append([h["val_loss"] for h in r["train"]["history"] if "val_loss" in h])
        n = min(len(x) for x in rows)
        curves[a] = [x[:n] for x in rows]
        steps = [h["step"] + 1 for h in _group(runs, activation=a, **base)[0]["train"]["history"] if "val_loss" in h][:n]
    plots.plot_seed_bands(steps, curves, out_dir / f"turbosparse_val_loss_seed_bands{tag}.png", xlabel="step",
                          ylabel="validation loss (8 sampled batches, nats/byte)",
                          title="validation loss along training (mean ± sd over seeds)")
    _length_figure(runs, base, out_dir / f"turbosparse_val_loss_by_length{tag}.png")


def _length_figure(runs, base, path: Path) -> None:
    """swiglu and drelu along runs of every length (the trainer's sampled validation loss at
    1/4 .. 4/4 of each run), mean and band +- sd over seeds; CPU and GPU runs apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lengths = sorted({(r["steps"], r["train_device"]) for r in runs if r["kind"] == "base"
                      and r["layers"] == base["layers"] and r["lr"] == base["lr"]})
    for i, (st, dev) in enumerate(lengths):
        for a, color in (("swiglu", "C0"), ("drelu", "C3")):
            g = _group(runs, activation=a, kind="base", steps=st, layers=base["layers"], lr=base["lr"], train_device=dev)
            if not g:
                continue
            cs = [_curve(r) for r in g]
            n = min(len(c) for c in cs)
            x = np.array([s_ for s_, _ in cs[0][:n]])
            y = np.array([[v for _, v in c[:n]] for c in cs])
            m, sd = y.mean(0), (y.std(0, ddof=1) if len(g) > 1 else np.zeros(n))
            ls = ["-", "--", ":", "-."][i % 4]
            ax.plot(x, m, ls, marker="o", ms=3, color=color, lw=1.2,
                    label=f"{a}, {st} steps{' (GPU)' if dev == 'cupy' else ''}, {len(g)} seed{'s' if len(g) > 1 else ''}")
            ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (8 sampled batches), nats/byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, frameon=False)
    ax.set_title("swiglu and drelu along runs of each length (mean, band ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args) -> int:
    folder = Path(args.out_json) if args.out_json else (RUNS_JSON if not args.quick else RESULTS / "turbosparse_quick")
    out_dir = folder if args.out_json else RESULTS      # --out-json: read and write there (tests, trials)
    runs = _load_runs(folder)
    if not runs:
        print(f"no analysed runs under {folder}; run `train` and `analyse` first")
        return 1
    sc0 = scale(args)
    steps0, layers0, lr0 = sc0["steps"], args.layers or (2 if args.quick else 4), float(str(args.lr).split(",")[0])
    base = dict(kind="base", steps=steps0, layers=layers0, lr=lr0, train_device="numpy")
    acts = [a for a in ACTS if _group(runs, activation=a, **base)]
    lines, summary = [], {"published": PUBLISHED, "scale": sc0, "tables": {}}
    P = PUBLISHED["turbosparse"]

    # -- table A: every activation, mean +- sd over seeds ---------------------------------
    lines.append(f"### Activations at {steps0} steps, {layers0} layers, lr {lr0:g} (mean ± sd over seeds)\n")
    lines.append("| activation | seeds | val loss (nats/byte) | exact zeros | dead neurons per seed | CETT-0.2 sparsity (val) "
                 "| ppl x at CETT-0.2 | ppl x at top-k 50% | 80% | 85% | 90% | neurons for 80% of non-zeros "
                 "| neurons for 80% of abs(h) |")
    lines.append("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    tabA = {}
    for a in acts:
        g = sorted(_group(runs, activation=a, **base), key=lambda r: r["seed"])
        row = {"seeds": [r["seed"] for r in g],
               "val_loss": t_ci([r["val_loss"] for r in g]),
               "exact_zero": t_ci([r["exact_zero"] for r in g]),
               "dead": [r["dead_neurons"] for r in g],
               "cett_sparsity": t_ci([r["cett02"]["val_sparsity"] for r in g]),
               "cett_ppl_ratio": t_ci([math.exp(r["cett02"]["loss"] - r["val_loss"]) for r in g]),
               "topk_ppl_ratio": {f"{sp:g}": t_ci([_ratio(r, sp) for r in g]) for sp in TOPK[1:]},
               "n80_nonzero": t_ci([r["neurons_for_80pct_nonzeros"] for r in g]),
               "n80_abs": t_ci([r["neurons_for_80pct_abs_mass"] for r in g])}
        tabA[a] = row
        lines.append(f"| {a} | {len(g)} | {_pm(row['val_loss'])} | {_pct(row['exact_zero'])} | "
                     f"{'/'.join(str(d) for d in row['dead'])} of {g[0]['n_neurons']} | {_pct(row['cett_sparsity'])} | "
                     f"{_pm(row['cett_ppl_ratio'], '{:.3f}')} | "
                     + " | ".join(_pm(row["topk_ppl_ratio"][f"{sp:g}"], "{:.3f}") for sp in TOPK[1:])
                     + f" | {_pct(row['n80_nonzero'])} | {_pct(row['n80_abs'])} |")
    summary["tables"]["activations"] = tabA

    # -- table B: paired differences against swiglu --------------------------------------
    lines.append("\n### Paired differences against swiglu (same seed = same initial weights and data order; "
                 "95% t interval over seeds)\n")
    lines.append("| activation | pairs | val loss − swiglu's (nats/byte) | 95% CI | "
                 "ppl x at 90% top-k − swiglu's | 95% CI |")
    lines.append("| --- | ---: | ---: | --- | ---: | --- |")
    sw = {r["seed"]: r for r in _group(runs, activation="swiglu", **base)}
    tabB = {}
    for a in acts:
        if a == "swiglu":
            continue
        g = [r for r in _group(runs, activation=a, **base) if r["seed"] in sw]
        d = t_ci([r["val_loss"] - sw[r["seed"]]["val_loss"] for r in g])
        d90 = t_ci([_ratio(r, 0.9) - _ratio(sw[r["seed"]], 0.9) for r in g])
        tabB[a] = {"val_loss_diff": d, "ratio90_diff": d90,
                   "per_seed_val_loss_diff": {r["seed"]: r["val_loss"] - sw[r["seed"]]["val_loss"] for r in g}}
        ci = lambda st, f: "-" if st["n"] < 2 else f"[{st['ci'][0]:{f}}, {st['ci'][1]:{f}}]"
        lines.append(f"| {a} | {d['n']} | {d['mean']:+.4f} | {ci(d, '+.4f')} | {d90['mean']:+.3f} | {ci(d90, '+.3f')} |")
    summary["tables"]["paired_vs_swiglu"] = tabB
    # the gap along training (sampled validation batches at 1/4 .. 4/4 of the run)
    if "drelu" in acts and sw:
        g = [r for r in _group(runs, activation="drelu", **base) if r["seed"] in sw]
        n = min(min(len(_curve(r)), len(_curve(sw[r["seed"]]))) for r in g)
        steps_at = [s for s, _ in _curve(g[0])][:n]
        gaps = [t_ci([_curve(r)[i][1] - _curve(sw[r["seed"]])[i][1] for r in g]) for i in range(n)]
        lines.append("\nGap along training, drelu − swiglu (validation loss on 8 sampled batches of 16 x 128, the "
                     "trainer's evaluation; mean and 95% t interval over the paired seeds): "
                     + "; ".join(f"step {s}: {st['mean']:+.4f} [{st['ci'][0]:+.4f}, {st['ci'][1]:+.4f}]"
                                 for s, st in zip(steps_at, gaps)))
        summary["tables"]["gap_along_training"] = {str(s): st for s, st in zip(steps_at, gaps)}

    # -- table C: beside TurboSparse's Tables 2 and 3 -------------------------------------
    lines.append("\n### Beside TurboSparse Tables 2 and 3 (perplexity ratios; ours: per byte, theirs: "
                 "WikiText-2 per token, 300M params, 5B tokens)\n")
    lines.append("| | dReLU / SwiGLU perplexity (dense) | SwiGLU ppl x at top-k 50 / 80 / 85 / 90% | "
                 "dReLU ppl x at top-k 50 / 80 / 85 / 90% |")
    lines.append("| --- | --- | --- | --- |")
    pr = P["table3_ppl"]
    lines.append(f"| TurboSparse (published) | {P['table2_wikitext2_ppl']['drelu'] / P['table2_wikitext2_ppl']['swiglu']:.4f} "
                 f"({P['table2_wikitext2_ppl']['drelu']} / {P['table2_wikitext2_ppl']['swiglu']}) | "
                 + " / ".join(f"{v / pr['swiglu'][0]:.3f}" for v in pr["swiglu"][1:]) + " | "
                 + " / ".join(f"{v / pr['drelu'][0]:.3f}" for v in pr["drelu"][1:]) + " |")
    if "drelu" in tabB and "swiglu" in tabA:
        d = tabB["drelu"]["val_loss_diff"]
        ours = (f"{math.exp(d['mean']):.4f} [{math.exp(d['ci'][0]):.4f}, {math.exp(d['ci'][1]):.4f}]"
                if d["n"] > 1 else f"{math.exp(d['mean']):.4f}")
        lines.append(f"| ours, {steps0} steps on the CPU ({d['n']} pairs; dense ratio with 95% CI) | {ours} | "
                     + " / ".join(f"{tabA['swiglu']['topk_ppl_ratio'][f'{sp:g}']['mean']:.3f}" for sp in TOPK[1:]) + " | "
                     + " / ".join(f"{tabA['drelu']['topk_ppl_ratio'][f'{sp:g}']['mean']:.3f}" for sp in TOPK[1:]) + " |")
    # the same row for the longer runs (each length and device with swiglu/drelu pairs)
    tabC_long = {}
    for st, dev in sorted({(r["steps"], r["train_device"]) for r in runs if r["kind"] == "base"
                           and r["layers"] == layers0 and r["lr"] == lr0 and r["steps"] != steps0}):
        g = {a: _group(runs, activation=a, kind="base", steps=st, layers=layers0, lr=lr0, train_device=dev)
             for a in ("swiglu", "drelu")}
        sw_ = {r["seed"]: r for r in g["swiglu"]}
        pairs = [(r, sw_[r["seed"]]) for r in g["drelu"] if r["seed"] in sw_]
        if not pairs:
            continue
        d = t_ci([x["val_loss"] - y["val_loss"] for x, y in pairs])
        ratios = {a: [t_ci([_ratio(r, sp) for r in g[a]])["mean"] for sp in TOPK[1:]] for a in g}
        tabC_long[f"st{st}_{dev}"] = {"dense_ratio": d, "topk_swiglu": ratios["swiglu"], "topk_drelu": ratios["drelu"],
                                      "n_swiglu": len(g["swiglu"]), "n_drelu": len(g["drelu"])}
        ours = (f"{math.exp(d['mean']):.4f} [{math.exp(d['ci'][0]):.4f}, {math.exp(d['ci'][1]):.4f}]"
                if d["n"] > 1 else f"{math.exp(d['mean']):.4f}")
        lines.append(f"| ours, {st} steps on the {_devname(dev)} ({d['n']} pairs; {len(g['swiglu'])} swiglu / "
                     f"{len(g['drelu'])} drelu seeds) | {ours} | " + " / ".join(f"{v:.3f}" for v in ratios["swiglu"])
                     + " | " + " / ".join(f"{v:.3f}" for v in ratios["drelu"]) + " |")
    summary["tables"]["beside_table3_longer"] = tabC_long

    # -- table D: depth ------------------------------------------------------------------
    depth_rows = {}
    for L in sorted({r["layers"] for r in runs if r["kind"] == "base" and r["steps"] == steps0 and r["lr"] == lr0}):
        for a in ("swiglu", "drelu"):
            g = _group(runs, activation=a, kind="base", steps=steps0, layers=L, lr=lr0, train_device="numpy")
            if g:
                depth_rows[(L, a)] = {"val_loss": t_ci([r["val_loss"] for r in g]),
                                      "ratio90": t_ci([_ratio(r, 0.9) for r in g]),
                                      "ratio80": t_ci([_ratio(r, 0.8) for r in g]),
                                      "exact_zero": t_ci([r["exact_zero"] for r in g]),
                                      "params": g[0]["params"], "seeds": sorted(r["seed"] for r in g)}
        sw_, dr_ = (_group(runs, activation=a, kind="base", steps=steps0, layers=L, lr=lr0, train_device="numpy")
                    for a in ("swiglu", "drelu"))
        if (L, "drelu") in depth_rows and (L, "swiglu") in depth_rows:
            depth_rows[(L, "drelu")]["paired_val_loss_diff"] = _paired(dr_, sw_, "val_loss")
    if len({L for L, _ in depth_rows}) > 1:
        lines.append(f"\n### Depth ({steps0} steps; TurboSparse's SwiGLU: 24 layers, ppl x3.95 at 90%)\n")
        lines.append("| layers | activation | params | seeds | val loss | drelu − swiglu (paired, 95% CI) | exact zeros "
                     "| ppl x at top-k 80% | 90% |")
        lines.append("| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
        for (L, a), v in sorted(depth_rows.items()):
            pd = _fmt_ci(v["paired_val_loss_diff"]) if "paired_val_loss_diff" in v else ""
            lines.append(f"| {L} | {a} | {v['params']:,} | {v['val_loss']['n']} | {_pm(v['val_loss'])} | {pd} | "
                         f"{_pct(v['exact_zero'])} | {_pm(v['ratio80'], '{:.3f}')} | {_pm(v['ratio90'], '{:.3f}')} |")
    summary["tables"]["depth"] = {f"L{L}_{a}": v for (L, a), v in depth_rows.items()}

    # -- table E: training length, the paired gap at the end and along the run -------------
    long_rows, gap_rows = {}, {}
    lengths = sorted({(r["steps"], r["train_device"]) for r in runs
                      if r["kind"] == "base" and r["layers"] == layers0 and r["lr"] == lr0})
    for st, dev in lengths:
        grp = {a: _group(runs, activation=a, kind="base", steps=st, layers=layers0, lr=lr0, train_device=dev)
               for a in ("swiglu", "drelu")}
        for a, g in grp.items():
            if g:
                long_rows[(st, dev, a)] = {
                    "val_loss": t_ci([r["val_loss"] for r in g]), "ratio90": t_ci([_ratio(r, 0.9) for r in g]),
                    "exact_zero": t_ci([r["exact_zero"] for r in g]), "seeds": sorted(r["seed"] for r in g),
                    "curve": {r["seed"]: _curve(r) for r in g}}
        if grp["swiglu"] and grp["drelu"]:
            sw = {r["seed"]: r for r in grp["swiglu"]}
            pairs = [(r, sw[r["seed"]]) for r in grp["drelu"] if r["seed"] in sw]
            if pairs:
                n = min(min(len(_curve(x)), len(_curve(y))) for x, y in pairs)
                gap_rows[(st, dev)] = {
                    "val_loss_diff": t_ci([x["val_loss"] - y["val_loss"] for x, y in pairs]),
                    "ratio90_diff": t_ci([_ratio(x, 0.9) - _ratio(y, 0.9) for x, y in pairs]),
                    "steps_at": [s for s, _ in _curve(pairs[0][0])][:n],
                    "gap_along": [t_ci([_curve(x)[i][1] - _curve(y)[i][1] for x, y in pairs]) for i in range(n)],
                    "swiglu_along": [t_ci([_curve(y)[i][1] for _, y in pairs]) for i in range(n)],
                    "drelu_along": [t_ci([_curve(x)[i][1] for x, _ in pairs]) for i in range(n)]}
    if len(lengths) > 1:
        lines.append(f"\n### Training length ({layers0} layers, lr {lr0:g}; val loss on the whole split at the end)\n")
        lines.append("| steps | tokens | trained on | activation | seeds | val loss | exact zeros | ppl x at top-k 90% |")
        lines.append("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
        for (st, dev, a), v in sorted(long_rows.items()):
            lines.append(f"| {st} | {st * sc0['batch_size'] * sc0['seq_len'] / 1e6:.1f}M | {_devname(dev)} | {a} | "
                         f"{v['val_loss']['n']} | {_pm(v['val_loss'])} | {_pct(v['exact_zero'])} | "
                         f"{_pm(v['ratio90'], '{:.3f}')} |")
        lines.append("\nPaired drelu − swiglu at each length: at the end on the whole validation split, and along "
                     "the run on the trainer's 8 sampled validation batches (mean [95% t interval] over seeds):\n")
        lines.append("| steps | trained on | pairs | val loss diff (end) | ppl x at 90% top-k diff | "
                     "gap at 1/4, 2/4, 3/4, 4/4 of the run |")
        lines.append("| ---: | --- | ---: | --- | --- | --- |")
        for (st, dev), v in sorted(gap_rows.items()):
            along = "; ".join(f"{s}: {_fmt_ci(g)}" for s, g in zip(v["steps_at"], v["gap_along"]))
            lines.append(f"| {st} | {_devname(dev)} | {v['val_loss_diff']['n']} | {_fmt_ci(v['val_loss_diff'])} | "
                         f"{_fmt_ci(v['ratio90_diff'], '+.3f')} | {along} |")
    summary["tables"]["length"] = {f"st{st}_{dev}_{a}": {k: v[k] for k in ("val_loss", "ratio90", "exact_zero",
                                                                           "curve", "seeds")}
                                   for (st, dev, a), v in long_rows.items()}
    summary["tables"]["length_paired"] = {f"st{st}_{dev}": v for (st, dev), v in gap_rows.items()}

    # -- table H: learning-rate sweep -----------------------------------------------------
    lr_groups = {}
    for a in ACTS:
        for lr in sorted({r["lr"] for r in runs if r["kind"] == "base" and r["steps"] == steps0
                          and r["layers"] == layers0 and r["activation"] == a and r["train_device"] == "numpy"}):
            lr_groups[(a, lr)] = _group(runs, activation=a, kind="base", steps=steps0, layers=layers0, lr=lr,
                                        train_device="numpy")
    lrs_all = sorted({lr for _, lr in lr_groups})
    lr_sum = {"rows": {}, "vs_lr0": {}, "drelu_minus_swiglu": {}}
    if len(lrs_all) > 1:
        lines.append(f"\n### Learning rate ({steps0} steps, {layers0} layers; val loss on the whole split, "
                     "mean ± sd (seeds); Δ: paired difference from the same activation and seed at "
                     f"lr {lr0:g})\n")
        lines.append("| activation | " + " | ".join(f"lr {lr:g}" for lr in lrs_all) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in lrs_all) + " |")
        for a in ACTS:
            have = {lr: g for (b_, lr), g in lr_groups.items() if b_ == a}
            if len(have) < 2:
                continue
            cells = []
            for lr in lrs_all:
                g = have.get(lr)
                if not g:
                    cells.append("-")
                    continue
                st = t_ci([r["val_loss"] for r in g])
                lr_sum["rows"][f"{a}_lr{lr:g}"] = {"val_loss": st, "seeds": sorted(r["seed"] for r in g)}
                cell = f"{st['mean']:.4f}" + (f" ± {st['sd']:.4f}" if st["n"] > 1 else "") + f" (n={st['n']})"
                if lr != lr0 and lr0 in have:
                    d = _paired(g, have[lr0], "val_loss")
                    lr_sum["vs_lr0"][f"{a}_lr{lr:g}"] = d
                    cell += f"; Δ {_fmt_ci(d)}"
                cells.append(cell)
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        dd = []
        for lr in lrs_all:
            if ("swiglu", lr) in lr_groups and ("drelu", lr) in lr_groups:
                d = _paired(lr_groups[("drelu", lr)], lr_groups[("swiglu", lr)], "val_loss")
                lr_sum["drelu_minus_swiglu"][f"{lr:g}"] = d
                dd.append(f"lr {lr:g}: {_fmt_ci(d)}")
        if dd:
            lines.append("\ndrelu − swiglu at each learning rate (paired by seed): " + "; ".join(dd) + ".")
    summary["tables"]["lr_sweep"] = lr_sum

    # -- table F: ReLUfication at equal budget --------------------------------------------
    rsteps = steps0 // 2
    relu_rows = {}
    wants = (("swiglu (from scratch)", dict(activation="swiglu", kind="base", steps=steps0 + rsteps)),
             ("swiglu -> reglu", dict(activation="swiglu->reglu", kind="relufied", steps=steps0)),
             ("swiglu -> drelu", dict(activation="swiglu->drelu", kind="relufied", steps=steps0)))
    groups = {name: sorted(_group(runs, layers=layers0, lr=lr0, train_device="numpy", **want), key=lambda r: r["seed"])
              for name, want in wants}
    for name, g in groups.items():
        if g:
            relu_rows[name] = {"seeds": [r["seed"] for r in g], "val_loss": t_ci([r["val_loss"] for r in g]),
                               "exact_zero": t_ci([r["exact_zero"] for r in g]),
                               "dead": [r["dead_neurons"] for r in g], "ratio90": t_ci([_ratio(r, 0.9) for r in g]),
                               "per_seed_val_loss": {r["seed"]: r["val_loss"] for r in g}}
            if name != "swiglu (from scratch)" and groups["swiglu (from scratch)"]:
                relu_rows[name]["paired_vs_scratch"] = _paired(g, groups["swiglu (from scratch)"], "val_loss")
    if relu_rows:
        lines.append(f"\n### ReLUfication at equal budget ({steps0 + rsteps} steps in all: {steps0} swiglu + "
                     f"{rsteps} after the swap, or {steps0 + rsteps} swiglu from scratch)\n")
        lines.append("| model | seeds | val loss | − swiglu from scratch (paired, 95% CI) | exact zeros | "
                     "dead neurons per seed | ppl x at top-k 90% |")
        lines.append("| --- | ---: | ---: | --- | ---: | --- | ---: |")
        for name, v in relu_rows.items():
            pd = _fmt_ci(v["paired_vs_scratch"]) if "paired_vs_scratch" in v else ""
            lines.append(f"| {name} | {len(v['seeds'])} | {_pm(v['val_loss'])} | {pd} | {_pct(v['exact_zero'])} | "
                         f"{'/'.join(map(str, v['dead']))} | {_pm(v['ratio90'], '{:.3f}')} |")
    summary["tables"]["relufication"] = relu_rows

    # -- table G: predictors and the power law in the papers' terms -----------------------
    pred_rows = {}
    for a in [x for x in ACTS if x not in ("swiglu", "geglu")] + ["swiglu->reglu", "swiglu->drelu"]:
        want = dict(base) if "->" not in a else dict(kind="relufied", steps=steps0, layers=layers0, lr=lr0)
        want["activation"] = a
        g = [r for r in _group(runs, **want) if "predictor" in r]
        for crit in (1.01, 1.001):
            pts = [p for p in (_best_predictor_point(r, crit) for r in g) if p is not None]
            if pts:
                pred_rows[f"{a} @ {crit}"] = {
                    "model": a, "max_ppl_ratio": crit, "n": len(pts), "val_recall": t_ci([p["val_recall"] for p in pts]),
                    "predicted_sparsity": t_ci([p["predicted_sparsity"] for p in pts]),
                    "true_sparsity": t_ci([p["true_sparsity"] for p in pts]),
                    "ppl_ratio": t_ci([p["ppl_ratio"] for p in pts])}
    if pred_rows:
        pp = PUBLISHED["prosparse"]
        lines.append("\n### Activation predictors at a fixed loss change (the sparsest setting whose perplexity "
                     "ratio stays <= 1.01, or <= 1.001, on 32k validation tokens; rank-32 predictors fitted on "
                     "training text, threshold tuned for a target recall on held-out training text)\n")
        lines.append("| model | max ppl x | seeds | recall | predicted sparsity | true exact-zero share | ppl x |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        lines.append(f"| ProSparse-7B (published) | - | - | {pp['predictor_recall']:.2%} | "
                     f"{pp['predictor_predicted_sparsity']:.2%} | {pp['exact_zero']['ProSparse-7B']:.2%} | - |")
        for v in pred_rows.values():
            lines.append(f"| {v['model']} | {v['max_ppl_ratio']} | {v['n']} | {_pct(v['val_recall'])} | "
                         f"{_pct(v['predicted_sparsity'])} | {_pct(v['true_sparsity'])} | {_pm(v['ppl_ratio'], '{:.4f}')} |")
    summary["tables"]["predictors"] = pred_rows
    pw = PUBLISHED["powerinfer"]["neurons_for_80pct_of_activations"]
    lines.append("\nPowerInfer (published): " + ", ".join(f"{k} {v:.0%}" for k, v in pw.items())
                 + " of neurons cover 80% of activations; ours: the `neurons for 80% of non-zeros` column above "
                   "(SwiGLU/GeGLU never output zeros, so they need ~80% by construction; `abs(h)` weighs each "
                   "neuron by its summed magnitude instead).")

    text = "\n".join(lines)
    print(text)
    try:
        _figures(runs, base, acts, tag="_quick" if args.quick else "", out_dir=out_dir)
    except ImportError as e:                      # matplotlib missing: tables only
        print(f"(no figures: {e})")
    tag = "_quick" if args.quick else ""
    (out_dir / f"reproduce_turbosparse_tables{tag}.md").write_text(text + "\n")
    summary["runs"] = sorted(r["key"] for r in runs)
    summary["machine"], summary["date"] = machine(), time.strftime("%Y-%m-%d %H:%M:%S")
    (out_dir / f"reproduce_turbosparse_summary{tag}.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"\nwrote {out_dir / f'reproduce_turbosparse_tables{tag}.md'} and the summary JSON")
    return 0


# ------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    sc = scale(args)
    corpus = _corpus(sc)
    root = Path(args.ckpt_root)
    layers = args.layers or (2 if args.quick else 4)
    lrs = [float(x) for x in str(args.lr).split(",")]
    print(f"corpus: {corpus}; scale {sc}; layers {layers}; lrs {lrs}", flush=True)
    for seed in parse_seeds(args.seeds):
        for lr in lrs:
            for act in [a.strip() for a in args.models.split(",") if a.strip()]:
                train_base(act, seed, sc, lr, layers, corpus, root, force=args.force, device=args.device)
            if args.relufy:
                train_relufied(seed, sc, lr, layers, corpus, root, args.relufy_lr, force=args.force,
                               equal_budget=not args.no_equal_budget,
                               targets=[t.strip() for t in args.relufy_to.split(",") if t.strip()])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=("train", "analyse", "report", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="nano models, few steps (~1 minute in total)")
    ap.add_argument("--preset", default=None, help="model size preset (default: tiny; --quick: nano)")
    ap.add_argument("--steps-mult", type=float, default=1.0,
                    help="multiply the training steps (default 800; --quick 150) by this")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps of the base runs (overrides --steps-mult; default 800, --quick 150)")
    ap.add_argument("--device", default="numpy", choices=("numpy", "cupy"),
                    help="train: where the from-scratch runs train (cupy: on the GPU; keys get _gpu; "
                         "analysis stays on the CPU)")
    ap.add_argument("--layers", type=int, default=None, help="depth (default: the preset's 4; --quick 2)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--lr", default="3e-3", help="peak learning rate(s), comma-separated for a sweep")
    ap.add_argument("--relufy", action="store_true",
                    help="also ReLUfy each seed's swiglu (+steps/2) and train an equal-budget swiglu")
    ap.add_argument("--no-equal-budget", action="store_true",
                    help="with --relufy: skip the from-scratch swiglu of equal length (train it as a separate "
                         "job with --steps-mult 1.5)")
    ap.add_argument("--relufy-to", default="reglu,drelu",
                    help="with --relufy: the activations to ReLUfy to (comma-separated; default reglu,drelu)")
    ap.add_argument("--relufy-lr", type=float, default=1e-3, help="peak learning rate of the ReLUfication runs")
    ap.add_argument("--models", default="swiglu,drelu", help="comma-separated activations to train")
    ap.add_argument("--seeds", default="0", help="seeds, e.g. 0-4 or 0,2,5 (paired across activations)")
    ap.add_argument("--force", action="store_true", help="retrain / re-analyse runs that already exist")
    ap.add_argument("--ckpt-root", default=str(CKPT_ROOT), help="where checkpoints go (default runs/turbosparse)")
    ap.add_argument("--runs", default="*", help="analyse: glob over run keys (default all)")
    ap.add_argument("--out-json", default=None,
                    help="analyse: write the per-run JSONs here (default bench/results/turbosparse); report: "
                         "read them from here and write the tables and summary here too")
    ap.add_argument("--max-windows", type=int, default=0,
                    help="analyse: evaluate at most this many validation windows (0 = the whole split)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ckpt_root = str(Path(args.ckpt_root).with_name(Path(args.ckpt_root).name + "_quick"))
    if args.command in ("train", "all"):
        cmd_train(args)
    if args.command in ("analyse", "all"):
        cmd_analyse(args)
    if args.command in ("report", "all"):
        cmd_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
