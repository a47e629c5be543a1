"""`minisparse profile` and `minisparse relufy` end to end on a tiny checkpoint."""
import json

import numpy as np
import pytest

import minisparse as ms
from minisparse.cli import main

pytest.importorskip("safetensors")


@pytest.fixture()
def files(tmp_path):
    text = tmp_path / "code.txt"
    text.write_text("def f(x):\n    return x * 2 + 1\n\nfor i in range(10):\n    print(f(i))\n" * 300)
    ckpt = ms.save(ms.Transformer(ms.preset("nano", activation="swiglu"), seed=0), tmp_path / "m.safetensors")
    return tmp_path, text, ckpt


def test_profile_prints_the_table_and_writes_plots(files, capsys):
    tmp, text, ckpt = files
    out = tmp / "prof"
    rc = main(["profile", str(ckpt), "--data", str(text), "--batches", "1", "--batch-size", "2",
               "--seq-len", "32", "--topk", "0,0.9", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "CETT" in printed and "top-k   90%" in printed
    rep = json.loads((out / "profile.json").read_text())
    assert [r["layer"] for r in rep["layers"]] == [0, 1] and rep["exact_zero"] == 0.0   # swiglu
    if pytest.importorskip("matplotlib"):
        for name in ("sparsity_per_layer.png", "neuron_frequency.png", "activation_hist.png", "loss_vs_sparsity.png"):
            assert (out / name).stat().st_size > 1000


def test_relufy_writes_a_loadable_checkpoint(files, capsys):
    tmp, text, ckpt = files
    out = tmp / "rel"
    rc = main(["relufy", str(ckpt), "--to", "drelu", "--steps", "2", "--data", str(text), "--batch-size", "2",
               "--seq-len", "32", "--eval-batches", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "swapped" in capsys.readouterr().out
    m = ms.load(out / "checkpoint.safetensors")
    assert m.config.activation == "drelu"
    rep = json.loads((out / "relufy.json").read_text())
    assert rep["stages"]["swapped"]["exact_zero"] > 0.5


def test_relufy_refuses_a_plain_target_for_a_gated_model(files, capsys):
    tmp, text, ckpt = files
    rc = main(["relufy", str(ckpt), "--to", "relu", "--steps", "0", "--data", str(text)])
    assert rc != 0
    assert "reglu" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["profile", "relufy"])
def test_out_that_is_a_file_is_refused_before_any_work(files, capsys, command):
    tmp, text, ckpt = files
    not_a_dir = tmp / "taken"
    not_a_dir.write_text("x")
    extra = ["--to", "drelu", "--steps", "0"] if command == "relufy" else []
    rc = main([command, str(ckpt), "--data", str(text), "--out", str(not_a_dir), *extra])
    assert rc != 0
    assert "is a file, not a folder" in capsys.readouterr().err
