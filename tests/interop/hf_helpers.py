"""Helpers for the Hugging Face interop tests: tiny random transformers models on disk.

Everything here needs torch + transformers (the ``dev`` extra); the tests skip cleanly
without them.
"""
import importlib.util

import numpy as np
import pytest

HAVE_MOE = importlib.util.find_spec("minisparse.moe") is not None
MOE_REASON = "Mixtral needs minisparse/moe.py (the MoE issue), which is not in this tree yet"

# a short prompt of token ids, shared by the tests (vocab of the tiny models is 96)
PROMPT = [1, 17, 5, 42, 9, 3, 77]


def tiny_hf_config(kind: str, **overrides):
    """A small transformers config of one architecture: fast, but exercising its features."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if kind == "llama":                       # GQA, untied
        cls, kw = transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_theta=500.0)
    elif kind == "llama_tied_mha":            # plain MHA, tied embeddings
        cls, kw = transformers.LlamaConfig, dict(tie_word_embeddings=True, num_key_value_heads=4)
    elif kind == "mistral":                   # a sliding window longer than any test sequence
        cls, kw = transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=48)
    elif kind == "gemma":                     # head_dim apart from dim / n_heads, MQA, tanh GeGLU
        cls, kw = transformers.GemmaConfig, dict(head_dim=16, num_key_value_heads=1,
                                                 hidden_act="gelu_pytorch_tanh",
                                                 hidden_activation="gelu_pytorch_tanh")
    elif kind == "qwen2":                     # q/k/v biases
        cls, kw = transformers.Qwen2Config, dict(tie_word_embeddings=False, use_sliding_window=False)
    elif kind == "mixtral":
        cls, kw = transformers.MixtralConfig, dict(tie_word_embeddings=False, num_local_experts=4,
                                                   num_experts_per_tok=2, sliding_window=None)
    else:
        raise ValueError(kind)
    return cls(**{**common, **kw, **overrides})


def build_hf(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers model (float32, eager attention, eval mode).

    transformers initialises biases to 0 and norms to 1 (Gemma: 0); every parameter is
    redrawn here so that a mixed-up tensor cannot go unnoticed.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = tiny_hf_config(kind, **overrides)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                base = 0.0 if kind == "gemma" else 1.0
                p.copy_(base + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def hf_logits(model, tokens) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt, n: int) -> list:
    """Greedy decoding by full recomputation (no cache): an independent decode loop."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(hf_logits(model, [ids])[0, -1])))
    return ids[len(prompt):]


def assert_logits_close(actual, expected, what="logits", rtol=1e-5):
    """|a - b| <= rtol * max|b| everywhere.

    The issue asks for 1e-4; float32 agreement is ~1e-7 here, and 1e-5 is tight enough to
    tell exact GELU from its tanh approximation (they differ by ~7e-5 on the tiny Gemma).
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    err = np.abs(actual - expected)
    if not (err <= rtol * scale).all():
        i = np.unravel_index(np.argmax(err), err.shape)
        pytest.fail(f"{what}: max |diff| {err.max():.3g} > {rtol} * max|ref| ({scale:.3g}); "
                    f"worst at {i}: got {actual[i]!r}, want {expected[i]!r}")
