"""Each activation against its closed form, and its derivative against finite differences."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minisparse as ms
from minisparse import activations as A

PLAIN_CLOSED_FORM = {
    "relu": lambda x: max(x, 0.0),
    "silu": lambda x: x / (1 + math.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu2": lambda x: max(x, 0.0) ** 2,
    "identity": lambda x: x,
}
GATED_CLOSED_FORM = {
    "swiglu": lambda g, u: PLAIN_CLOSED_FORM["silu"](g) * u,
    "geglu": lambda g, u: PLAIN_CLOSED_FORM["gelu"](g) * u,
    "geglu_tanh": lambda g, u: PLAIN_CLOSED_FORM["gelu_tanh"](g) * u,
    "reglu": lambda g, u: max(g, 0.0) * u,
    "drelu": lambda g, u: max(g, 0.0) * max(u, 0.0),
    "relu2glu": lambda g, u: max(g, 0.0) ** 2 * u,
}


def _away_from_kinks(x):
    # finite differences are meaningless within eps of ReLU's kink at 0
    return np.where(np.abs(x) < 1e-3, x + 0.01, x)


def test_registry_lists_the_required_names():
    names = set(ms.list_activations())
    for n in ["relu", "gelu", "gelu_tanh", "silu", "relu2", "fatrelu", "swiglu", "geglu", "reglu", "drelu"]:
        assert n in names
    assert set(ms.list_activations(gated=True)) >= {"swiglu", "geglu", "reglu", "drelu"}
    assert "relu" not in ms.list_activations(gated=True)


def test_names_are_case_insensitive_and_aliases_resolve():
    assert ms.get_activation("DReLU").name == "drelu"
    assert ms.get_activation(" SwiGLU ").name == "swiglu"
    assert ms.get_activation("gelu_pytorch_tanh").name == "gelu_tanh"


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="unknown activation 'nope'.*drelu"):
        ms.get_activation("nope")
    with pytest.raises(TypeError):
        ms.get_activation(3)
    with pytest.raises(ValueError, match="not a number"):
        ms.get_activation("fatrelu:abc")
    with pytest.raises(ValueError, match="only applies to ReLU"):
        ms.get_activation("swiglu:0.1")


@pytest.mark.parametrize("name", sorted(PLAIN_CLOSED_FORM))
def test_plain_matches_closed_form(name):
    x = np.linspace(-6, 6, 1001)
    act = ms.get_activation(name)
    want = np.array([PLAIN_CLOSED_FORM[name](v) for v in x])
    np.testing.assert_allclose(act(x), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(GATED_CLOSED_FORM))
def test_gated_matches_closed_form(name, rng):
    g, u = rng.normal(0, 2, 500), rng.normal(0, 2, 500)
    act = ms.get_activation(name)
    assert act.gated
    want = np.array([GATED_CLOSED_FORM[name](a, b) for a, b in zip(g, u)])
    np.testing.assert_allclose(act(g, u), want, rtol=1e-12, atol=1e-14)


def test_erf_is_exact_to_float64():
    x = np.linspace(-7, 7, 20001)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(A._erf(x) - want).max() < 1e-15


@pytest.mark.parametrize("name", ms.list_activations())
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40))
def test_derivative_matches_finite_differences(name, seed, n):
    act = ms.get_activation(name)
    r = np.random.default_rng(seed)
    g = _away_from_kinks(r.normal(0, 2, n))
    u = _away_from_kinks(r.normal(0, 2, n)) if act.gated else None
    dh = r.normal(0, 1, n)
    dg, du = act.backward(dh, g, u)
    eps = 1e-6
    fd_g = (act(g + eps, u) - act(g - eps, u)) / (2 * eps) * dh
    np.testing.assert_allclose(dg, fd_g, rtol=1e-6, atol=1e-8)
    if act.gated:
        fd_u = (act(g, u + eps) - act(g, u - eps)) / (2 * eps) * dh
        np.testing.assert_allclose(du, fd_u, rtol=1e-6, atol=1e-8)
    else:
        assert du is None


def test_relu_family_gives_exact_zeros_and_swiglu_does_not(rng):
    g, u = rng.normal(size=10_000), rng.normal(size=10_000)
    assert np.mean(ms.get_activation("drelu")(g, u) == 0) > 0.7   # ~75% for independent N(0,1)
    assert np.mean(ms.get_activation("reglu")(g, u) == 0) > 0.45
    assert np.mean(ms.get_activation("swiglu")(g, u) == 0) == 0.0
    assert np.mean(ms.get_activation("geglu")(g, u) == 0) == 0.0


def test_fatrelu_threshold():
    act = ms.get_activation("fatrelu:0.5")
    x = np.array([-1.0, 0.2, 0.5, 0.6, 2.0])
    np.testing.assert_array_equal(act(x), [0, 0, 0.5, 0.6, 2.0])        # x >= t kept (Kurtz et al. 2020)
    np.testing.assert_array_equal(act.backward(np.ones(5), x)[0], [0, 0, 1, 1, 1])
    d = ms.get_activation("drelu:0.5")
    assert d.threshold == 0.5 and d.gated
    np.testing.assert_array_equal(d(np.array([0.6, 0.6, 0.4]), np.array([0.6, 0.4, 0.6])), [0.36, 0, 0])


def test_float32_stays_float32(rng):
    x = rng.normal(size=100).astype(np.float32)
    for name in ms.list_activations():
        act = ms.get_activation(name)
        y = act(x, x) if act.gated else act(x)
        assert y.dtype == np.float32, name
        dg, du = act.backward(x, x, x if act.gated else None)
        assert dg.dtype == np.float32, name


def test_register_custom_activations():
    ms.register_activation("test_softplus", lambda x: np.logaddexp(0, x), lambda x: 1 / (1 + np.exp(-x)),
                           overwrite=True)
    ms.register_gated("test_softglu", "test_softplus", "identity", overwrite=True)
    act = ms.get_activation("Test_SoftGLU")
    g, u = np.array([0.0, 1.0]), np.array([2.0, 3.0])
    np.testing.assert_allclose(act(g, u), np.logaddexp(0, g) * u)
    with pytest.raises(ValueError, match="already registered"):
        ms.register_activation("relu", np.abs, np.sign)
    with pytest.raises(KeyError, match="unknown plain activation"):
        ms.register_gated("bad_glu", "nonexistent")
    # a model can use it
    cfg = ms.ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=8, activation="test_softglu", max_seq_len=8)
    assert ms.Transformer(cfg)(np.array([[1, 2]])).shape == (1, 2, 258)
