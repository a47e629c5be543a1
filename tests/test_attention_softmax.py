"""The two softmax paths of the attention core, and float32 against a float64 loop.

``attention_core_forward`` skips the row-max shift when the Cauchy-Schwarz bound on the
scores says ``exp`` cannot overflow (:func:`minisparse.layers._exp_needs_shift`), and
keeps the probabilities unnormalised (dividing the output instead). Both paths are checked
here: small q, k (no shift) and large ones (scores of several hundred: shift), forward
against a per-query loop and backward against central finite differences in float64.
"""
import numpy as np
import pytest

from minisparse import layers as L

from test_gradients import check, naive_attention


@pytest.mark.parametrize("scale, shifted", [(1.0, False), (30.0, True)])
@pytest.mark.parametrize("B, K, rep, T, Dh, q_start, block", [(1, 1, 1, 1, 1, 0, 64), (2, 2, 2, 7, 5, 0, 3),
                                                               (1, 3, 1, 33, 4, 3, 8), (2, 1, 4, 9, 2, 0, 1)])
def test_attention_core_both_softmax_paths(B, K, rep, T, Dh, q_start, block, scale, shifted):
    rng = np.random.default_rng(T * 7 + Dh)
    H, S = K * rep, q_start + T
    q = rng.standard_normal((B, H, T, Dh)) * scale
    k = rng.standard_normal((B, K, S, Dh)) * scale
    v = rng.standard_normal((B, K, S, Dh))
    R = rng.standard_normal((B, H, T, Dh))
    assert L._exp_needs_shift(q / np.sqrt(Dh), k) == shifted
    out, cache = L.attention_core_forward(q, k, v, q_start, block=block)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, naive_attention(q, k, v, q_start), rtol=1e-10, atol=1e-12)
    if shifted:
        return          # at scores of hundreds the softmax saturates: finite differences say nothing

    def f():
        return float(np.sum(L.attention_core_forward(q, k, v, q_start, block=block)[0] * R))

    dq, dk, dv = L.attention_core_backward(R, cache)
    for name, x, g in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
        check(f, x, g, rng, f"attention core {name}")


def test_attention_core_shifted_backward_matches_unshifted_formula():
    """Scores near 230 (every key has a large common component along the queries' axis 0)
    need the shift, but their differences are O(1): the softmax is not saturated and the
    backward can be checked by finite differences."""
    rng = np.random.default_rng(0)
    B, H, K, T, Dh = 1, 2, 1, 6, 3
    q = rng.standard_normal((B, H, T, Dh))
    q[..., 0] = 1.0                                   # every query has component 1 along axis 0
    k = rng.standard_normal((B, K, T, Dh))
    k[..., 0] += 400.0                                # every score gains 400 / sqrt(Dh): shift needed
    v = rng.standard_normal((B, K, T, Dh))
    R = rng.standard_normal((B, H, T, Dh))
    assert L._exp_needs_shift(q / np.sqrt(Dh), k)
    out, cache = L.attention_core_forward(q, k, v, block=4)
    np.testing.assert_allclose(out, naive_attention(q, k, v, 0), rtol=1e-10, atol=1e-12)

    def f():
        return float(np.sum(L.attention_core_forward(q, k, v, block=4)[0] * R))

    dq, dk, dv = L.attention_core_backward(R, cache)
    for name, x, g in (("dq", q, dq), ("dv", v, dv)):
        check(f, x, g, rng, f"attention core, shifted softmax, {name}")


@pytest.mark.parametrize("block", [1, 5, 64])
def test_attention_core_float32_close_to_float64(block):
    rng = np.random.default_rng(1)
    B, K, rep, T, Dh = 2, 2, 2, 33, 8
    q = rng.standard_normal((B, K * rep, T, Dh))
    k = rng.standard_normal((B, K, T, Dh))
    v = rng.standard_normal((B, K, T, Dh))
    R = rng.standard_normal((B, K * rep, T, Dh))
    ref = naive_attention(q, k, v, 0)
    f32 = [a.astype(np.float32) for a in (q, k, v)]
    out, cache = L.attention_core_forward(*f32, block=block)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    out64, cache64 = L.attention_core_forward(q, k, v, block=block)
    for g32, g64 in zip(L.attention_core_backward(R.astype(np.float32), cache),
                        L.attention_core_backward(R, cache64)):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("heads, Dh, T", [(1, 2, 1), (3, 4, 7), (2, 8, 33)])
def test_rotate_pairs_equals_rope_in_the_pair_layout(dtype, heads, Dh, T):
    """The complex rotation of the pair layout is rope_forward with coordinates permuted,
    its inverse is rope_backward, and _from_pairs undoes _to_pairs."""
    rng = np.random.default_rng(Dh * T)
    B = 2
    x = rng.standard_normal((B, T, heads * Dh)).astype(dtype)
    cos, sin = L.rope_tables(Dh, T, 10000.0, dtype)
    np.testing.assert_array_equal(L._from_pairs(L._to_pairs(x, heads), heads), x)
    heads_first = lambda a: a.reshape(B, T, heads, Dh).transpose(0, 2, 1, 3)   # noqa: E731
    ref = L.rope_forward(heads_first(x), cos, sin)                 # (B, heads, T, Dh), rotate-half layout
    got = L._rotate_pairs(L._to_pairs(x, heads), cos, sin, heads)
    assert got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(heads_first(L._from_pairs(got, heads)), ref, **tol)
    back = L._rotate_pairs(L._to_pairs(x, heads), cos, sin, heads, inverse=True)
    np.testing.assert_allclose(heads_first(L._from_pairs(back, heads)), L.rope_backward(heads_first(x), cos, sin), **tol)


def test_attention_core_prescaled_queries():
    """scale=1.0 on queries already multiplied by 1/sqrt(Dh) gives the same output, and the
    backward's dq is the gradient of the scaled queries (the default's dq times sqrt(Dh))."""
    rng = np.random.default_rng(3)
    B, H, K, T, Dh = 2, 4, 2, 9, 6
    q, R = rng.standard_normal((B, H, T, Dh)), rng.standard_normal((B, H, T, Dh))
    k, v = rng.standard_normal((B, K, T, Dh)), rng.standard_normal((B, K, T, Dh))
    out, cache = L.attention_core_forward(q, k, v, block=4)
    out1, cache1 = L.attention_core_forward(q / np.sqrt(Dh), k, v, block=4, scale=1.0)
    np.testing.assert_allclose(out1, out, rtol=1e-13, atol=1e-14)
    (dq, dk, dv), (dq1, dk1, dv1) = L.attention_core_backward(R, cache), L.attention_core_backward(R, cache1)
    np.testing.assert_allclose(dq1, dq * np.sqrt(Dh), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dk1, dk, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dv1, dv, rtol=1e-12, atol=1e-13)
