"""The backend registry: explicit names, clear errors, and never a silent fallback."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import minisparse as ms
import minisparse.kernels as K
from minisparse.kernels.testing import make_ffn


@pytest.fixture
def fresh_registry(monkeypatch):
    """Forget imported backends, so that a monkeypatched import is seen."""
    monkeypatch.setattr(K, "_LOADED", {})
    return monkeypatch


def _block_import(monkeypatch, module_name):
    real = importlib.import_module

    def fake(name, *a, **kw):
        if name == module_name:
            raise ImportError(f"No module named {module_name.rsplit('.', 1)[-1]!r} (simulated)")
        return real(name, *a, **kw)

    monkeypatch.setattr(K, "import_module", fake)


def test_numpy_is_always_usable_and_listed():
    assert "numpy" in ms.backends()
    assert K.get_backend("numpy").NAME == "numpy"
    assert set(ms.backends()) <= set(K.registered_backends()) == {"numpy", "numba", "cupy"}


def test_unknown_backend_is_a_value_error_listing_the_names():
    p = make_ffn(4, 6, activation="relu", dtype=np.float64)
    with pytest.raises(ValueError) as e:
        ms.sparse_ffn(p["x"], p["w_gate"], None, p["w_down"], "relu", backend="tensorflow")
    for name in ("numpy", "numba", "cupy", "tensorflow"):
        assert name in str(e.value)
    with pytest.raises(TypeError):
        K.get_backend(3)


@pytest.mark.parametrize("name, module, hint", [
    ("numba", "minisparse.kernels.numba_", "pip install 'minisparse[numba]'"),
    ("cupy", "minisparse.kernels.cupy_", "cupy-cuda12x"),
])
def test_missing_backend_raises_with_install_command(fresh_registry, name, module, hint):
    _block_import(fresh_registry, module)
    with pytest.raises(ImportError) as e:
        K.get_backend(name)
    assert hint in str(e.value) and name in str(e.value)
    assert name not in ms.backends()


@pytest.mark.parametrize("name, module", [("numba", "minisparse.kernels.numba_"),
                                          ("cupy", "minisparse.kernels.cupy_")])
def test_no_silent_fallback(fresh_registry, name, module):
    """Asking for a missing backend must fail, not quietly run the NumPy reference."""
    _block_import(fresh_registry, module)
    p = make_ffn(8, 16, activation="drelu", dtype=np.float32)
    stats = {}
    with pytest.raises(ImportError):
        ms.sparse_ffn(p["x"], p["w_gate"], p["w_up"], p["w_down"], "drelu", backend=name, stats=stats)
    assert "path" not in stats                                        # nothing ran
    model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0, backend=name)
    with pytest.raises(ImportError):
        model(np.array([[1, 2, 3]]))


def test_check_usable_failure_is_reported(fresh_registry):
    """A backend that imports but cannot run (e.g. cupy without a GPU) raises, naming why."""
    mod = importlib.import_module("minisparse.kernels.numpy_")

    def broken():
        raise ImportError("no device (simulated)")

    fresh_registry.setattr(mod, "check_usable", broken)
    with pytest.raises(ImportError, match="no device"):
        K.get_backend("numpy")


def test_backend_names_are_case_insensitive():
    assert K.get_backend(" NumPy ").NAME == "numpy"


def test_lazy_exports_from_the_package():
    assert ms.sparse_ffn is K.sparse_ffn and ms.backends is K.backends


def test_bench_subcommand_validates_and_times(tmp_path, capsys):
    import argparse
    import json

    from minisparse.cli import bench as cli
    ap = argparse.ArgumentParser()
    cli.register(ap.add_subparsers())
    out = tmp_path / "bench.json"
    args = ap.parse_args(["bench", "--quick", "--backend", "numpy", "--repeats", "1", "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "numpy skip" in text and "numpy given active" in text
    rows = json.loads(out.read_text())["rows"]
    assert all(r["rel_err"] < 1e-4 for r in rows) and rows[0]["method"].startswith("numpy dense")
    with pytest.raises(ValueError, match="ReLU-family"):
        cli.run_bench(dim=8, ffn_dim=16, activation="swiglu", backends=["numpy"], repeats=1)
