"""Hugging Face checkpoint folders in and out: Llama, Mistral, Gemma, Qwen2, Mixtral.

:func:`load_hf` reads a folder written by ``transformers`` (``config.json`` plus
``model.safetensors``, or shards listed in ``model.safetensors.index.json``) into a
:class:`minisparse.Transformer`; :func:`save_hf` writes a minisparse model back out as a
folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Weight layouts (Hugging Face ``nn.Linear`` stores ``(out, in)``)::

    HF name (layer i: model.layers.{i}.)      HF shape        minisparse name              shape
    model.embed_tokens.weight                 (V, D)          tok_embeddings               (V, D)
    input_layernorm.weight                    (D,)            layers.i.attention_norm      (D,)
    self_attn.q_proj.weight / .bias           (H*Dh, D)       layers.i.attention.wq / bq   (D, H*Dh)  transposed
    self_attn.k_proj, v_proj                  (K*Dh, D)       attention.wk, wv / bk, bv    (D, K*Dh)  transposed
    self_attn.o_proj.weight                   (D, H*Dh)       attention.wo                 (H*Dh, D)  transposed
    post_attention_layernorm.weight           (D,)            layers.i.ffn_norm            (D,)
    mlp.gate_proj.weight                      (F, D)          feed_forward.w_gate          (F, D)     as is
    mlp.up_proj.weight                        (F, D)          feed_forward.w_up            (F, D)     as is
    mlp.down_proj.weight                      (D, F)          feed_forward.w_down          (F, D)     transposed
    block_sparse_moe.gate.weight              (E, D)          feed_forward.router          (D, E)     transposed
    block_sparse_moe.experts.{e}.w1 / w3      (F, D)          feed_forward.experts.w_gate / w_up  (E, F, D)
    block_sparse_moe.experts.{e}.w2           (D, F)          feed_forward.experts.w_down  (E, F, D)  transposed
    (transformers 5 in memory: mlp.experts.gate_up_proj (E, 2F, D), mlp.experts.down_proj (E, D, F);
     both spellings are read, the per-expert one is written, which every transformers version loads)
    model.norm.weight                         (D,)            norm                         (D,)
    lm_head.weight                            (V, D)          output                       (V, D)

Activations: ``hidden_act`` names the *gate* nonlinearity of a gated MLP
``down(act(gate(x)) * up(x))``: silu -> swiglu, gelu_pytorch_tanh / gelu_new -> geglu_tanh,
gelu -> geglu (Gemma: geglu_tanh, as transformers does), relu -> reglu, relu2 -> relu2glu.

dReLU checkpoints (``down(relu(gate(x)) * relu(up(x)))``, TurboSparse, Song et al. 2024)
are recognised by either

1. a ``"minisparse_activation"`` key in ``config.json`` (what :func:`save_hf` writes for
   every activation stock transformers cannot express: ``"drelu"``, thresholded
   ``"reglu:0.05"``, plain non-gated activations, ...); it takes precedence over
   ``hidden_act``; or
2. the TurboSparse releases' own architectures, ``BambooForCausalLM`` (TurboSparse-Mistral,
   Bamboo) and ``TurboSparseMixtralForCausalLM``, with ``"hidden_act": "relu"``: their
   modeling code applies ``act_fn`` to both the gate and the up projection. Their merged
   activation-predictor tensors (``*.mlp.predictor.*``) are skipped with a warning.

A stock architecture with ``"hidden_act": "relu"`` and no marker is ReGLU (what
transformers computes for it).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .xp import to_numpy

from .activations import get_activation
from .checkpoint import atomic_write
from .config import ModelConfig
from .model import Transformer

Array = np.ndarray
PathLike = Union[str, os.PathLike]

# architecture -> family (the tensor layout); the last two are TurboSparse's custom classes
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "GemmaForCausalLM": "gemma",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "BambooForCausalLM": "mistral",
    "TurboSparseMixtralForCausalLM": "mixtral",
}
_DRELU_ARCHITECTURES = ("BambooForCausalLM", "TurboSparseMixtralForCausalLM")
_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "gemma": "gemma", "qwen2": "qwen2", "mixtral": "mixtral"}
_SAVE_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}

# hidden_act (gate nonlinearity of a gated MLP) -> minisparse activation
_HF_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh",
           "gelu_fast": "geglu_tanh", "gelu": "geglu", "relu": "reglu", "relu2": "relu2glu"}
# minisparse activation -> hidden_act, for the activations transformers can express exactly
_MS_ACT = {"swiglu": "silu", "geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu", "reglu": "relu",
           "relu2glu": "relu2"}

_DEFAULT_MAX_SEQ_LEN = 4096
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")


class HFFormatError(ValueError):
    """A Hugging Face folder that cannot be read as (or written to) the model it claims to be."""


def _need(module: str):
    """Import an optional dependency, or say how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"minisparse.hf needs the {module!r} package: pip install 'minisparse[hf]'") from None


