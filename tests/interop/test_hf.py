"""minisparse.load_hf / save_hf against transformers: outside truth for the whole model.

For each architecture a tiny random model is built *with transformers*, saved with
``save_pretrained``, loaded by minisparse, and compared: logits to 1e-4 of their scale,
20 greedy tokens identical, and ``save_hf`` -> transformers reproduces the logits.
"""
import json
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
ml_dtypes = pytest.importorskip("ml_dtypes")

import minisparse as ms  # noqa: E402
from minisparse.hf import HFFormatError  # noqa: E402

from helpers import tiny_tokenizer  # noqa: E402
from hf_helpers import (HAVE_MOE, MOE_REASON, PROMPT, assert_logits_close, build_hf,  # noqa: E402
                       hf_greedy, hf_logits)

KINDS = ["llama", "llama_tied_mha", "mistral", "gemma", "qwen2",
         pytest.param("mixtral", marks=pytest.mark.skipif(not HAVE_MOE, reason=MOE_REASON))]


def _saved(kind, tmp_path, **kw):
    m = build_hf(kind, **kw)
    folder = tmp_path / kind
    m.save_pretrained(folder)
    return m, folder


def _load_hf_quiet(model_cls_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            model_cls_path, dtype=torch.float32, attn_implementation="eager").eval()


# ======================================================================================
# every architecture: logits, greedy decoding, round trip
# ======================================================================================
@pytest.mark.parametrize("kind", KINDS)
def test_logits_greedy_and_round_trip(kind, tmp_path):
    hf, folder = _saved(kind, tmp_path)
    model = ms.load_hf(folder)
    cfg = model.config
    # the config mapping, checked against the transformers config (not against itself)
    hc = hf.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (
        hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads,
        hc.intermediate_size, hc.vocab_size)
    assert cfg.tie_embeddings == bool(hc.tie_word_embeddings)
    assert ("output" in model.params) == (not hc.tie_word_embeddings)

    tokens = np.array([PROMPT, PROMPT[::-1]])                          # (2, 7)
    ref = hf_logits(hf, tokens)
    assert_logits_close(model(tokens), ref, f"{kind} logits")

    want = hf_greedy(hf, PROMPT, 20)
    got = ms.generate(model, PROMPT, max_new_tokens=20, temperature=0)
    assert got == want, f"{kind}: greedy tokens differ:\n minisparse   {got}\n transformers {want}"

    out = tmp_path / f"{kind}-roundtrip"
    # the architecture is chosen from the config (Mistral's math is Llama's: it defaults to
    # LlamaForCausalLM); architecture= overrides it
    arch = "MistralForCausalLM" if kind == "mistral" else None
    ms.save_hf(model, out, architecture=arch)
    hf2 = _load_hf_quiet(out)
    assert type(hf2).__name__ == type(hf).__name__
    assert_logits_close(hf_logits(hf2, tokens), ref, f"{kind} save_hf -> transformers logits")
    # and back into minisparse, bit for bit
    again = ms.load_hf(out)
    for k, v in model.params.items():
        np.testing.assert_array_equal(again.params[k], v, err_msg=k)


