"""Draw the site's figures (committed as PNG under docs/assets/).

    python docs/scripts/make_figures.py

* ``neuron_skipping.png`` (Home page): a gated FFN whose intermediate activation has
  exact zeros; the kernels read only the rows of W_up and W_down of the active neurons,
  and the ideal speed-up of batch-1 decoding as a function of the active fraction.
* ``activations.png`` (Concepts): ReLU, GELU, SiLU and squared ReLU near zero.

From the benchmark results in ``bench/results/`` (the Benchmarks page):

* ``bench_loss_curves.png``: the small-scale TurboSparse reproduction (the per-run JSONs in
  ``turbosparse/`` and ``reproduce_turbosparse_summary.json``): training loss per activation
  with seed bands, and swiglu/drelu validation loss along runs of each length;
* ``bench_sparsity_per_layer.png``: exact zeros of the FFN activation per layer, mean and sd
  over seeds, per activation and ReLUfied model;
* ``bench_speedup_cpu.png``: FFN speed-up over dense BLAS against sparsity, Numba kernels,
  with the ideal curves (``ffn_sparse_cpu_quiet.json``);
* ``bench_speedup_gpu.png``: the same for the CuPy kernels over cuBLAS on an H200
  (``ffn_sparse_gpu_run2.json``).

Deterministic (fixed seeds); needs matplotlib (the ``plot`` extra).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import minisparse as ms  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "assets"
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def ideal_dense_gate(a):
    """Gate read densely (F*D), up and down only for active neurons: 3 / (1 + 2a)."""
    return 3.0 / (1.0 + 2.0 * a)


def ideal_predictor(a, p):
    """A predictor of cost p (in units of one F*D matrix) picks the neurons: 3 / (3a + p)."""
    return 3.0 / (3.0 * a + p)


def neuron_skipping(path: Path) -> None:
    rng = np.random.default_rng(3)
    F, D = 24, 10
    g = rng.normal(size=F)
    u = rng.normal(size=F)
    h = ms.get_activation("drelu").forward(g, u)                      # (F,)
    active = h != 0

    fig = plt.figure(figsize=(11, 4.2))
    ax = fig.add_axes([0.02, 0.08, 0.52, 0.8])
    ax.set_xlim(-1, 3 * (D + 2) + 4)
    ax.set_ylim(-1.5, F + 1)
    ax.invert_yaxis()
    ax.axis("off")
    titles = ["$W_{gate}$ (F, D)\nread for every neuron", "$W_{up}$ (F, D)\nactive rows only",
              "$W_{down}$ (F, D)\nactive rows only"]
    for m in range(3):
        x0 = m * (D + 2) + (3 if m else 0)
        for f in range(F):
            on = True if m == 0 else bool(active[f])
            ax.add_patch(plt.Rectangle((x0, f), D, 0.85, color="C0" if on else "0.88", lw=0))
        ax.text(x0 + D / 2, -0.4, titles[m], ha="center", va="bottom", fontsize=9)
        if m == 0:
            hx = x0 + D + 0.9
            for f in range(F):
                ax.add_patch(plt.Rectangle((hx, f), 1.3, 0.85, color="C3" if active[f] else "white",
                                           ec="0.5", lw=0.5))
            ax.text(hx + 0.65, -0.4, "h", ha="center", va="bottom", fontsize=10)
    ax.text(0, F + 1.0, f"dReLU: h = relu(g)·relu(u) is exactly 0 for {np.mean(~active):.0%} of the neurons "
            "here; their rows are never read", fontsize=9, va="top")

    ax2 = fig.add_axes([0.62, 0.16, 0.35, 0.72])
    a = np.linspace(0.02, 1.0, 200)
    ax2.plot(a, ideal_dense_gate(a), label="dense gate: 3 / (1 + 2a)")
    for p, ls in ((0.1, "--"), (0.02, ":")):
        ax2.plot(a, ideal_predictor(a, p), ls, label=f"predictor: 3 / (3a + p), p = {p}")
    ax2.axvline(0.1, color="0.6", lw=0.8)
    ax2.annotate(f"a = 0.1: {ideal_dense_gate(0.1):.1f}x", (0.1, ideal_dense_gate(0.1)),
                 xytext=(0.3, 5), arrowprops=dict(arrowstyle="->", color="0.4"), fontsize=9)
    ax2.set_yscale("log")
    ax2.set_ylim(0.9, 40)
    ax2.set_yticks([1, 2, 3, 5, 10, 20])
    ax2.set_yticklabels(["1x", "2x", "3x", "5x", "10x", "20x"])
    ax2.set_xlabel("fraction of active neurons a")
    ax2.set_ylabel("ideal FFN speed-up, batch-1 decoding")
    ax2.set_title("bytes read decide the time", fontsize=10)
    ax2.legend(fontsize=8, frameon=False)
    ax2.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def activations(path: Path) -> None:
    x = np.linspace(-4, 3, 701)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in ("relu", "gelu", "silu", "relu2"):
        y = ms.get_activation(name).forward(x)
        axes[0].plot(x, np.clip(y, -1, 3), label=name)
    axes[0].axhline(0, color="0.5", lw=0.6)
    axes[0].set_ylim(-0.6, 3)
    axes[0].set_title("activation functions")
    axes[0].legend(frameon=False)
    xs = -np.logspace(-2, 2, 400)
    for name in ("gelu", "silu"):
        axes[1].loglog(-xs, np.abs(ms.get_activation(name).forward(xs)), label=f"|{name}(x)|")
    axes[1].set_xlabel("-x (x negative)")
    axes[1].set_title("x < 0: SiLU and GELU are small, not 0 (ReLU is exactly 0)\n"
                      "GELU rounds to 0 only below x = -8.4 (float64), -5.5 (float32)", fontsize=9)
    axes[1].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# benchmark figures, from bench/results/*.json
# --------------------------------------------------------------------------------------
def _load(name: str):
    import json
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


TURBO_ORDER = ["swiglu", "geglu", "reglu", "drelu", "swiglu->reglu", "swiglu->drelu"]
TURBO_STYLE = {"swiglu": ("C0", "-"), "geglu": ("C1", "-"), "reglu": ("C2", "-"), "drelu": ("C3", "-"),
               "swiglu->reglu": ("C2", "--"), "swiglu->drelu": ("C3", "--")}


def _turbo_runs():
    """The per-run JSONs of the reproduction (bench/results/turbosparse/), keyed by key."""
    import json
    folder = RESULTS / "turbosparse"
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    for r in runs:
        r.setdefault("train_device", "numpy")
    return runs


def _turbo_group(runs, **want):
    return sorted([r for r in runs if all(r.get(k) == v for k, v in want.items())], key=lambda r: r["seed"])


def bench_loss_curves(path: Path, summary: dict, runs: list) -> None:
    """Left: training loss (moving average) of each activation at the base length, mean and
    seed band. Right: swiglu and drelu along longer runs (the trainer's sampled validation
    loss at 1/4 .. 4/4 of each run), mean and seed band, per length."""
    sc = summary["scale"]
    base = dict(kind="base", steps=sc["steps"], layers=4, lr=3e-3, train_device="numpy")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    k = 25
    lo = np.inf
    for name in [n for n in TURBO_ORDER if "->" not in n] + ["relu"]:
        g = _turbo_group(runs, activation=name, **base)
        if not g:
            continue
        curves = np.array([[h["loss"] for h in r["train"]["history"]] for r in g])      # (seeds, steps)
        smooth = np.array([np.convolve(c, np.ones(k) / k, mode="valid") for c in curves])
        steps = np.arange(1, curves.shape[1] + 1)[k - 1:]
        m, sd = smooth.mean(0), smooth.std(0, ddof=1) if len(g) > 1 else np.zeros(smooth.shape[1])
        color = TURBO_STYLE.get(name, ("C4", "-"))[0]
        val = np.array([r["val_loss"] for r in g])
        ax.plot(steps, m, color=color, lw=1.3,
                label=f"{name}: val {val.mean():.3f}" + (f" ± {val.std(ddof=1):.3f}" if len(g) > 1 else "")
                + f" ({len(g)} seed{'s' if len(g) > 1 else ''})")
        ax.fill_between(steps, m - sd, m + sd, color=color, alpha=0.2, lw=0)
        lo = min(lo, m.min())
    ax.set_ylim(lo - 0.05, lo + 1.0)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss, nats/byte (moving average of 25)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, frameon=False)
    ax.set_title(f"Activations: preset {sc['preset']}, {sc['steps']} steps of {sc['batch_size']}x{sc['seq_len']} "
                 "bytes (mean, band ± sd over seeds)", fontsize=8.5)
    styles = {}
    lengths = sorted({(r["steps"], r["train_device"]) for r in runs if r["kind"] == "base" and r["layers"] == 4
                      and r["lr"] == 3e-3})
    for i, (st, dev) in enumerate(lengths):
        for name in ("swiglu", "drelu"):
            g = _turbo_group(runs, activation=name, kind="base", steps=st, layers=4, lr=3e-3, train_device=dev)
            if not g:
                continue
            pts = [[(h["step"] + 1, h["val_loss"]) for h in r["train"]["history"] if "val_loss" in h] for r in g]
            n = min(len(p) for p in pts)
            x = np.array([s for s, _ in pts[0][:n]])
            y = np.array([[v for _, v in p[:n]] for p in pts])
            m, sd = y.mean(0), (y.std(0, ddof=1) if len(g) > 1 else np.zeros(n))
            color = TURBO_STYLE[name][0]
            ls = ["-", "--", ":", "-."][i % 4]
            styles[(st, dev)] = ls
            ax2.plot(x, m, ls, marker="o", ms=3, color=color, lw=1.2,
                     label=f"{name}, {st} steps{' (GPU)' if dev == 'cupy' else ''}, {len(g)} seed{'s' if len(g) > 1 else ''}")
            ax2.fill_between(x, m - sd, m + sd, color=color, alpha=0.15, lw=0)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("validation loss (8 sampled batches), nats/byte")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7.5, frameon=False)
    ax2.set_title("swiglu and drelu along runs of each length (cosine schedule per run)", fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_sparsity_per_layer(path: Path, summary: dict, runs: list) -> None:
    sc = summary["scale"]
    groups = {}
    for name in TURBO_ORDER + ["relu"]:
        kind = "relufied" if "->" in name else "base"
        g = _turbo_group(runs, activation=name, kind=kind, steps=sc["steps"], layers=4, lr=3e-3, train_device="numpy")
        if g:
            groups[name] = g
    names = list(groups)
    n_layers = len(groups[names[0]][0]["exact_zero_per_layer"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        z = np.array([r["exact_zero_per_layer"] for r in groups[name]])           # (seeds, layers)
        color, ls = TURBO_STYLE.get(name, ("C4", "-"))
        overall = np.array([r["exact_zero"] for r in groups[name]])
        ax.bar(np.arange(n_layers) + (j - (len(names) - 1) / 2) * width, 100 * z.mean(0), width,
               yerr=100 * z.std(0, ddof=1) if len(z) > 1 else None, color=color, ecolor="0.3",
               hatch="//" if ls == "--" else None, edgecolor="white", lw=0.5,
               label=f"{name} ({100 * overall.mean():.1f}%, {len(z)} seed{'s' if len(z) > 1 else ''})")
    ax.set_xticks(np.arange(n_layers))
    ax.set_xticklabels([f"layer {i}" for i in range(n_layers)])
    ax.set_ylabel("FFN activations exactly 0 (%)")
    ax.set_ylim(0, 128)
    ax.set_yticks([0, 20, 40, 60, 80, 100])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, frameon=False, ncol=3, loc="upper left")
    ax.set_title("Exact zeros of h per layer on the whole validation split (mean ± sd over seeds; "
                 "SwiGLU and GEGLU: none)", fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speedup_panel(ax, rows, methods, title):
    """Speed-up over dense against sparsity for each method, with its ideal curve."""
    for (method, label, color, with_ideal) in methods:
        first = {}                                    # one point per sparsity (the sweep's own row)
        for r in rows:
            if r["method"] == method:
                first.setdefault(r["sparsity"], (r["sparsity"], r["speedup"], r["ideal"]))
        pts = sorted(first.values())
        if not pts:
            continue
        s, sp, ideal = map(np.array, zip(*pts))
        ax.plot(100 * s, sp, "o-", color=color, label=label, ms=4)
        if with_ideal:
            ax.plot(100 * s, ideal, ":", color=color, lw=1.4)
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylim(0.04, 130)
    ax.set_yticks([0.05, 0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 50, 100])
    ax.set_yticklabels(["0.05x", "0.1x", "0.2x", "0.5x", "1x", "2x", "3x", "5x", "10x", "20x", "50x", "100x"])
    ax.set_xlabel("sparsity: neurons whose h is 0 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def bench_speedup_cpu(path: Path, data: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    methods = [("numba skip", "numba, gate dense (ideal 3/(1+2a))", "C0", True),
               ("numba given active", "numba, active set given (ideal 1/a)", "C1", True),
               ("numpy skip (ref)", "NumPy reference skip (same ideal as gate dense)", "0.6", False)]
    for ax, (D, F) in zip(axes, [(4096, 14336), (512, 1536)]):
        rows = [r for r in data["cpu"] if r["tokens"] == 1 and r["dim"] == D and r["ffn_dim"] == F]
        _speedup_panel(ax, rows, methods, f"D={D}, F={F}, batch 1, float32")
    axes[0].set_ylabel("speed-up over dense NumPy/BLAS\n(dotted: ideal, bytes read)")
    axes[0].legend(fontsize=8, frameon=False)
    m = data.get("machine", {})
    fig.suptitle(f"CPU FFN kernels: {m.get('cpus', '?')}-core x86-64 VM, NumPy {m.get('numpy', '?')} "
                 "(bench/results/ffn_sparse_cpu_quiet.json)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_speedup_gpu(path: Path, data: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    methods = [("cupy skip [graph]", "skip, gate dense, CUDA graph (ideal 3/(1+2a))", "C0", True),
               ("cupy given active [graph]", "active set given, CUDA graph (ideal 1/a)", "C1", True),
               ("cupy skip", "skip, gate dense, eager launches (same ideal)", "C2", False)]
    for ax, dtype in zip(axes, ["float16", "float32"]):
        rows = [r for r in data["gpu"] if r["dtype"] == dtype and r["dim"] == 4096 and r["tokens"] == 1]
        _speedup_panel(ax, rows, methods, f"Mistral-7B FFN layer D=4096, F=14336, batch 1, {dtype}")
    axes[0].set_ylabel("speed-up over dense cuBLAS\n(dotted: ideal, bytes read)")
    axes[0].legend(fontsize=8, frameon=False)
    info = data.get("gpu_info", {})
    fig.suptitle(f"GPU FFN kernels: one {info.get('gpu', 'GPU')}, CuPy "
                 "(bench/results/ffn_sparse_gpu_run2.json)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_figures() -> None:
    summary, runs = _load("reproduce_turbosparse_summary.json"), _turbo_runs()
    if summary and runs:
        bench_loss_curves(OUT / "bench_loss_curves.png", summary, runs)
        bench_sparsity_per_layer(OUT / "bench_sparsity_per_layer.png", summary, runs)
    cpu = _load("ffn_sparse_cpu_quiet.json")
    if cpu:
        bench_speedup_cpu(OUT / "bench_speedup_cpu.png", cpu)
    gpu = _load("ffn_sparse_gpu_run2.json")
    if gpu:
        bench_speedup_gpu(OUT / "bench_speedup_gpu.png", gpu)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    neuron_skipping(OUT / "neuron_skipping.png")
    activations(OUT / "activations.png")
    bench_figures()
    print("wrote", sorted(p.name for p in OUT.glob("*.png")))


if __name__ == "__main__":
    main()
