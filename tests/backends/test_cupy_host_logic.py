"""The CuPy backend's host logic without a GPU: ``ffn_device`` and ``sparse_ffn(backend="cupy")``
through a NumPy stand-in for CuPy whose ``ffn_fused`` is emulated in NumPy (fakecupy/).
Plans, caches, token tiles, masks, out buffers and stats are checked against the float64
reference on awkward shapes (1, 7, 33, 40 x 130 with 19 tokens) for every weight/x dtype
pair. Skipped where real CuPy is installed (test_gpu_kernels.py runs the real kernels)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_host_logic_against_the_reference_through_an_emulated_kernel():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("real CuPy is installed: test_gpu_kernels.py covers this on a GPU")
    root = os.path.dirname(os.path.dirname(HERE))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(HERE, "fakecupy", "check_host_logic.py")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.startswith("ok 60 cases"), out.stdout
    assert int(out.stdout.split()[3]) > 0, out.stdout                 # the given-mask path ran
