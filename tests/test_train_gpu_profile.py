"""bench/train_gpu_profile.py on the CPU (--device numpy), tiny shapes: it validates, times,
breaks the step into phases and functions, and writes its JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "numpy", "--dim", "16", "--layers", "1", "--heads", "2", "--ffn-dim", "24", "--batch", "2",
        "--seq", "70", "--steps", "2", "--warmup", "1", "--synced-steps", "1", "--max-bytes", "200000"]


def _script():
    spec = importlib.util.spec_from_file_location("train_gpu_profile", ROOT / "bench" / "train_gpu_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_runs_on_the_cpu_and_writes_json(tmp_path, capsys):
    import minisparse as ms
    from minisparse import layers as L
    before = L.attention_core_backward
    assert _script().main(TINY + ["--activation", "drelu", "--out", str(tmp_path), "--tag", "smoke"]) == 0
    assert L.attention_core_backward is before and "timed" not in repr(ms.Transformer._forward)  # unpatched
    res = json.loads((tmp_path / "train_gpu_profile_smoke.json").read_text())
    assert res["validation"]["ok"] and res["validation"]["loss_rel_err"] == 0.0   # same code on the CPU
    assert res["step"]["ms_median"] > 0 and len(res["step"]["ms_each"]) == 2
    phases = {r["name"] for r in res["phases"]}
    assert {"data", "forward", "loss", "backward", "clip", "optimizer"} <= phases
    funcs = {r["name"]: r for r in res["functions"]}
    assert funcs["layers.attention_core_backward"]["calls"] == 1       # one layer, one call per step
    assert funcs["layers.causal_hidden"]["calls"] == 2                  # 70 queries: two blocks of 64
    assert all(r["wall_ms"] >= 0 for r in res["functions"])
    out = capsys.readouterr().out
    assert "phases" in out and "validation" in out and "ok" in out


def test_profile_rejects_bad_shapes(capsys):
    with pytest.raises(SystemExit):
        _script().main(["--device", "numpy", "--dim", "30", "--heads", "4"])
    assert "--dim 30" in capsys.readouterr().err


@pytest.mark.gpu
def test_profile_runs_on_the_gpu(tmp_path):
    """The same smoke run with CuPy (skipped, never passed, without CuPy and a CUDA device)."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible")
    except Exception as e:  # ImportError, CUDARuntimeError
        pytest.skip(f"needs CuPy and a CUDA GPU ({type(e).__name__}: {e})")
    args = [a if a != "numpy" else "cupy" for a in TINY]
    assert _script().main(args + ["--out", str(tmp_path), "--tag", "gpu"]) == 0
    res = json.loads((tmp_path / "train_gpu_profile_gpu.json").read_text())
    assert res["validation"]["ok"] and res["machine"]["gpu"]
    assert res["validation"]["loss_rel_err"] < 1e-4                    # float32 on the GPU against NumPy
