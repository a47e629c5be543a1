"""minisparse.runtime: the process defaults the library makes, and explicit settings winning."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SPIN = textwrap.dedent("""
    import os, sys, time
    {first}
    import numpy as np
    import minisparse as ms
    a = np.random.default_rng(0).random((600, 600))
    burnt = []
    for _ in range(4):
        a @ a
        c0 = time.process_time(); time.sleep(0.03); burnt.append(time.process_time() - c0)
    print(min(burnt), ms.runtime.describe()["openblas_thread_timeout"])
""")


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "MINISPARSE_DEFAULT_RUNTIME")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _openblas():
    np = pytest.importorskip("numpy")
    cfg = str(np.show_config(mode="dicts")).lower() if hasattr(np, "show_config") else ""
    if "openblas" not in cfg or (os.cpu_count() or 1) < 2:
        pytest.skip("needs NumPy with OpenBLAS and >= 2 cores")


@pytest.mark.parametrize("first", ["", "import numpy"], ids=["minisparse-first", "numpy-first"])
def test_openblas_workers_do_not_spin_after_a_call(first):
    """OpenBLAS's idle workers busy-wait ~0.1 s by default; minisparse makes them sleep,
    whichever of numpy and minisparse is imported first (CPU time burnt while sleeping)."""
    _openblas()
    burnt, how = _run(SPIN.format(first=first)).split(" ", 1)
    assert float(burnt) < 0.005, (burnt, how)
    assert how.startswith("4 (minisparse default")


def test_an_explicit_setting_wins():
    _openblas()
    out = _run(SPIN.format(first=""), OPENBLAS_THREAD_TIMEOUT="28")
    assert out.endswith("28 (set by you)")
    out = _run("import minisparse as ms; print(ms.runtime.describe())", MINISPARSE_DEFAULT_RUNTIME="1")
    assert "MINISPARSE_DEFAULT_RUNTIME set" in out


def test_numba_threads_start_passive_and_leave_the_environment_alone():
    pytest.importorskip("numba")
    out = _run("import os, minisparse as ms\nfrom minisparse.kernels import get_backend\nget_backend('numba')\n"
               "print(os.environ.get('OMP_WAIT_POLICY'), '|', ms.runtime.describe()['numba_threads'])")
    assert out.startswith("None |") and "PASSIVE" in out
    out = _run("import minisparse as ms\nfrom minisparse.kernels import get_backend\nget_backend('numba')\n"
               "print(ms.runtime.describe()['numba_threads'])", NUMBA_THREADING_LAYER="workqueue")
    assert "set by you" in out


def test_training_threads_default_and_explicit(monkeypatch):
    from minisparse import runtime
    monkeypatch.setattr(runtime, "_EXPLICIT_BLAS_THREADS", None)
    monkeypatch.setattr(runtime, "_EXPLICIT_TRAIN_WORKERS", None)
    for v in runtime._BLAS_THREAD_VARS:
        monkeypatch.delenv(v, raising=False)
    d = runtime.configure_training()
    assert "free cores" in d["blas_threads"] or "no settable BLAS" in d["blas_threads"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "set by you" in runtime.configure_training()["blas_threads"]
    runtime.set_blas_threads(os.cpu_count() or 1)
    assert "set_blas_threads" in runtime.configure_training()["blas_threads"]
    with pytest.raises(ValueError):
        runtime.set_blas_threads(0)


def test_numba_thread_count_by_load_unless_set():
    pytest.importorskip("numba")
    code = ("import minisparse as ms, numba\nfrom minisparse.kernels import get_backend\nget_backend('numba')\n"
            "print(numba.get_num_threads(), '|', ms.runtime.describe()['numba_thread_count'])")
    n, how = _run(code).split(" | ")
    assert 1 <= int(n) <= (os.cpu_count() or 1) and "load average" in how
    n, how = _run(code, NUMBA_NUM_THREADS="1").split(" | ")
    assert n == "1" and "set by you" in how
