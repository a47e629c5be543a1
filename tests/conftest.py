import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# A quick, deterministic hypothesis profile for CI; HYPOTHESIS_PROFILE=thorough for more examples.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def tol(dtype):
    """(rtol, atol) by dtype for comparisons against a float64-exact reference."""
    return (1e-5, 1e-6) if np.dtype(dtype) == np.float32 else (1e-12, 1e-13)


def assert_close(actual, expected, dtype, what="result"):
    """atol + rtol*|ref| by dtype; prints the first mismatches (llm.c's validate_result)."""
    rtol, atol = tol(dtype)
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    if bad.any():
        idx = np.argwhere(bad)[:5]
        lines = [f"  at {tuple(i)}: got {actual[tuple(i)]!r}, want {expected[tuple(i)]!r}" for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.size} elements differ (rtol={rtol}, atol={atol})\n"
                    + "\n".join(lines))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
