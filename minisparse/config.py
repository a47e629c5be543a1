"""Model configuration: one frozen, validated dataclass and a few named presets.

Follows nanoGPT's ``GPTConfig`` / minGPT's presets: plain data, a comment per field,
invariants checked on construction so that an impossible model fails *here*, with the
name of the field and the fix, rather than deep inside a matmul.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional, Tuple

ROUTERS = ("topk_softmax", "softmax_topk", "softmax_topk_norm")


def _bad(name: str, msg: str) -> None:
    raise ValueError(f"ModelConfig.{name}: {msg}")


def _is_int(v) -> bool:
    """An integer, but not a bool (``True`` is an int to Python, not a size to us)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need_int(name: str, v, minimum: int, what: str = "") -> None:
    if not _is_int(v) or v < minimum:
        _bad(name, f"must be {what or ('a positive int' if minimum == 1 else f'an int >= {minimum}')}, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama/Mistral/Gemma-style decoder.

    A frozen dataclass: plain data, one comment per field (see the source below),
    invariants checked on construction so that an impossible model fails here, with the
    name of the field and the fix, rather than deep inside a matmul (nanoGPT's
    ``GPTConfig``). ``n_kv_heads``, ``head_dim`` and ``shared_ffn_dim`` default to
    ``n_heads``, ``dim // n_heads`` and ``ffn_dim``. The MoE fields (``n_experts`` > 0,
    ``top_k``, ``router``, ...) are described in :mod:`minisparse.moe`.

    Raises
    ------
    ValueError
        On an impossible configuration, e.g. ``n_heads`` not dividing ``dim``,
        ``n_kv_heads`` not dividing ``n_heads``, an unknown activation, ``top_k > n_experts``.

    Examples
    --------
    >>> cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=172, activation="drelu")
    >>> cfg.head_dim, cfg.n_kv_heads
    (16, 4)
    """

    vocab_size: int = 258            # V: tokens; 258 = 256 bytes + BOS + EOS (ByteTokenizer)
    dim: int = 128                   # D: width of the residual stream
    n_layers: int = 4                # number of decoder blocks
    n_heads: int = 4                 # H: query heads
    n_kv_heads: Optional[int] = None  # K: key/value heads (GQA); None -> n_heads (plain MHA)
    head_dim: Optional[int] = None   # width of one head; None -> dim // n_heads (Gemma sets it apart)
    ffn_dim: int = 344               # F: FFN neurons (per expert in MoE layers)
    activation: str = "swiglu"       # FFN activation, a name from minisparse.activations
    norm_eps: float = 1e-5           # RMSNorm epsilon
    norm_offset: bool = False        # Gemma: RMSNorm scales by (1 + w) instead of w
    embed_scale: bool = False        # Gemma: multiply embeddings by sqrt(dim)
    rope_theta: float = 10000.0      # rotary embedding base
    max_seq_len: int = 256           # longest sequence (rotary table and KV cache size)
    tie_embeddings: bool = True      # LM head shares the token-embedding matrix
    qkv_bias: bool = False           # Qwen2: biases on the q, k, v projections
    norm_relu: bool = False          # ReLU after each block's two RMSNorms (ReLU Strikes Back, stage 2)
    # --- Mixture-of-Experts (0 experts = every FFN is dense) -----------------------------
    n_experts: int = 0               # E: experts per MoE layer
    top_k: int = 2                   # experts each token is sent to
    router: str = "topk_softmax"     # topk_softmax (Mixtral) | softmax_topk | softmax_topk_norm
    router_aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight
    n_shared_experts: int = 0        # always-on experts (Qwen-MoE / DeepSeek-MoE)
    shared_ffn_dim: Optional[int] = None  # neurons of each shared expert; None -> ffn_dim
    moe_layers: Optional[Tuple[int, ...]] = None  # which layers are MoE; None -> all (when n_experts > 0)
    capacity_factor: Optional[float] = None  # None: no token is ever dropped

    def __post_init__(self) -> None:
        self._check_shape()
        self._check_numbers()
        # activation: resolved through the registry (also accepts parameters like 'fatrelu:0.1')
        from .activations import get_activation
        try:
            get_activation(self.activation)
        except (KeyError, ValueError, TypeError) as e:
            _bad("activation", str(e).strip('"'))
        self._check_moe()

    def _check_shape(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            _need_int(name, getattr(self, name), 1)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                _bad("n_heads", f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                     "choose n_heads dividing dim, or set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _need_int("n_kv_heads", self.n_kv_heads, 1)
        if self.n_heads % self.n_kv_heads:
            _bad("n_kv_heads", f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                 "(each KV head serves n_heads // n_kv_heads query heads)")
        if not _is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
            _bad("head_dim", f"must be an even int >= 2 (rotary embeddings rotate pairs), got {self.head_dim!r}")
        for f in fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                _bad(f.name, f"must be True or False, got {getattr(self, f.name)!r}")

    def _check_numbers(self) -> None:
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or not v > 0:
                _bad(name, f"must be a finite number > 0, got {v!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or not v >= 0:
                _bad(name, f"loss coefficients must be finite numbers >= 0, got {v!r}")
        cf = self.capacity_factor
        if cf is not None and (not _is_real(cf) or not math.isfinite(cf) or not cf > 0):
            _bad("capacity_factor", f"must be a finite number > 0 or None, got {cf!r}")
        if not isinstance(self.router, str) or self.router not in ROUTERS:
            _bad("router", f"unknown router {self.router!r}; choose one of {ROUTERS}")
        if not isinstance(self.activation, str):
            _bad("activation", f"must be a name (str), got {self.activation!r}")

    def _check_moe(self) -> None:
        _need_int("n_experts", self.n_experts, 0, "an int >= 0 (0 = dense FFN)")
        if self.n_experts > 0:
            if not _is_int(self.top_k) or not 1 <= self.top_k <= self.n_experts:
                _bad("top_k", f"must be between 1 and n_experts={self.n_experts}, got {self.top_k!r}")
        _need_int("n_shared_experts", self.n_shared_experts, 0)
        if self.n_shared_experts > 0 and self.n_experts == 0:
            _bad("n_shared_experts", "shared experts belong to MoE layers; set n_experts > 0 "
                 "(or n_shared_experts=0 for a dense model)")
        if self.shared_ffn_dim is None:
            object.__setattr__(self, "shared_ffn_dim", self.ffn_dim)
        _need_int("shared_ffn_dim", self.shared_ffn_dim, 1, "a positive int or None (= ffn_dim)")
        if self.moe_layers is not None:
            ml = self.moe_layers
            if isinstance(ml, (str, bytes)) or not isinstance(ml, (tuple, list)) or not all(_is_int(i) for i in ml):
                _bad("moe_layers", f"must be a tuple of layer indices (ints) or None, got {ml!r}")
            ml = tuple(int(i) for i in ml)
            for i in ml:
                if not 0 <= i < self.n_layers:
                    _bad("moe_layers", f"layer {i} out of range 0..{self.n_layers - 1}")
            if len(set(ml)) != len(ml):
                _bad("moe_layers", f"lists a layer twice: {ml}")
            if self.n_experts == 0 and ml:
                _bad("moe_layers", "set n_experts > 0 to have MoE layers")
            object.__setattr__(self, "moe_layers", ml)

    # ------------------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """True when block ``layer`` uses a Mixture-of-Experts FFN."""
        if self.n_experts == 0:
            return False
        return self.moe_layers is None or layer in self.moe_layers

    def to_dict(self) -> dict:
        """Plain JSON-able dict (round-trips through :meth:`from_dict`)."""
        d = asdict(self)
        if d["moe_layers"] is not None:
            d["moe_layers"] = list(d["moe_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        d = dict(d)
        if d.get("moe_layers") is not None:
            d["moe_layers"] = tuple(d["moe_layers"])
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


PRESETS = {
    # ~0.2M parameters: unit tests and tutorials' quick mode
    "nano": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=172, max_seq_len=128),
    # ~0.9M parameters: the demo (trains in a few minutes on 2 CPU cores)
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=344, max_seq_len=256),
    # ~3.3M parameters: the reference configuration of bench/train_throughput.py
    "small": dict(dim=256, n_layers=4, n_heads=8, ffn_dim=688, max_seq_len=256),
    # an 8-expert top-2 MoE at the size of "tiny"
    "tiny-moe": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=172, max_seq_len=256,
                     n_experts=8, top_k=2),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration, with optional field overrides.

    Parameters
    ----------
    name : str
        One of :data:`PRESETS` (case-insensitive): ``"nano"`` (~0.1M parameters; tests and
        the tutorials), ``"tiny"`` (the demo), ``"small"`` (the training benchmark),
        ``"tiny-moe"`` (8 experts, top-2).
    **overrides
        Any :class:`ModelConfig` field, e.g. ``activation="drelu"``, ``n_experts=4``.

    Returns
    -------
    ModelConfig
        Validated; an impossible combination raises ``ValueError`` naming the field.

    Examples
    --------
    >>> preset("nano", activation="drelu").ffn_dim
    172
    >>> preset("nano", n_experts=4, top_k=2).is_moe_layer(0)
    True
    """
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[key], **overrides})
