"""Every tutorial runs, in quick mode, and its closing asserts hold.

Each ``tutorials/NN_*.py`` is executed as a script in a fresh subprocess with
``MINISPARSE_QUICK=1`` (smaller models, fewer steps) and matplotlib's non-interactive
``Agg`` backend, from a temporary working directory. A tutorial that raises, fails an
assert, or runs past its time limit fails the test; its last output lines are shown.
Without a display, each figure must be saved under runs/tutorials/ in the working directory
(ignored by git), and its path printed.

The docs show the same tutorials executed in full mode (docs/scripts/execute_tutorials.py);
tests/test_docs.py checks that those notebooks match these sources.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))

# seconds per tutorial in quick mode: generous against a loaded 2-core CI machine; quick
# mode aims at < 60 s (see the run times recorded in docs/tutorials/index.md)
TIMEOUT = int(os.environ.get("MINISPARSE_TUTORIAL_TIMEOUT", "420"))

pytestmark = pytest.mark.tutorial


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 7, [p.name for p in TUTORIALS]


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_quick_mode(path, tmp_path):
    env = dict(os.environ, MINISPARSE_QUICK="1", MPLBACKEND="Agg")
    # the tutorials' matrices are small: one BLAS thread is faster, and on a busy 2-core
    # machine multi-threaded BLAS can be many times slower (threads waiting for each other)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:]
        pytest.fail(f"{path.name} did not finish in quick mode within {TIMEOUT} s; last output:\n{out!r}")
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-4000:])
        pytest.fail(f"{path.name} failed (exit {proc.returncode}) after {dt:.0f} s:\n{tail}")
    assert "all checks passed" in proc.stdout, f"{path.name} ended without its closing checks:\n{proc.stdout[-2000:]}"
    # run as a script without a display, each figure is saved under runs/tutorials/ and its path printed
    figures = re.findall(r'^\s*show_figure\("([^"]+)"\)', path.read_text(), flags=re.M)
    if path.name.startswith("06_") and importlib.util.find_spec("numba") is None:
        figures = []                                   # tutorial 6 plots the numba timings only
    for name in figures:
        png = tmp_path / "runs" / "tutorials" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000, f"{path.name} did not save {png.name}"
        assert f"figure saved to {png}" in proc.stdout, f"{path.name} did not say where {png.name} went"
    print(f"{path.name}: {dt:.1f} s")
