"""Draw the site's figures (committed as PNG under docs/assets/).

    python docs/scripts/make_figures.py

* ``neuron_skipping.png`` (Home page): a gated FFN whose intermediate activation has
  exact zeros; the kernels read only the rows of W_up and W_down of the active neurons,
  and the ideal speed-up of batch-1 decoding as a function of the active fraction.
* ``activations.png`` (Concepts): ReLU, GELU, SiLU and squared ReLU near zero.

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


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    neuron_skipping(OUT / "neuron_skipping.png")
    activations(OUT / "activations.png")
    print("wrote", sorted(p.name for p in OUT.glob("*.png")))


if __name__ == "__main__":
    main()
