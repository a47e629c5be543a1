import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from helpers import assert_close, tol  # noqa: F401  (tests import them from helpers)

# A quick, deterministic hypothesis profile for CI; HYPOTHESIS_PROFILE=thorough for more examples.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
