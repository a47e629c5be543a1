"""Routing statistics of a Mixture-of-Experts model while it trains (``minisparse train --experts``).

At each evaluation step :class:`RoutingMonitor` runs the model on a fixed validation batch
(:func:`minisparse.stats.moe_stats`) and prints, per MoE layer, the share of routed tokens
each expert received, the busiest/idlest ratio (1 is perfect balance; an expert that got
nothing makes it infinite) and the router entropy (nats, with its maximum ln E). The
records go to ``routing.jsonl`` and, at the end, to the plot ``routing.png`` in the run folder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import numpy as np


class RoutingMonitor:
    """A ``train`` callback: routing statistics at every evaluation record.

    Parameters
    ----------
    model : Transformer with MoE layers
    corpus : Corpus (its validation split gives the fixed batch)
    seq_len : int
    out_dir : folder for ``routing.jsonl`` and ``routing.png`` (None: print only)
    batch_size : int
        Sequences in the fixed batch (B, T) = (batch_size, seq_len).
    """

    def __init__(self, model, corpus, seq_len: int, out_dir=None, batch_size: int = 4, out=print):
        self.model, self.out = model, out
        rng = np.random.default_rng(4321)
        self.tokens, _ = corpus.get_batch("val" if len(corpus.val) > seq_len else "train", batch_size, seq_len, rng)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.history: List[dict] = []

    def __call__(self, step: int, rec: dict) -> None:
        if "val_loss" not in rec:
            return
        from ..stats import moe_stats
        stats = moe_stats(self.model, self.tokens)
        layers = []
        for L in stats["layers"]:
            if not L["moe"]:
                continue
            tpe = np.asarray(L["tokens_per_expert"], dtype=np.float64)
            share = (tpe / max(tpe.sum(), 1)).tolist()
            ratio = float(tpe.max() / tpe.min()) if tpe.min() > 0 else float("inf")
            layers.append({"layer": L["layer"], "load": share, "busiest_idlest": ratio,
                           "router_entropy": float(L["router_entropy"])})
        entry = {"step": step + 1, "layers": layers}
        self.history.append(entry)
        self._print(entry)
        if self.out_dir is not None:
            with open(self.out_dir / "routing.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _print(self, entry: dict) -> None:
        n_exp = self.model.config.n_experts
        self.out(f"routing at step {entry['step']} (share of routed tokens per expert; ideal {1 / n_exp:.3f}; "
                 f"entropy max ln {n_exp} = {math.log(n_exp):.3f}):")
        for L in entry["layers"]:
            loads = " ".join(f"{x:.3f}" for x in L["load"])
            self.out(f"  layer {L['layer']:>2}: load [{loads}]  busiest/idlest {L['busiest_idlest']:.2f}  "
                     f"entropy {L['router_entropy']:.3f}")

    def plot(self) -> Optional[Path]:
        """``routing.png``: busiest/idlest ratio and router entropy per layer against step (None
        without matplotlib or records)."""
        if self.out_dir is None or not self.history:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [e["step"] for e in self.history]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
        for i, L in enumerate(self.history[0]["layers"]):
            a1.plot(steps, [min(e["layers"][i]["busiest_idlest"], 1e3) for e in self.history], "o-",
                    label=f"layer {L['layer']}")
            a2.plot(steps, [e["layers"][i]["router_entropy"] for e in self.history], "o-", label=f"layer {L['layer']}")
        a1.set(xlabel="step", ylabel="busiest / idlest expert (tokens)", yscale="log", title="expert load balance")
        a2.axhline(math.log(self.model.config.n_experts), color="k", lw=0.8, ls="--", label="max (ln E)")
        a2.set(xlabel="step", ylabel="router entropy (nats)", title="router entropy")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        fig.tight_layout()
        path = self.out_dir / "routing.png"
        fig.savefig(path)
        plt.close(fig)
        return path
