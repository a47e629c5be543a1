"""minisparse: a from-scratch NumPy reference for activation-sparse and Mixture-of-Experts
transformers, with backends that really skip the work of inactive neurons.

Core (``import minisparse``) needs NumPy only; numba, cupy, safetensors, torch and
transformers are optional extras imported where used. Names from modules with optional
dependencies are imported lazily, on first use.
"""
from importlib import import_module as _import_module

from . import runtime as _runtime  # first: process defaults that must precede NumPy (runtime.py)

_runtime.configure_import()

from .activations import Activation, get_activation, list_activations, register_activation, register_gated
from .config import PRESETS, ModelConfig, preset
from .generate import generate, sample_next, stream
from .model import KVCache, Transformer
from .tokenizer import ByteTokenizer, load_tokenizer

__version__ = "0.1.0"          # the one place: pyproject.toml reads it (tool.setuptools.dynamic)

# public name -> module that defines it (imported on first access)
_LAZY = {
    "sparse_ffn": "minisparse.kernels",
    "backends": "minisparse.kernels",
    "save": "minisparse.checkpoint",
    "load": "minisparse.checkpoint",
    "load_hf": "minisparse.hf",
    "save_hf": "minisparse.hf",
    "count_parameters": "minisparse.stats",
    "moe_stats": "minisparse.stats",
    "relufy": "minisparse.sparsity",
    "train": "minisparse.train",
    "AdamW": "minisparse.train",
    "TrainConfig": "minisparse.train",
}


def __getattr__(name):
    if name in _LAZY:
        module = _import_module(_LAZY[name])
        # "train" is the submodule minisparse.train itself, made callable (it calls its train()):
        # importing the submodule binds this name to it anyway, so it is one object in any order
        value = module if name == "train" else getattr(module, name)
        globals()[name] = value        # later lookups skip this hook (ms.sparse_ffn in a decode loop)
        return value
    raise AttributeError(f"module 'minisparse' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "Activation", "ByteTokenizer", "KVCache", "ModelConfig", "PRESETS", "Transformer",
    "generate", "get_activation", "list_activations", "load_tokenizer", "preset",
    "register_activation", "register_gated", "sample_next", "stream", *_LAZY,
]