# ======================================================================================
# config.json <-> ModelConfig
# ======================================================================================
def _architecture(d: dict, where: str) -> str:
    archs = d.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        if a in ARCHITECTURES:
            return a
    raise HFFormatError(f"{where}: unsupported architecture {archs or d.get('model_type')!r}; "
                        f"minisparse reads {', '.join(ARCHITECTURES)}")


def _activation_from_hf(d: dict, arch: str, family: str) -> str:
    """The minisparse activation name for a config.json (see the module docstring)."""
    marker = d.get("minisparse_activation")
    if marker is not None:
        try:
            return get_activation(marker).name       # validate: unknown names fail here, by name
        except (KeyError, ValueError, TypeError) as e:
            raise HFFormatError(f"minisparse_activation {marker!r}: {str(e).strip(chr(34))}") from None
    act = d.get("hidden_activation") if family == "gemma" else None
    act = act or d.get("hidden_act") or "silu"
    act = str(act).lower()
    if family == "gemma" and act == "gelu":        # legacy Gemma configs mean the tanh approximation
        return "geglu_tanh"
    if arch in _DRELU_ARCHITECTURES and act == "relu":
        return "drelu"
    if act not in _HF_ACT:
        raise HFFormatError(f"hidden_act {act!r} is not supported; minisparse maps {sorted(_HF_ACT)}. "
                            "If the checkpoint uses another activation, add "
                            "\"minisparse_activation\": \"<name>\" to config.json")
    return _HF_ACT[act]


def _rope_theta(d: dict, where: str = "config.json") -> float:
    """rope_theta from either spelling; rope scaling variants are refused by name."""
    rp = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta")
    if isinstance(rp, dict):
        theta = rp.get("rope_theta", theta)
        scaling = scaling or (rp if rp.get("rope_type", "default") != "default" else None)
    if scaling:
        if not isinstance(scaling, dict) or not isinstance(scaling.get("rope_type", scaling.get("type")), str):
            raise HFFormatError(f"{where}: rope_scaling {scaling!r} names no type ('rope_type' or 'type'); "
                                "minisparse cannot tell how the positions are scaled")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "default":
            raise HFFormatError(f"rope scaling {kind!r} is not implemented in minisparse (plain rotary "
                                "embeddings only); models such as Llama 3.1+ need it")
    return _float({"rope_theta": theta}, "rope_theta", where, 10000.0)


