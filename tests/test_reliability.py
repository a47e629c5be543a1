"""Issue 13: nothing lost, nothing silently wrong. Each test fails on the code before the fix.

CLI behaviour is checked through ``subprocess`` where the command line itself is the subject
(exit status, one ``error:`` line, no traceback); the rest through the API.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minisparse as ms
from minisparse import cli

pytest.importorskip("safetensors")

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(400))


def run_cli(*argv, timeout=120):
    """``python -m minisparse.cli ARGV`` -> (returncode, stdout, stderr)."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("MINISPARSE_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "minisparse.cli", *map(str, argv)], capture_output=True,
                       text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def assert_one_error_line(rc, err, *needles):
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "code.txt"
    f.write_text(TEXT)
    return f


@pytest.fixture
def nano_ckpt(tmp_path):
    return ms.save(ms.Transformer(ms.preset("nano", activation="swiglu"), seed=0), tmp_path / "base")


# --------------------------------------------------------------------------------------
# 1. shifted ReLU is a registry name that round-trips
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, base", [("drelu_shift:0.05", "drelu"), ("reglu_shift:0.05", "reglu"),
                                        ("relu_shift:0.1", "relu"), ("reglu_shift:0.5:0.6", "reglu"),
                                        ("relu2glu_shift:0.25", "relu2glu")])
def test_shifted_relu_is_a_parameterised_registry_name(name, base):
    act = ms.get_activation(name)
    assert act.name == name and ms.get_activation(name) is act
    g = np.array([1.0, 0.2, 2.0, -1.0, 0.3])
    u = np.array([2.0, 2.0, 0.4, 3.0, -0.5])
    b = float(name.split(":")[1])
    t = float(name.split(":")[2]) if name.count(":") == 2 else 0.0

    def r(z):
        s = z - b
        return np.where(s > t, s, 0.0)
    want = {"drelu": r(g) * r(u), "reglu": r(g) * u, "relu": r(g), "relu2glu": np.maximum(g - b, 0) ** 2 * u}[base]
    got = act(g, u) if act.gated else act(g)
    assert np.array_equal(got, want)
    cfg = ms.preset("nano", activation=name)                # ModelConfig accepts it (no registration step)
    assert cfg.activation == name


def test_old_shift_spelling_still_loads():
    assert ms.get_activation("drelu-shift0.05") is ms.get_activation("drelu_shift:0.05")
    assert ms.get_activation("reglu-shift0.5-t0.6").name == "reglu_shift:0.5:0.6"


@pytest.mark.parametrize("bad", ["drelu_shift:nan", "drelu_shift:inf", "drelu_shift:-inf", "relu_shift:x",
                                 "swiglu_shift:0.1", "fatrelu:-1", "drelu:nan", "drelu_shift:0.1:-0.2",
                                 "drelu-shiftnan"])
def test_bad_activation_parameters_are_refused(bad):
    with pytest.raises((ValueError, KeyError)):
        ms.get_activation(bad)
    with pytest.raises(ValueError, match="activation"):
        ms.preset("nano", activation=bad)


def test_shifted_model_round_trips_through_checkpoint_and_hf(tmp_path):
    pytest.importorskip("ml_dtypes")
    from minisparse.sparsity import relufy
    m = relufy(ms.Transformer(ms.preset("nano", activation="swiglu"), seed=0), "drelu", shift=0.05).model
    assert m.config.activation == "drelu_shift:0.05"
    x = np.arange(1, 9)[None]
    assert np.array_equal(ms.load(ms.save(m, tmp_path / "c")).__call__(x), m(x))
    with pytest.warns(UserWarning, match="stock transformers"):
        ms.save_hf(m, tmp_path / "hf")
    back = ms.load_hf(tmp_path / "hf")
    assert back.config.activation == "drelu_shift:0.05"
    assert np.allclose(back(x), m(x), atol=1e-6)


def test_cli_relufy_shift_writes_a_model_generate_and_resume_open(tmp_path, nano_ckpt, data):
    out = tmp_path / "relshift"
    rc, _, err = run_cli("relufy", nano_ckpt, "--shift", "0.05", "--steps", 1, "--data", data, "--batch-size", 2,
                         "--seq-len", 16, "--eval-batches", 1, "--out", out, "--no-progress")
    assert rc == 0, err
    assert ms.load(out).config.activation == "drelu_shift:0.05"
    rc, outp, err = run_cli("generate", "--model", out, "--prompt", "def ", "--max-new-tokens", 3,
                            "--temperature", 0)
    assert rc == 0 and "Traceback" not in err, err
    rc, _, err = run_cli("train", "--resume", out, "--steps", 2, "--no-progress")
    assert_one_error_line(rc, err, "no training config")       # relufy saves no optimizer: said plainly
    run = tmp_path / "run"                                    # a run trained with the shifted name resumes
    argv = ["--data", data, "--batch-size", 2, "--seq-len", 16, "--no-progress", "--eval-every", 0]
    rc, _, err = run_cli("train", "--preset", "nano", "--activation", "drelu_shift:0.05", "--steps", 1,
                         "--out", run, *argv)
    assert rc == 0, err
    rc, _, err = run_cli("train", "--resume", run, "--steps", 2, "--no-progress")
    assert rc == 0, err


@pytest.mark.parametrize("shift", ["nan", "inf", "-inf"])
def test_cli_relufy_refuses_non_finite_shift(tmp_path, nano_ckpt, shift):
    with pytest.raises(SystemExit) as e:
        cli.main(["relufy", str(nano_ckpt), f"--shift={shift}", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
