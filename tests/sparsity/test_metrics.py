"""Sparsity metrics on constructed activations whose answers are known by hand."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minisparse.sparsity import metrics as M

DTYPES = [np.float32, np.float64]
shapes = st.tuples(st.sampled_from([1, 2, 7, 33]), st.sampled_from([1, 3, 7, 33, 64]))


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes, seed=st.integers(0, 10_000), share=st.floats(0, 1))
def test_exact_zero_fraction_counts_the_zeros_we_planted(dtype, shape, seed, share):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal(shape) + 3.0).astype(dtype)           # no accidental zeros
    k = int(share * h.size)
    idx = rng.choice(h.size, size=k, replace=False)
    h.ravel()[idx] = 0
    assert M.exact_zero_fraction(h) == k / h.size


def test_below_eps_by_hand():
    h = np.array([[0.0, 1e-4, -5e-3, 0.02], [-0.5, 2.0, 0.009, -0.011]])
    assert M.below_eps_fraction(h, 1e-3) == 2 / 8
    assert M.below_eps_fraction(h, 1e-2) == 4 / 8
    assert M.below_eps_fraction(h, 0.0) == 0.0
    with pytest.raises(ValueError, match="eps"):
        M.below_eps_fraction(h, -1)


def test_topk_by_hand():
    h = np.array([[0.1, -3.0, 2.0, 0.5], [4.0, 0.0, -0.2, 1.0]])
    assert M.topk_mask(h, 0.5).tolist() == [[False, True, True, False], [True, False, False, True]]
    assert M.topk_sparsify(h, 0.75).tolist() == [[0.0, -3.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]]
    assert M.topk_mask(h, 0.0).all() and not M.topk_mask(h, 1.0).any()
    assert M.topk_keep_count(344, 0.9) == 34 and M.topk_keep_count(10, 0.85) == 2
    with pytest.raises(ValueError, match="0.9"):
        M.topk_mask(h, 90)


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes, seed=st.integers(0, 10_000), s=st.sampled_from([0.0, 0.5, 0.8, 0.85, 0.9, 1.0]))
def test_topk_keeps_the_largest_per_token(dtype, shape, seed, s):
    h = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    m = M.topk_mask(h, s)
    N, F = shape
    k = int(round((1 - s) * F))
    assert (m.sum(axis=1) == k).all()
    a = np.abs(h)
    for i in range(N):
        if 0 < k < F:
            assert a[i][m[i]].min() >= a[i][~m[i]].max()
    out = M.topk_sparsify(h, s)
    assert out.dtype == h.dtype and (out[m] == h[m]).all() and (out[~m] == 0).all()


def test_cett_by_hand():
    # identity down projection, h = (3, 4, 12): ||y|| = 13; drop {3}: 3/13; drop {3, 4}: 5/13
    h, w = np.array([[3.0, 4.0, 12.0]]), np.eye(3)
    assert M.cett(h, w, 3.5) == pytest.approx(3 / 13)
    assert M.cett(h, w, 4.5) == pytest.approx(5 / 13)
    assert M.cett(h, w, 0.0) == 0.0
    t, s, c = M.cett_threshold(h, w, 0.25)
    assert (t, s, c) == (4.0, pytest.approx(1 / 3), pytest.approx(3 / 13))
    t, s, _ = M.cett_threshold(h, w, 0.4)
    assert (t, s) == (12.0, pytest.approx(2 / 3))
    t, s, _ = M.cett_threshold(h, w, 0.2)            # even the smallest neuron is too much:
    assert (t, s) == (3.0, 0.0)                      # t = 3 drops nothing (|h| < 3 holds for none)
    t, s, _ = M.cett_threshold(h, w, 1.0)
    assert t == np.inf and s == 1.0


def test_cett_ranks_by_output_norm_by_hand():
    # ReLU^2 Wins drops neurons by the norm of their output |h_f| * ||w_down[f]||.
    # Down rows of norms 1, 2, 0.25 and h = (3, 4, 12): outputs (3,0,0), (0,8,0), (0,0,3);
    # y = (3, 8, 3), ||y|| = sqrt(82). Ranking by |h| would drop 3 and 4 first; by output
    # norm the two of norm 3 go first (neurons 0 and 2), then neuron 1.
    w = np.diag([1.0, 2.0, 0.25])
    h = np.array([[3.0, 4.0, 12.0]])
    assert M.neuron_output_norms(h, w).tolist() == [[3.0, 8.0, 3.0]]
    assert M.cett_mask(h, w, 3.5).tolist() == [[False, True, False]]
    assert M.cett(h, w, 3.5) == pytest.approx(np.sqrt(18 / 82))       # 0.4685
    assert M.cett(h, w, 8.5) == pytest.approx(1.0)
    eps, s, c = M.cett_threshold(h, w, 0.5)
    assert (eps, s, c) == (8.0, pytest.approx(2 / 3), pytest.approx(np.sqrt(18 / 82)))
    eps, s, _ = M.cett_threshold(h, w, 0.3)           # dropping the norm-3 pair costs 0.47 > 0.3
    assert (eps, s) == (3.0, 0.0)
    # a rotation of the down rows changes nothing: only the row norms matter for the ranking
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    assert M.cett(h, w @ q, 3.5) == pytest.approx(np.sqrt(18 / 82))
    # per-neuron |h| thresholds equivalent to eps: eps / ||w_f||
    assert M.cett_h_thresholds(w, 8.0).tolist() == [8.0, 4.0, 32.0]
    assert M.cett_h_thresholds(np.zeros((2, 3)), 1.0).tolist() == [np.inf, np.inf]
    assert (np.abs(h) >= M.cett_h_thresholds(w, 3.5)).tolist() == M.cett_mask(h, w, 3.5).tolist()


def test_cett_two_tokens_and_a_zero_output():
    # token 2's output is zero (the neurons cancel): it has nothing to lose and scores 0
    w = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    h = np.array([[3.0, 0.0, 4.0], [1.0, -1.0, 0.0]])
    assert M.cett_per_token(h, w, 3.5).tolist() == pytest.approx([3 / 5, 0.0])
    # t = 3 drops token 2's (cancelling) neurons for free; t = 4 would cost token 1 3/5 -> mean 0.3
    t, s, _ = M.cett_threshold(h, w, 0.1)
    assert t == 3.0 and s == pytest.approx(4 / 6)   # exact zeros count as dropped


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.sampled_from([1, 3, 7]), F=st.sampled_from([2, 7, 16]), seed=st.integers(0, 1000),
       target=st.sampled_from([0.05, 0.2, 0.5]))
def test_cett_binary_search_matches_a_linear_scan(dtype, n, F, seed, target):
    # with orthogonal (scaled) down rows CETT is monotone in eps, so the largest feasible
    # threshold is the one a linear scan over the candidate output norms finds
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, F)).astype(dtype)
    q, _ = np.linalg.qr(rng.standard_normal((F, F)))
    w = rng.uniform(0.2, 3.0, size=(F, 1)) * q                     # row f has norm scale_f
    norms = M.neuron_output_norms(h, w)
    cands = np.append(np.unique(norms), np.inf)
    feasible = [t for t in cands if M.cett(h, w, t) <= target]
    t, s, c = M.cett_threshold(h, w, target)
    assert t == (max(feasible) if feasible else 0.0)
    assert c <= target + 1e-12
    assert s == pytest.approx(np.mean(norms < t) if t > 0 else 0.0)


def test_cett_rejects_bad_shapes():
    with pytest.raises(ValueError, match="neuron-major"):
        M.cett(np.ones((2, 3)), np.ones((4, 3)), 0.1)
    with pytest.raises(ValueError, match="target"):
        M.cett_threshold(np.ones((2, 3)), np.eye(3), 1.5)


def test_teal_threshold_by_hand():
    assert M.teal_threshold([[-4.0, 1.0, 2.0, -3.0]], 0.5) == 2.5
    assert M.teal_threshold([[-4.0, 1.0, 2.0, -3.0]], 0.0) == 0.0
    assert M.teal_thresholds({"a": np.array([1.0, 2.0, 3.0])}, 1.0) == {"a": 3.0}


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 1000), s=st.sampled_from([0.25, 0.5, 0.9]))
def test_teal_threshold_drops_the_target_share(dtype, seed, s):
    x = np.random.default_rng(seed).standard_normal((33, 64)).astype(dtype)
    t = M.teal_threshold(x, s)
    dropped = np.mean(M.threshold_sparsify(x, t) == 0)
    assert abs(dropped - s) <= 1.5 / x.size + 1e-9