@pytest.mark.skipif(not HAVE_MOE, reason=MOE_REASON)
def test_mixtral_fused_expert_layout(tmp_path):
    """transformers 5 holds experts fused in memory (mlp.experts.gate_up_proj (E, 2F, D),
    mlp.experts.down_proj (E, D, F)); save_pretrained writes the per-expert names, but a
    state_dict saved as is has the fused ones: both load."""
    hf, folder = _saved("mixtral", tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd, sorted(sd)[:8]
    (folder / "model.safetensors").unlink()
    from safetensors.torch import save_file
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = ms.load_hf(folder)
    assert_logits_close(model(np.array([PROMPT])), hf_logits(hf, [PROMPT]), "mixtral fused-layout logits")


@pytest.mark.parametrize("kind", ["gemma", "qwen2"])
def test_float64_load(kind, tmp_path):
    hf, folder = _saved(kind, tmp_path)
    model = ms.load_hf(folder, dtype=np.float64)
    assert model.dtype == np.float64
    assert_logits_close(model(np.array([PROMPT])), hf_logits(hf, [PROMPT]), f"{kind} float64 logits")


def test_sharded_checkpoint(tmp_path):
    hf = build_hf("llama")
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert (folder / "model.safetensors.index.json").is_file() and len(shards) > 2, shards
    model = ms.load_hf(folder)
    assert_logits_close(model(np.array([PROMPT])), hf_logits(hf, [PROMPT]), "sharded logits")
    # a shard named in the index but absent: a clear error naming it
    shards[1].unlink()
    with pytest.raises(HFFormatError, match=shards[1].name):
        ms.load_hf(folder)


@pytest.mark.parametrize("torch_dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
@pytest.mark.parametrize("kind", ["qwen2", pytest.param("mixtral", marks=pytest.mark.skipif(not HAVE_MOE, reason=MOE_REASON))])
def test_half_precision_files(kind, torch_dtype, name, tmp_path):
    import copy
    hf = build_hf(kind)
    with torch.no_grad():                            # float32 reference holding the rounded weights
        for p in hf.parameters():
            p.copy_(p.to(torch_dtype).to(torch.float32))
    folder = tmp_path / "half"
    # (a deep copy: Module.to() is in place, and it would round the rotary buffers too)
    copy.deepcopy(hf).to(torch_dtype).save_pretrained(folder)
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {name}
    model = ms.load_hf(folder)                       # widened to float32 through ml_dtypes
    assert model.dtype == np.float32
    assert_logits_close(model(np.array([PROMPT])), hf_logits(hf, [PROMPT]), f"{kind} {name} logits")


@pytest.mark.parametrize("kind", ["llama", pytest.param("mixtral", marks=pytest.mark.skipif(not HAVE_MOE, reason=MOE_REASON))])
def test_load_memory_at_most_one_extra_tensor(kind, tmp_path):
    """Peak traced memory while loading <= the final parameters + one (the largest) tensor."""
    import tracemalloc
    hf = build_hf(kind, hidden_size=128, intermediate_size=256, vocab_size=512).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "m")
    ms.load_hf(tmp_path / "m")                     # warm up imports and caches outside the trace
    tracemalloc.start()
    try:
        model = ms.load_hf(tmp_path / "m")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(a.nbytes for a in model.params.values())
    largest = max(a.nbytes for a in model.params.values())
    assert peak - total <= largest, (f"loading held {peak - total} bytes beyond the parameters "
                                     f"({total}); the largest tensor is {largest}")


def test_save_hf_bfloat16(tmp_path):
    hf, folder = _saved("llama", tmp_path)
    model = ms.load_hf(folder)
    out = tmp_path / "bf16"
    ms.save_hf(model, out, dtype="bfloat16")
    back = ms.load_hf(out)
    for k, v in model.params.items():   # exactly the bfloat16 rounding of each weight
        np.testing.assert_array_equal(back.params[k], v.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
    hf2 = _load_hf_quiet(out)
    assert_logits_close(hf_logits(hf2, [PROMPT]), back(np.array([PROMPT])), "bf16 save_hf -> transformers")


# ======================================================================================
# activations transformers cannot express; dReLU checkpoints
# ======================================================================================
@pytest.mark.parametrize("activation", ["drelu", "reglu:0.05", "relu"])
def test_save_hf_unsupported_activation_round_trip(activation, tmp_path):
    model = ms.Transformer(ms.preset("nano", activation=activation, tie_embeddings=False), seed=3)
    with pytest.warns(UserWarning, match="stock transformers cannot run it"):
        ms.save_hf(model, tmp_path / "m")
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    assert d["minisparse_activation"] == activation
    back = ms.load_hf(tmp_path / "m")
    assert back.config.activation == activation
    toks = np.array([[256, 1, 2, 3, 200]])
    np.testing.assert_array_equal(back(toks), model(toks))


def test_save_hf_expressible_activations_have_no_marker(tmp_path):
    for act, hidden in (("swiglu", "silu"), ("reglu", "relu"), ("geglu_tanh", "gelu_pytorch_tanh"),
                        ("relu2glu", "relu2")):
        model = ms.Transformer(ms.preset("nano", activation=act), seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ms.save_hf(model, tmp_path / act)
        d = json.loads((tmp_path / act / "config.json").read_text())
        assert d["hidden_act"] == hidden and "minisparse_activation" not in d


def test_turbosparse_bamboo_is_drelu(tmp_path):
    """TurboSparse-Mistral's config: BambooForCausalLM + hidden_act relu, predictors merged in."""
    hf, folder = _saved("mistral", tmp_path, hidden_act="relu")
    d = json.loads((folder / "config.json").read_text())
    d.update(architectures=["BambooForCausalLM"], model_type="bamboo")
    (folder / "config.json").write_text(json.dumps(d))
    # add predictor tensors the way the release ships them
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.predictor.fc1.weight"] = np.zeros((4, 32), np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="predictor"):
        model = ms.load_hf(folder)
    assert model.config.activation == "drelu"
    # outside truth: transformers' Mistral with its MLP patched to Bamboo's dReLU forward
    relu = torch.nn.functional.relu
    for layer in hf.model.layers:
        mlp = layer.mlp
        mlp.forward = (lambda mlp: lambda x: mlp.down_proj(relu(mlp.gate_proj(x)) * relu(mlp.up_proj(x))))(mlp)
    assert_logits_close(model(np.array([PROMPT])), hf_logits(hf, [PROMPT]), "dReLU (Bamboo) logits")


# ======================================================================================
# clear errors
# ======================================================================================
def test_error_unsupported_architecture(tmp_path):
    _, folder = _saved("llama", tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(HFFormatError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*MixtralForCausalLM"):
        ms.load_hf(folder)


def test_error_missing_config(tmp_path):
    _, folder = _saved("llama", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ms.load_hf(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_error_corrupt_safetensors(damage, tmp_path):
    _, folder = _saved("llama", tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) - 1000])
    elif damage == "garbage_header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        f.write_bytes(b"")
    with pytest.raises(HFFormatError, match=r"model\.safetensors.*(truncated|corrupt)"):
        ms.load_hf(folder)


def _rewrite(folder, change):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_error_missing_tensor(tmp_path):
    _, folder = _saved("qwen2", tmp_path)
    _rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(HFFormatError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        ms.load_hf(folder)


def test_error_extra_tensor(tmp_path):
    _, folder = _saved("llama", tmp_path)
    _rewrite(folder, lambda t: t.__setitem__("model.layers.0.mlp.surprise.weight", np.zeros(3, np.float32)))
    with pytest.raises(HFFormatError, match=r"model\.layers\.0\.mlp\.surprise\.weight"):
        ms.load_hf(folder)
    with pytest.warns(UserWarning, match="surprise"):
        ms.load_hf(folder, strict=False)


def test_error_shape_mismatch(tmp_path):
    _, folder = _saved("llama", tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d["intermediate_size"] = 40                       # the files hold 48
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(HFFormatError, match=r"mlp\.gate_proj\.weight.*expected shape \(40, 32\).*found \(48, 32\)"):
        ms.load_hf(folder)


def test_rope_scaling_refused_and_max_seq_len(tmp_path):
    _, folder = _saved("mistral", tmp_path)
    assert ms.load_hf(folder).config.max_seq_len == 48            # capped at the sliding window
    with pytest.warns(UserWarning, match="sliding window"):
        assert ms.load_hf(folder, max_seq_len=60).config.max_seq_len == 60
    d = json.loads((folder / "config.json").read_text())
    d["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(HFFormatError, match="llama3"):
        ms.load_hf(folder)


def test_save_hf_refuses_inexpressible_config(tmp_path):
    model = ms.Transformer(ms.preset("nano", norm_offset=True), seed=0)   # offset norm without Gemma's scale
    with pytest.raises(ValueError, match="norm_offset"):
        ms.save_hf(model, tmp_path / "x")


# ======================================================================================
# tokenizer.json
# ======================================================================================
def test_load_tokenizer_from_model_folder(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    t = ms.load_tokenizer(tmp_path)
    assert t.bos_id == tok.token_to_id("<s>") and t.eos_id == tok.token_to_id("</s>")
    ids = t.encode("the cat sat", eos=True)
    assert ids[0] == t.bos_id and ids[-1] == t.eos_id
    assert ids[1:-1] == tok.encode("the cat sat").ids
    assert t.decode(ids) == "the cat sat"


# ======================================================================================
# config.json mapping details (no weights needed)
# ======================================================================================
def _cfg(**kw):
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 24}
    return {**base, **kw}


@pytest.mark.parametrize("d,activation", [
    (_cfg(hidden_act="silu"), "swiglu"),
    (_cfg(hidden_act="gelu_new"), "geglu_tanh"),
    (_cfg(hidden_act="gelu"), "geglu"),
    (_cfg(hidden_act="relu"), "reglu"),                                   # stock arch: what transformers runs
    (_cfg(hidden_act="relu2"), "relu2glu"),
    (_cfg(architectures=["GemmaForCausalLM"], hidden_act="gelu"), "geglu_tanh"),   # legacy Gemma spelling
    (_cfg(architectures=["GemmaForCausalLM"], hidden_act="gelu", hidden_activation="gelu_pytorch_tanh"), "geglu_tanh"),
    (_cfg(architectures=["BambooForCausalLM"], hidden_act="relu"), "drelu"),
    (_cfg(hidden_act="relu", minisparse_activation="drelu:0.1"), "drelu:0.1"),
])
def test_config_activation_mapping(d, activation):
    from minisparse.hf import config_from_hf
    assert config_from_hf(d)[0].activation == activation


def test_config_fields():
    from minisparse.hf import config_from_hf
    cfg, arch, fam = config_from_hf(_cfg(architectures=["Qwen2ForCausalLM"], num_key_value_heads=1, head_dim=12,
                                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                         max_position_embeddings=32768, tie_word_embeddings=True,
                                         sliding_window=4096, use_sliding_window=False))
    assert (arch, fam) == ("Qwen2ForCausalLM", "qwen2")
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings, cfg.qkv_bias) == (
        1, 12, 1e-6, 1e6, True, True)
    assert cfg.max_seq_len == 4096                                        # capped: the KV cache is sized by it
    assert config_from_hf(_cfg(rope_theta=5e5), max_seq_len=100)[0].max_seq_len == 100
    assert config_from_hf(_cfg(rope_theta=5e5))[0].rope_theta == 5e5
    with pytest.raises(HFFormatError, match="hidden_act 'tanh'"):
        config_from_hf(_cfg(hidden_act="tanh"))
    with pytest.raises(HFFormatError, match="attention_bias"):
        config_from_hf(_cfg(attention_bias=True))
