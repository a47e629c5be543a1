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


@pytest.fixture(autouse=True)
def _training_threads_do_not_leak():
    """A test that runs the CLI (its --threads calls set_training_threads) must not make
    later tests' train() split their batches: restore minisparse.runtime's choices."""
    from minisparse import runtime
    names = ("_EXPLICIT_BLAS_THREADS", "_EXPLICIT_TRAIN_WORKERS", "_TRAIN_WORKERS")
    saved = {n: getattr(runtime, n) for n in names}
    yield
    for n, v in saved.items():
        setattr(runtime, n, v)


# --------------------------------------------------------------------------------------
# skip summary: a backend that cannot run here skips many tests for one reason; say the
# reason on one line and its install hint once, not the same long hint for every location
# --------------------------------------------------------------------------------------
_INSTALL = " Install it with: "
_HINTS: dict = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        reason = str(rep.longrepr[2])
        if _INSTALL in reason:
            short, _, hint = reason.partition(_INSTALL)
            _HINTS[short.rstrip(".")] = hint
            rep.longrepr = (os.path.dirname(__file__), None, f"{short.rstrip('.')} (install hint in the summary)")


def pytest_terminal_summary(terminalreporter):
    for short, hint in _HINTS.items():
        label = short.removeprefix("Skipped: ").split(":")[0]
        terminalreporter.write_line(f"install hint ({label}): {hint}")
