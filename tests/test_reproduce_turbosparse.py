"""bench/reproduce_turbosparse.py's statistics and report, on its own committed run JSONs."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce_turbosparse", ROOT / "bench" / "reproduce_turbosparse.py")
rt = importlib.util.module_from_spec(spec)
sys.modules["reproduce_turbosparse"] = rt
spec.loader.exec_module(rt)


def test_t_ci_by_hand():
    x = [1.0, 2.0, 4.0]
    st = rt.t_ci(x)
    m, sd = 7 / 3, np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert st["mean"] == pytest.approx(m) and st["sd"] == pytest.approx(sd)
    assert st["ci"][1] - m == pytest.approx(4.303 * sd / np.sqrt(3))
    assert np.isnan(rt.t_ci([1.0])["sd"])


def test_paired_uses_common_seeds_only():
    a = [{"seed": 0, "v": 1.0}, {"seed": 1, "v": 2.0}, {"seed": 5, "v": 9.0}]
    b = [{"seed": 0, "v": 0.5}, {"seed": 1, "v": 1.0}]
    st = rt._paired(a, b, "v")
    assert st["n"] == 2 and st["mean"] == pytest.approx(0.75)


def test_report_on_committed_runs(tmp_path):
    src = ROOT / "bench" / "results" / "turbosparse"
    keys = [f"tiny_L4_{a}_st800_lr0.003_seed{s}" for a in ("swiglu", "drelu") for s in (0, 1, 2)]
    if not all((src / f"{k}.json").exists() for k in keys):
        pytest.skip("the committed run JSONs are not there")
    for k in keys:
        shutil.copy(src / f"{k}.json", tmp_path)
    # one fake learning-rate point per pair, to exercise the sweep table
    for k in keys[:2] + keys[3:5]:
        r = json.loads((src / f"{k}.json").read_text())
        r["lr"], r["key"], r["val_loss"] = 0.01, k.replace("lr0.003", "lr0.01"), r["val_loss"] - 0.01
        (tmp_path / f"{r['key']}.json").write_text(json.dumps(r))
    assert rt.main(["report", "--out-json", str(tmp_path)]) == 0
    text = (tmp_path / "reproduce_turbosparse_tables.md").read_text()
    summary = json.loads((tmp_path / "reproduce_turbosparse_summary.json").read_text())
    runs = {k: json.loads((src / f"{k}.json").read_text()) for k in keys}
    diffs = [runs[f"tiny_L4_drelu_st800_lr0.003_seed{s}"]["val_loss"] - runs[f"tiny_L4_swiglu_st800_lr0.003_seed{s}"]["val_loss"]
             for s in (0, 1, 2)]
    d = summary["tables"]["paired_vs_swiglu"]["drelu"]["val_loss_diff"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(np.mean(diffs))
    assert "### Learning rate" in text
    lr = summary["tables"]["lr_sweep"]
    assert lr["vs_lr0"]["swiglu_lr0.01"]["n"] == 2
    assert lr["vs_lr0"]["swiglu_lr0.01"]["mean"] == pytest.approx(-0.01)
    assert lr["drelu_minus_swiglu"]["0.01"]["n"] == 2


@pytest.mark.parametrize("n_bytes", [400_000, 2_000_000])
def test_archived_corpus_is_the_one_the_committed_runs_used(n_bytes, capsys):
    """Any Python (3.12's stdlib differs from 3.11.7's) reads the same tokens."""
    c = rt._corpus({"corpus_bytes": n_bytes})
    assert (rt._sha1(c.train), rt._sha1(c.val)) == rt.CORPUS_SHA1[n_bytes]
    assert "warning" not in capsys.readouterr().err


def test_train_on_a_device_saves_a_host_checkpoint(tmp_path, monkeypatch):
    """--device cupy (here the strict fake CuPy): the key gets _gpu, the checkpoint is saved
    from the host and loads, the history and the sparsity along training are recorded."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_cupy import install
    install(monkeypatch)
    import minisparse as ms
    sc = {"preset": "nano", "steps": 4, "batch_size": 2, "seq_len": 16, "corpus_bytes": 400_000, "quick": True}
    corpus = rt._corpus(sc)
    folder = rt.train_base("drelu", 0, sc, 3e-3, 2, corpus, tmp_path, device="cupy")
    assert folder.name.endswith("_gpu")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["device"] == "cupy" and len(meta["history"]) == 4 and meta["sparsity_during_training"]
    m = ms.load(folder / "model.safetensors")
    assert m.device == "numpy"