def _int(d: dict, key: str, where: str, default=None, minimum: int = 1) -> int:
    """``d[key]`` as an int >= minimum (JSON integers only: 64.7, "64", true and null are refused)."""
    v = d.get(key, default)
    if v is None and default is None:
        raise HFFormatError(f"{where}: {key!r} is missing or null; it must be an integer >= {minimum}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise HFFormatError(f"{where}: {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _float(d: dict, key: str, where: str, default: float) -> float:
    """``d[key]`` as a finite number (missing or null -> default)."""
    v = d.get(key)
    if v is None:
        return float(default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise HFFormatError(f"{where}: {key!r} must be a finite number, got {v!r}")
    return float(v)


def config_from_hf(d: dict, max_seq_len: Optional[int] = None, where: str = "config.json") -> Tuple[ModelConfig, str, str]:
    """Map a ``config.json`` dict onto a :class:`ModelConfig`.

    Returns ``(config, architecture, family)``. ``max_seq_len`` overrides
    ``max_position_embeddings`` (which is capped at 4096 by default: the KV cache and the
    rotary table are sized by it).

    >>> cfg, arch, fam = config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 32,
    ...     "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...     "intermediate_size": 24, "hidden_act": "silu"})
    >>> cfg.activation, cfg.head_dim, fam
    ('swiglu', 8, 'llama')
    """
    if not isinstance(d, dict):
        raise HFFormatError(f"{where}: config.json must hold a JSON object, got a {type(d).__name__}")
    arch = _architecture(d, where)
    family = ARCHITECTURES[arch]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in d:
            raise HFFormatError(f"{where}: missing {key!r}, which a {arch} config must have")
        _int(d, key, where)
    if d.get("mlp_bias"):
        raise HFFormatError(f"{where}: mlp_bias=true (biases on the MLP) is not supported by minisparse")
    if d.get("attention_bias") and family != "qwen2":
        raise HFFormatError(f"{where}: attention_bias=true on {arch} (a bias on o_proj too) is not supported; "
                            "minisparse has q/k/v biases only (Qwen2)")
    n_heads = _int(d, "num_attention_heads", where)
    n_pos = _int(d, "max_position_embeddings", where, default=_DEFAULT_MAX_SEQ_LEN)
    window = d.get("sliding_window")
    if family == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    window = _int(d, "sliding_window", where) if window is not None else None
    if max_seq_len is None:
        max_seq_len = min(n_pos, _DEFAULT_MAX_SEQ_LEN, window or n_pos)
    elif window and max_seq_len > window:
        warnings.warn(f"{where}: max_seq_len={max_seq_len} exceeds the sliding window ({window}); "
                      "minisparse attends over the full context, so beyond the window its results "
                      "differ from transformers'", stacklevel=3)
    family_opts = {}
    if family == "gemma":
        family_opts = dict(norm_offset=True, embed_scale=True)
    if family == "mixtral":
        if "num_local_experts" not in d:
            raise HFFormatError(f"{where}: missing 'num_local_experts', which a {arch} config must have")
        family_opts = dict(n_experts=_int(d, "num_local_experts", where), top_k=_int(d, "num_experts_per_tok", where, 2),
                           router="topk_softmax",  # softmax of the top-k logits == softmax, top-k, renormalise
                           router_aux_loss_coef=_float(d, "router_aux_loss_coef", where, 0.01))
    tie = d.get("tie_word_embeddings")
    if tie is None:
        tie = family == "gemma"  # transformers' defaults: Gemma ties, the others do not
    head_dim = _int(d, "head_dim", where) if d.get("head_dim") is not None else None
    try:
        cfg = ModelConfig(
            vocab_size=_int(d, "vocab_size", where), dim=_int(d, "hidden_size", where),
            n_layers=_int(d, "num_hidden_layers", where), n_heads=n_heads,
            n_kv_heads=_int(d, "num_key_value_heads", where, n_heads), head_dim=head_dim,
            ffn_dim=_int(d, "intermediate_size", where), activation=_activation_from_hf(d, arch, family),
            norm_eps=_float(d, "rms_norm_eps", where, 1e-6), rope_theta=_rope_theta(d, where),
            max_seq_len=int(max_seq_len), tie_embeddings=bool(tie), qkv_bias=family == "qwen2",
            **family_opts)
    except ValueError as e:
        if isinstance(e, HFFormatError):
            raise
        raise HFFormatError(f"{where}: {e}") from None
    return cfg, arch, family


def _family_for(cfg: ModelConfig, architecture: Optional[str]) -> str:
    """Which Hugging Face layout :func:`save_hf` writes for a config."""
    if architecture is not None:
        if architecture not in _SAVE_ARCH.values():
            raise ValueError(f"architecture={architecture!r}: save_hf writes one of {sorted(_SAVE_ARCH.values())}")
        family = ARCHITECTURES[architecture]
    elif cfg.n_experts > 0:
        family = "mixtral"
    elif cfg.qkv_bias:
        family = "qwen2"
    elif cfg.norm_offset and cfg.embed_scale:
        family = "gemma"
    else:
        family = "llama"
    problems = []
    if cfg.qkv_bias != (family == "qwen2"):
        problems.append(f"qkv_bias={cfg.qkv_bias} (only Qwen2 has q/k/v biases)")
    if (cfg.norm_offset, cfg.embed_scale) != ((True, True) if family == "gemma" else (False, False)):
        problems.append(f"norm_offset={cfg.norm_offset}, embed_scale={cfg.embed_scale} (both True only for Gemma)")
    if getattr(cfg, "norm_relu", False):
        problems.append("norm_relu=True (ReLUs after the norms: no Hugging Face architecture has them)")
    if (cfg.n_experts > 0) != (family == "mixtral"):
        problems.append(f"n_experts={cfg.n_experts} (MoE layers only in Mixtral)")
    if family == "mixtral":
        if cfg.router not in ("topk_softmax", "softmax_topk_norm"):
            problems.append(f"router={cfg.router!r} (Mixtral renormalises over the top-k: topk_softmax)")
        if cfg.n_shared_experts or cfg.moe_layers is not None or cfg.capacity_factor is not None:
            problems.append("shared experts / moe_layers / capacity_factor (Mixtral has none: every layer "
                            "is MoE, no token is dropped)")
    if problems:
        raise ValueError(f"save_hf: this config cannot be written as {_SAVE_ARCH[family]}: " + "; ".join(problems))
    return family


def config_to_hf(cfg: ModelConfig, family: str, dtype: str = "float32") -> Tuple[dict, Optional[str]]:
    """A ``config.json`` dict for ``cfg``; also the reason stock transformers cannot run it (or None)."""
    act = get_activation(cfg.activation)
    hidden_act = _MS_ACT.get(act.name)
    why_not = None
    if family == "gemma" and act.name == "geglu":
        hidden_act = None   # transformers turns Gemma's "gelu" into the tanh approximation
    if hidden_act is None:
        why_not = (f"activation {cfg.activation!r} has no transformers hidden_act (transformers' gated MLP "
                   f"computes down(act(gate(x)) * up(x)))")
        hidden_act = "relu" if act.gate_kind == "relu" else ("gelu_pytorch_tanh" if family == "gemma" else "silu")
    d = {
        "architectures": [_SAVE_ARCH[family]], "model_type": _MODEL_TYPE[family],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": hidden_act,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if family == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    if family == "gemma":
        d["hidden_activation"] = hidden_act
    if family in ("mistral", "mixtral"):
        d["sliding_window"] = None
    if family == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if family == "mixtral":
        d.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                 router_aux_loss_coef=cfg.router_aux_loss_coef, router_jitter_noise=0.0,
                 output_router_logits=False)
    if why_not is not None:
        d["minisparse_activation"] = cfg.activation
    return d, why_not


# ======================================================================================
# the name map: one entry per (minisparse tensor, part of it) <- Hugging Face tensor
# ======================================================================================
# op: "copy" same layout; "T" transposed (2-D); "expert" dest[e] = src; "expertT" dest[e] = src.T;
#     "fused_gate"/"fused_up" dest = src[:, :F] / src[:, F:] of (E, 2F, D); "fusedT" dest = src (E, D, F) -> (E, F, D)
Entry = Tuple[str, str, str, Optional[int]]  # (minisparse name, HF name, op, expert index)


def _hf_shape(op: str, ms_shape: tuple) -> tuple:
    """The shape the Hugging Face tensor must have for an entry."""
    if op == "copy":
        return tuple(ms_shape)
    if op == "T":
        return tuple(ms_shape[::-1])
    if op == "expert":
        return tuple(ms_shape[1:])
    if op == "expertT":
        return tuple(ms_shape[1:][::-1])
    E, F, D = ms_shape
    if op in ("fused_gate", "fused_up"):
        return (E, 2 * F, D)
    return (E, D, F)  # fusedT


def _name_map(cfg: ModelConfig, keys=None) -> List[Entry]:
    """Every (minisparse name, HF name, op, expert) pair for ``cfg``.

    ``keys`` (the checkpoint's tensor names, when reading) picks between the MoE spellings:
    per-expert ``block_sparse_moe.experts.{e}.w1`` (files) or fused ``mlp.experts.gate_up_proj``.
    """
    act = get_activation(cfg.activation)
    keys = set(keys or ())
    out: List[Entry] = [("tok_embeddings", "model.embed_tokens.weight", "copy", None)]
    for i in range(cfg.n_layers):
        m, p = f"model.layers.{i}.", f"layers.{i}."
        out.append((p + "attention_norm", m + "input_layernorm.weight", "copy", None))
        for x in "qkvo":
            out.append((p + f"attention.w{x}", m + f"self_attn.{x}_proj.weight", "T", None))
        if cfg.qkv_bias:
            for x in "qkv":
                out.append((p + f"attention.b{x}", m + f"self_attn.{x}_proj.bias", "copy", None))
        out.append((p + "ffn_norm", m + "post_attention_layernorm.weight", "copy", None))
        f = p + "feed_forward."
        if cfg.is_moe_layer(i):
            fused = m + "mlp.experts.gate_up_proj"
            if fused in keys:
                out += [(f + "router", m + "mlp.gate.weight", "T", None),
                        (f + "experts.w_gate", fused, "fused_gate", None),
                        (f + "experts.w_up", fused, "fused_up", None),
                        (f + "experts.w_down", m + "mlp.experts.down_proj", "fusedT", None)]
                continue
            moe = "mlp." if (m + "mlp.gate.weight") in keys else "block_sparse_moe."
            out.append((f + "router", m + moe + "gate.weight", "T", None))
            for e in range(cfg.n_experts):
                x = m + moe + f"experts.{e}."
                out.append((f + "experts.w_gate", x + "w1.weight", "expert", e))
                if act.gated:
                    out.append((f + "experts.w_up", x + "w3.weight", "expert", e))
                out.append((f + "experts.w_down", x + "w2.weight", "expertT", e))
        else:
            out.append((f + "w_gate", m + "mlp.gate_proj.weight", "copy", None))
            if act.gated:
                out.append((f + "w_up", m + "mlp.up_proj.weight", "copy", None))
            out.append((f + "w_down", m + "mlp.down_proj.weight", "T", None))
    out.append(("norm", "model.norm.weight", "copy", None))
    if not cfg.tie_embeddings:
        out.append(("output", "lm_head.weight", "copy", None))
    return out


def _ignorable(name: str, cfg: ModelConfig) -> Optional[str]:
    """Why a checkpoint tensor minisparse does not use may be skipped (None: it may not)."""
    if name.endswith("rotary_emb.inv_freq"):
        return "rotary buffer"           # old Llama checkpoints store it; minisparse recomputes it
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return "tied"                    # transformers ties it to the embeddings as well
    if ".mlp.predictor." in name or ".block_sparse_moe.predictor." in name:
        return "predictor"               # TurboSparse's merged activation predictors
    return None


# ======================================================================================
# reading safetensors files
# ======================================================================================
def _weight_map(index: Path) -> Dict[str, str]:
    """The index's {tensor name: shard file name}; each shard a plain name inside the folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise HFFormatError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); it must hold "
                            "{\"weight_map\": {tensor name: file name}}") from None
    if not isinstance(weight_map, dict):
        raise HFFormatError(f"{index}: weight_map must be a JSON object {{tensor name: file name}}")
    for name, f in weight_map.items():
        if not isinstance(f, str) or not f:
            raise HFFormatError(f"{index}: weight_map[{name!r}] is {f!r}, not a file name")
        rel = Path(f)
        if rel.is_absolute() or ".." in rel.parts or "\\" in f:
            raise HFFormatError(f"{index}: weight_map[{name!r}] = {f!r} points outside the model folder; "
                                "shards must be files inside the folder")
    return weight_map


class _Reader:
    """Tensor name -> file; opens each file once (memory-mapped) and reads one tensor at a time."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder = folder
        self._stack = stack
        self._open: Dict[Path, object] = {}
        self.where: Dict[str, Path] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _weight_map(index)
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise HFFormatError(f"{index} lists shard(s) that are not in {folder}: {missing}; "
                                    "the download is incomplete")
            for f in files:                       # open every shard: validates its header
                keys = set(self._file(folder / f).keys())
                for name in [n for n, ff in weight_map.items() if ff == f]:
                    if name not in keys:
                        raise HFFormatError(f"{index} says tensor {name!r} is in {f}, but {f} does not hold it")
                    self.where[name] = folder / f
        else:
            single = folder / "model.safetensors"
            files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
            if not files:
                raise HFFormatError(f"no model.safetensors (or model.safetensors.index.json and shards) in "
                                    f"{folder}; minisparse reads safetensors weights only (convert "
                                    "pytorch_model.bin with transformers' save_pretrained)")
            for f in files:
                for name in self._file(f).keys():
                    if name in self.where:
                        raise HFFormatError(f"tensor {name!r} is in both {self.where[name].name} and {f.name}")
                    self.where[name] = f

    def _file(self, path: Path):
        if path not in self._open:
            st = _need("safetensors")
            try:
                self._open[path] = self._stack.enter_context(st.safe_open(str(path), framework="np"))
            except Exception as e:  # safetensors raises its own error types (header, size)
                raise HFFormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                                    "it is probably truncated or corrupt: download or save it again") from None
        return self._open[path]

    def shape(self, name: str) -> tuple:
        return tuple(self._file(self.where[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of a tensor ("F32", "BF16", "I64", ...)."""
        return str(self._file(self.where[name]).get_slice(name).get_dtype()).upper()

    def read(self, name: str, index=None) -> Array:
        """The tensor (a fresh array); ``index`` (a tuple of slices) reads only that part."""
        path = self.where[name]
        f = self._file(path)
        try:
            if index is None:
                return f.get_tensor(name)
            return f.get_slice(name)[index]
        except Exception as e:
            raise HFFormatError(f"{path}: cannot read tensor {name!r} ({type(e).__name__}: {e}); the file is "
                                "probably truncated or corrupt: download or save it again") from None


def _check_tensors(reader: "_Reader", entries: List[Entry], shapes: dict, cfg: ModelConfig, folder: Path,
                   arch: str, strict: bool) -> None:
    """Every tensor the config needs is present, floating point and of the right shape; tensors it
    does not need are refused (strict) or warned about."""
    missing = sorted({hf for _, hf, _, _ in entries if hf not in reader.where})
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise HFFormatError(f"{folder}: {len(missing)} tensor(s) the {arch} config needs are missing: "
                            f"{missing[:10]}{more}")
    for ms_name, hf, op, _ in entries:
        if reader.dtype(hf) not in _FLOAT_CODES:
            raise HFFormatError(f"{folder}: tensor {hf!r} has dtype {reader.dtype(hf)}; weights must be "
                                f"floating point ({', '.join(_FLOAT_CODES)})")
        want, found = _hf_shape(op, shapes[ms_name]), reader.shape(hf)
        if want != found:
            raise HFFormatError(f"{folder}: tensor {hf!r}: expected shape {want} from config.json, found "
                                f"{found}; config.json and the weights disagree")
    used = {hf for _, hf, _, _ in entries}
    skipped: Dict[str, List[str]] = {}
    extra = []
    for name in sorted(set(reader.where) - used):
        why = _ignorable(name, cfg)
        if why is None:
            extra.append(name)
        else:
            skipped.setdefault(why, []).append(name)
    if extra:
        msg = (f"{folder}: {len(extra)} tensor(s) that a {arch} with this config does not have: "
               f"{extra[:10]}{' ...' if len(extra) > 10 else ''}; the config may be wrong (e.g. hidden_act, "
               "tie_word_embeddings) or the checkpoint is another architecture")
        if strict:
            raise HFFormatError(msg + " (strict=False loads it anyway, ignoring them)")
        warnings.warn(msg, stacklevel=3)
    if "predictor" in skipped:
        warnings.warn(f"{folder}: skipped {len(skipped['predictor'])} TurboSparse activation-predictor "
                      "tensors (minisparse computes the gate densely instead)", stacklevel=3)


def _read_params(reader: "_Reader", entries: List[Entry], shapes: dict, dt: np.dtype) -> Dict[str, Array]:
    """Read one tensor at a time into its final array (one extra copy at a time)."""
    params: Dict[str, Array] = {}
    for ms_name, hf, op, e in entries:
        if op in ("copy", "T"):
            t = reader.read(hf)
            params[ms_name] = np.ascontiguousarray(t.T if op == "T" else t, dtype=dt)
            del t                              # before the next read: one extra copy at a time
            continue
        if ms_name not in params:
            params[ms_name] = np.empty(shapes[ms_name], dtype=dt)
        dest = params[ms_name]
        if op == "expert":
            dest[e] = reader.read(hf)
        elif op == "expertT":
            dest[e] = reader.read(hf).T
        elif op in ("fused_gate", "fused_up"):
            F = dest.shape[1]
            dest[...] = reader.read(hf, np.s_[:, :F] if op == "fused_gate" else np.s_[:, F:])
        else:  # fusedT: (E, D, F) -> (E, F, D), one expert at a time
            for k in range(dest.shape[0]):
                dest[k] = reader.read(hf, np.s_[k:k + 1])[0].T                 # (F, D)
    return params


def load_hf(path: PathLike, dtype=np.float32, max_seq_len: Optional[int] = None,
            strict: bool = True, backend: Optional[str] = None) -> Transformer:
    """Load a Hugging Face checkpoint folder as a :class:`minisparse.Transformer`.

    Parameters
    ----------
    path : folder with ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` with its shards). Architectures: LlamaForCausalLM,
        MistralForCausalLM, GemmaForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM (and
        TurboSparse's BambooForCausalLM / TurboSparseMixtralForCausalLM, read as dReLU).
    dtype : float32 (default) or float64. bfloat16 / float16 files are widened through
        ``ml_dtypes``. A 7B model takes 28 GB in float32.
    max_seq_len : longest sequence the model will run (default: ``max_position_embeddings``
        capped at 4096, and at Mistral's sliding window).
    strict : tensors the model does not use raise (True) or warn (False).
    backend : kernel backend for inference (see :class:`Transformer`).

    Memory: each tensor is read from the memory-mapped file, converted into its final array
    and dropped; at most one tensor's extra copy exists at a time.

    Examples
    --------
    >>> model = load_hf("path/to/Mistral-7B-v0.1")          # doctest: +SKIP
    >>> ms.generate(model, tok.encode("Hello"), 20, temperature=0)   # doctest: +SKIP
    """
    _need("ml_dtypes")                    # registers numpy's "bfloat16" dtype, which safetensors' numpy loader needs
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; load_hf reads a Hugging Face model folder "
                                "(config.json + *.safetensors)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}; a Hugging Face model folder has config.json "
                                "next to its *.safetensors files")
    try:
        d = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as e:
        raise HFFormatError(f"{cfg_path}: not valid JSON ({type(e).__name__}: {e})") from None
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64 (minisparse computes in those), got {dt}")
    cfg, arch, family = config_from_hf(d, max_seq_len, where=str(cfg_path))
    shapes = Transformer.param_shapes(cfg)

    with ExitStack() as stack:
        reader = _Reader(folder, stack)
        entries = _name_map(cfg, reader.where)
        _check_tensors(reader, entries, shapes, cfg, folder, arch, strict)    # before anything is read
        params = _read_params(reader, entries, shapes, dt)
    params = {k: params[k] for k in shapes}   # the model's parameter order
    return Transformer(cfg, dtype=dt, backend=backend, params=params)


# ======================================================================================
# writing
# ======================================================================================
def _to_hf(param: Array, op: str, e: Optional[int]) -> Array:
    """The Hugging Face tensor of one entry (inverse of the load ops used by save_hf)."""
    if op == "copy":
        return param
    if op == "T":
        return param.T
    if op == "expert":
        return param[e]
    if op == "expertT":
        return param[e].T
    raise ValueError(f"save_hf does not write op {op!r}")


def _write_safetensors(fh, tensors: List[Tuple[str, callable, tuple]], dtype: np.dtype, st_dtype: str) -> None:
    """Write a safetensors file to ``fh`` tensor by tensor (never a second copy of the whole model).

    The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, padded with spaces to 8 bytes, then the raw little-endian bytes.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    itemsize = dtype.itemsize
    for name, _, shape in tensors:
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    fh.write(len(hb).to_bytes(8, "little"))
    fh.write(hb)
    for name, get, shape in tensors:
        a = np.ascontiguousarray(get(), dtype=dtype)       # the one extra copy
        assert a.shape == tuple(shape), (name, a.shape, shape)
        fh.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def save_hf(model: Transformer, path: PathLike, architecture: Optional[str] = None,
            dtype: Optional[str] = None) -> Path:
    """Write ``model`` as a Hugging Face folder: ``config.json`` + ``model.safetensors``.

    Parameters
    ----------
    model : a :class:`minisparse.Transformer`.
    path : the folder (created if needed). It must not hold a sharded checkpoint already.
    architecture : one of LlamaForCausalLM, MistralForCausalLM, GemmaForCausalLM,
        Qwen2ForCausalLM, MixtralForCausalLM; default from the config (n_experts ->
        Mixtral, qkv_bias -> Qwen2, norm_offset + embed_scale -> Gemma, else Llama).
    dtype : "float32" (default), "bfloat16" (through ``ml_dtypes``), "float16" or "float64".

    Activations transformers cannot express (``drelu``, thresholded ones such as
    ``reglu:0.05``, plain non-gated activations) are written anyway, with
    ``"minisparse_activation"`` in ``config.json`` so that :func:`load_hf` reads them back
    exactly; a warning says that stock transformers cannot run the folder.

    Files are written to temporary names and moved into place (``os.replace``), config.json last.

    >>> save_hf(ms.Transformer(ms.preset("nano")), "out/nano-hf")    # doctest: +SKIP
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"save_hf takes a minisparse.Transformer, got {type(model).__name__}")
    cfg = model.config
    family = _family_for(cfg, architecture)
    dtype = dtype or "float32"
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype={dtype!r}: save_hf writes one of {sorted(_ST_DTYPES)}")
    np_dtype = np.dtype(_need("ml_dtypes").bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    d, why_not = config_to_hf(cfg, family, dtype)
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "model.safetensors.index.json").exists():
        raise FileExistsError(f"{folder} holds a sharded checkpoint (model.safetensors.index.json), which "
                              "load_hf would read instead of the new file; save into an empty folder")
    p = model.params                                   # NumPy or CuPy (each copied to the host when written)
    tensors = [(hf, (lambda ms=ms, op=op, e=e: _to_hf(to_numpy(p[ms]), op, e)), _hf_shape(op, p[ms].shape))
               for ms, hf, op, e in _name_map(cfg)]
    atomic_write(folder / "model.safetensors", lambda fh: _write_safetensors(fh, tensors, np_dtype, _ST_DTYPES[dtype]))
    atomic_write(folder / "config.json", lambda fh: fh.write((json.dumps(d, indent=2) + "\n").encode()))
    if why_not is not None:
        warnings.warn(f"save_hf wrote {folder}, but stock transformers cannot run it: {why_not}. "
                      f"minisparse.load_hf reads it back exactly (config.json has \"minisparse_activation\": "
                      f"{cfg.activation!r}); transformers would load the tensors and compute "
                      f"hidden_act={d['hidden_act']!r} instead.", stacklevel=2)
    return folder
