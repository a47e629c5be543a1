"""ReLUfication: swap a trained model's FFN activation for a ReLU-family one, then recover.

Recipes implemented

* **ReLUfication** (Mirzadeh et al. 2023, "ReLU Strikes Back"), **stage 1**: replace
  SiLU/GELU by ReLU in a trained model (``swiglu -> reglu``) and continue training; sparsity
  jumps, the loss first rises, then recovers. **Stage 2** (``norm_relu=True``) also inserts
  ReLUs after the normalisation layers (each block's two RMSNorms, so the inputs of the
  attention and FFN projections are sparse too; ``ModelConfig.norm_relu``).
* **dReLU** (Song et al. 2024, TurboSparse, eq. 2): ``relu(x Wg^T) * relu(x Wu^T)`` --
  a ReLU on the up projection too, so a neuron is zero when *either* branch is negative.
* **Shifted ReLU** (Mirzadeh et al. 2023, a variant separate from the stages): ``relu(z - b)`` with a constant shift
  ``b > 0`` moves the kink right so more neurons are exactly zero. It is continuous
  (unlike FATReLU below); the shift applies to every ReLU of the activation (both branches
  of dReLU). A parameterised registry name, ``"<base>_shift:<b>"``, e.g.
  ``"drelu_shift:0.1"``, that checkpoints and ``save_hf`` carry; see :func:`shifted_activation`.
* **ProSparse** (Song et al. 2024): an L1 penalty ``l1 * sum|h|`` on the FFN activations
  (summed over neurons, averaged over tokens; ``TrainConfig.l1``) during recovery, constant
  or raised progressively along sine-shaped ramps (``l1_schedule="progressive"``,
  :func:`progressive_l1`), then **FATReLU** (Kurtz et al. 2020) -- ``z if z >= t else 0``
  -- with a small threshold ``t`` at the end (registry names ``"drelu:0.05"``).

:func:`relufy` reports the validation loss and exact-zero sparsity before the swap, right
after it, after recovery training, and after the FATReLU threshold.

Note for kernels: shifted activations have ``gate_kind="other"`` and
``exact_zeros=False``, so neuron-skipping backends, which know plain ReLUs only, treat
them as dense (correct, not faster). Their zeros are still exact and the recorder sees them.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..activations import Activation, get_activation, shifted_name

Array = np.ndarray

__all__ = ["relufy", "RelufyResult", "swap_activation", "shifted_activation", "ensure_activation",
           "measure", "format_report", "progressive_l1"]


def progressive_l1(step: int, steps: int, l1: float, stages: int = 1) -> float:
    """ProSparse's progressive L1 coefficient at (0-based) ``step`` of ``steps``.

    The run is cut into ``stages`` equal parts; in stage ``i`` (0-based) the coefficient
    rises from ``l1 * i / stages`` to ``l1 * (i + 1) / stages`` along a sine ramp,
    ``lo + (hi - lo) * sin(pi / 2 * r)`` with ``r`` the progress through the stage (0 at its
    first step, 1 at its end), so it starts gently and flattens before each stage ends.

    >>> [round(progressive_l1(s, 4, 1.0), 4) for s in range(4)]
    [0.0, 0.3827, 0.7071, 0.9239]
    >>> [round(progressive_l1(s, 4, 1.0, stages=2), 4) for s in range(4)]
    [0.0, 0.3536, 0.5, 0.8536]
    """
    if steps < 1 or stages < 1 or not 0 <= step < steps:
        raise ValueError(f"need 0 <= step < steps and stages >= 1, got step={step}, steps={steps}, stages={stages}")
    per = steps / stages
    i = min(int(step // per), stages - 1)
    r = (step - i * per) / per
    lo, hi = l1 * i / stages, l1 * (i + 1) / stages
    return float(lo + (hi - lo) * np.sin(np.pi / 2 * r))

# targets whose zeros come from ReLUs (what a shift or a FATReLU threshold applies to)
_RELU_KINDS = ("relu", "relu2")


# ------------------------------------------------------------------------------------------
# shifted ReLUs as registry entries
# ------------------------------------------------------------------------------------------
def shifted_activation(base: str, shift: float, threshold: float = 0.0) -> Activation:
    """Return ``base`` with every ReLU replaced by ``relu(z - shift)`` (a registry name).

    ``base`` is a ReLU-family registry name: relu, relu2, reglu, drelu, relu2glu. With
    ``threshold`` t > 0 each shifted ReLU also zeroes outputs <= t (FATReLU on top).
    Name: ``"<base>_shift:<shift>"`` (+ ``":<threshold>"``), e.g. ``"drelu_shift:0.1"``.

    >>> act = shifted_activation("drelu", 0.5)
    >>> act.name, act(np.array([1.0, 0.2]), np.array([2.0, 2.0])).tolist()
    ('drelu_shift:0.5', [0.75, 0.0])
    """
    b, t = float(shift), float(threshold)
    act = get_activation(base)
    if act.threshold:
        raise ValueError(f"give the shift's base without a threshold (got {base!r}); pass threshold= instead")
    if act.gate_kind not in _RELU_KINDS:
        raise ValueError(f"shift applies to ReLU-family activations (relu, relu2, reglu, drelu, relu2glu), "
                         f"not {act.name!r}")
    return get_activation(shifted_name(act.name, b, t))


def ensure_activation(name: str) -> Activation:
    """Resolve ``name`` (kept for old callers: the registry parses shifted names itself,
    including the older ``"drelu-shift0.1"`` spelling)."""
    return get_activation(name)


# ------------------------------------------------------------------------------------------
# the swap
# ------------------------------------------------------------------------------------------
def _target_name(model, to: str, shift: float, threshold: Optional[float]) -> str:
    src = model.act
    try:
        act = get_activation(to)
    except KeyError as e:
        raise ValueError(f"relufy: unknown target activation {to!r}: {str(e).strip(chr(34))}") from None
    if src.gated != act.gated:
        if src.gated:
            raise ValueError(f"relufy: the model's activation {src.name!r} is gated (it has w_up) but {to!r} is "
                             "not; choose a gated ReLU target: 'reglu' (ReLU on the gate), 'drelu' (ReLU on "
                             "gate and up) or 'relu2glu'")
        raise ValueError(f"relufy: the model's activation {src.name!r} is plain (no w_up) but {to!r} is gated; "
                         "choose a plain target such as 'relu' or 'relu2'")
    if act.gate_kind not in _RELU_KINDS:
        raise ValueError(f"relufy: target {to!r} is not a ReLU-family activation (gives no exact zeros); "
                         "choose relu, relu2, reglu, drelu or relu2glu")
    t = float(threshold or 0.0) or act.threshold
    base = act.name.split(":")[0]
    if shift:
        return shifted_activation(base, shift, t).name
    if t:
        return get_activation(f"{base}:{t:g}").name
    return act.name


def swap_activation(model, to: str, *, shift: float = 0.0, threshold: Optional[float] = None,
                    norm_relu: Optional[bool] = None):
    """A new Transformer with ``model``'s weights (copied) and the FFN activation ``to``.

    Every parameter keeps its name, shape and values; only ``config.activation`` changes
    (gated -> gated, plain -> plain). ``shift``: ReLUs become ``relu(z - shift)``;
    ``threshold``: FATReLU threshold; ``norm_relu=True``: ReLU Strikes Back's stage 2, ReLUs
    after the norms (None keeps the model's setting).

    >>> import minisparse as ms
    >>> m = ms.Transformer(ms.preset("nano"), seed=0)
    >>> swap_activation(m, "drelu").config.activation
    'drelu'
    """
    from ..model import Transformer
    name = _target_name(model, to, shift, threshold)
    cfg = model.config.replace(activation=name)
    if norm_relu is not None:
        cfg = cfg.replace(norm_relu=bool(norm_relu))
    params = {k: v.copy() for k, v in model.params.items()}
    return Transformer(cfg, params=params, backend=model.backend)


# ------------------------------------------------------------------------------------------
# measuring a stage
# ------------------------------------------------------------------------------------------
def measure(model, corpus, *, batch_size: int = 16, seq_len: int = 128, n_batches: int = 8,
            seed: int = 1234) -> dict:
    """Validation loss and exact-zero sparsity (overall and per layer) in one pass.

    Uses ``minisparse.train.evaluate``'s fixed batches with a :class:`Recorder` as the hook
    (it only observes, so the loss is the dense loss).
    """
    from ..train import evaluate
    from .recorder import Recorder
    rec = Recorder(value_reservoir=1, row_reservoir=1)
    rec.seq_len = min(seq_len, model.config.max_seq_len)
    loss = evaluate(model, corpus, batch_size=batch_size, seq_len=seq_len, n_batches=n_batches,
                    seed=seed, ffn_hook=rec)
    per_layer: Dict[int, List[int]] = {}
    for (layer, _e), st in rec.stats.items():
        z = per_layer.setdefault(layer, [0, 0])
        z[0] += st.n_zero
        z[1] += st.n_values
    return {"val_loss": float(loss), "exact_zero": float(rec.mean_exact_zero()),
            "exact_zero_per_layer": [z / n for _, (z, n) in sorted(per_layer.items())],
            "reuse": _mean_finite([st.reuse() for st in rec.stats.values()])}


def _mean_finite(xs) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


# ------------------------------------------------------------------------------------------
# relufy
# ------------------------------------------------------------------------------------------
@dataclass
class RelufyResult:
    """What :func:`relufy` returns: the new model, the report, and the recovery history."""

    model: object
    report: dict
    history: List[dict] = field(default_factory=list)

    def __str__(self) -> str:
        return format_report(self.report)


def relufy(model, to: str = "drelu", *, shift: float = 0.0, corpus=None, steps: int = 0, l1: float = 0.0,
           fatrelu_threshold: Optional[float] = None, train_config=None, eval_batches: int = 8,
           eval_batch_size: int = 16, eval_seq_len: int = 128, norm_relu: bool = False,
           l1_schedule: str = "constant", l1_stages: int = 1) -> RelufyResult:
    """Swap ``model``'s FFN activation for a ReLU-family one and (optionally) recover.

    Parameters
    ----------
    model : Transformer
        A trained model (left unchanged: the result is a copy).
    to : "reglu" | "drelu" | "relu2glu" (gated models) or "relu" | "relu2" (plain models)
    shift : float
        Subtract this constant before every ReLU: ``relu(z - shift)`` (shifted ReLU).
    corpus : minisparse.data.Corpus, optional
        Text to measure on (validation split) and to recover on (training split). Without
        it nothing is measured or trained: the swap alone is returned.
    steps : int
        Recovery training steps (0: none).
    l1 : float
        ProSparse L1 penalty ``l1 * sum|h|`` per token during recovery (``TrainConfig.l1``).
    l1_schedule : "constant" | "progressive"
        "progressive": the coefficient follows :func:`progressive_l1` (sine ramps in
        ``l1_stages`` stages, up to ``l1`` at the end), as ProSparse raises it.
    norm_relu : bool
        ReLU Strikes Back's stage 2: also put ReLUs after the norms (``ModelConfig.norm_relu``).
    fatrelu_threshold : float, optional
        After recovery, every ReLU becomes FATReLU with this threshold (``"drelu:t"``).
    train_config : minisparse.train.TrainConfig, optional
        Recovery settings; ``steps`` and ``l1`` above override its fields when given.
        Default: lr 1e-3, warmup 10% of the steps, batch 16 x 128.
    eval_batches, eval_batch_size, eval_seq_len : the fixed validation batches.

    Returns
    -------
    RelufyResult with ``.model``, ``.report`` (``{"from", "to", "activation", "shift", "l1",
    "steps", "fatrelu_threshold", "stages": {"before", "swapped", "recovered", "fatrelu"}}``,
    each stage ``{"val_loss", "exact_zero", "exact_zero_per_layer", "reuse"}``) and
    ``.history`` (the recovery training records).

    Examples
    --------
    >>> import minisparse as ms
    >>> from minisparse.data import corpus_from_text
    >>> m = ms.Transformer(ms.preset("nano"), seed=0)
    >>> c = corpus_from_text("def f(x):\\n    return x + 1\\n" * 300)
    >>> r = relufy(m, "drelu", corpus=c, steps=2, eval_batches=1, eval_batch_size=2, eval_seq_len=32)
    >>> list(r.report["stages"])
    ['before', 'swapped', 'recovered']
    """
    from ..model import Transformer
    if not isinstance(model, Transformer):
        raise TypeError(f"relufy() takes a minisparse Transformer, got {type(model).__name__}")
    if steps < 0 or l1 < 0:
        raise ValueError(f"steps and l1 must be >= 0, got steps={steps}, l1={l1}")
    if steps and corpus is None:
        raise ValueError("relufy: recovery training (steps > 0) needs a corpus; pass corpus=load_corpus(...)")
    if fatrelu_threshold is not None and fatrelu_threshold < 0:
        raise ValueError(f"fatrelu_threshold must be >= 0, got {fatrelu_threshold}")
    if l1_schedule not in ("constant", "progressive"):
        raise ValueError(f"l1_schedule must be 'constant' or 'progressive', got {l1_schedule!r}")
    _target_name(model, to, shift, fatrelu_threshold)       # a bad target fails before any work
    ek = dict(batch_size=eval_batch_size, seq_len=eval_seq_len, n_batches=eval_batches)
    stages: Dict[str, dict] = {}
    if corpus is not None:
        stages["before"] = measure(model, corpus, **ek)
    new = swap_activation(model, to, shift=shift, norm_relu=norm_relu or None)
    if corpus is not None:
        stages["swapped"] = measure(new, corpus, **ek)
    history: List[dict] = []
    if steps:
        from ..train import TrainConfig, train
        if train_config is None:
            cfg = TrainConfig(steps=steps, l1=l1, lr=1e-3, warmup=max(1, steps // 10),
                              eval_every=0, eval_batches=eval_batches)
        else:
            cfg = dataclasses.replace(copy.deepcopy(train_config), steps=steps, l1=l1 or train_config.l1)
        callback = None
        if l1_schedule == "progressive" and cfg.l1:
            peak = cfg.l1
            cfg.l1 = progressive_l1(0, steps, peak, l1_stages)

            def callback(step, rec):   # the trainer reads cfg.l1 at every step: set the next one's
                if step + 1 < steps:
                    cfg.l1 = progressive_l1(step + 1, steps, peak, l1_stages)
        res = train(new, corpus, cfg, callback=callback)
        history = res.history
        stages["recovered"] = measure(new, corpus, **ek)
    if fatrelu_threshold:
        new = swap_activation(new, to, shift=shift, threshold=fatrelu_threshold)
        if corpus is not None:
            stages["fatrelu"] = measure(new, corpus, **ek)
    report = {"from": model.act.name, "to": to, "activation": new.config.activation, "shift": float(shift),
              "l1": float(l1), "l1_schedule": l1_schedule, "norm_relu": bool(new.config.norm_relu), "steps": int(steps), "fatrelu_threshold": fatrelu_threshold, "stages": stages}
    return RelufyResult(new, report, history)


def format_report(report: dict) -> str:
    """The report as a small text table: one line per stage."""
    lines = [f"relufy {report['from']} -> {report['activation']}  (steps={report['steps']}, "
             f"l1={report['l1']:g}, shift={report['shift']:g}, fatrelu={report['fatrelu_threshold']})",
             f"{'stage':<10} {'val loss':>9} {'exact zeros':>12}  per layer"]
    for name, st in report["stages"].items():
        per = " ".join(f"{z:.0%}" for z in st["exact_zero_per_layer"])
        lines.append(f"{name:<10} {st['val_loss']:>9.4f} {st['exact_zero']:>12.1%}  {per}")
    return "\n".join(lines)
