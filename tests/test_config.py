import pytest

import minisparse as ms
from minisparse import ModelConfig


def test_defaults_resolve():
    c = ModelConfig(dim=64, n_heads=8)
    assert c.head_dim == 8 and c.n_kv_heads == 8
    assert ModelConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs, field", [
    (dict(dim=65, n_heads=4), "n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(activation="swishy"), "activation"),
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_experts=4, top_k=0), "top_k"),
    (dict(n_experts=-1), "n_experts"),
    (dict(dim=0), "dim"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(head_dim=7, dim=28, n_heads=4), "head_dim"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(router="random"), "router"),
    (dict(n_experts=0, moe_layers=(0,)), "moe_layers"),
    (dict(n_layers=2, n_experts=2, moe_layers=(5,)), "moe_layers"),
    (dict(capacity_factor=0.0), "capacity_factor"),
])
def test_impossible_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


def test_head_dim_apart_from_dim():
    c = ModelConfig(dim=48, n_heads=4, head_dim=16)   # Gemma-style: H*Dh != D
    m = ms.Transformer(c)
    assert m.params["layers.0.attention.wq"].shape == (48, 64)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"dim": 8, "n_head": 2})


def test_presets():
    assert ms.preset("nano").dim == 64
    assert ms.preset("tiny-moe").n_experts == 8
    assert ms.preset("TINY", activation="drelu").activation == "drelu"
    with pytest.raises(ValueError, match="unknown preset"):
        ms.preset("huge")
    assert ModelConfig(n_experts=4, n_layers=3, moe_layers=[0, 2]).is_moe_layer(2)
    assert not ModelConfig(n_experts=4, n_layers=3, moe_layers=[0, 2]).is_moe_layer(1)


def test_frozen():
    c = ModelConfig()
    with pytest.raises(Exception):
        c.dim = 3
