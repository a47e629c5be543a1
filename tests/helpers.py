"""Helpers the tests import (``from helpers import assert_close``); fixtures live in conftest.py.

conftest.py is pytest's, not a module to import from: importing it by name picks whichever
conftest is first on ``sys.path``. This module sits next to it in ``tests/`` (on the path
for every test, like ``backends/backend_helpers.py`` and ``interop/hf_helpers.py``).
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name):
    """bench/<name>.py as a module (the scripts are not a package), run afresh each call."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tol(dtype):
    """(rtol, atol) by dtype for comparisons against a float64-exact reference."""
    return (1e-5, 1e-6) if np.dtype(dtype) == np.float32 else (1e-12, 1e-13)


def assert_close(actual, expected, dtype, what="result"):
    """atol + rtol*|ref| by dtype; prints the first mismatches (llm.c's validate_result)."""
    rtol, atol = tol(dtype)
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    if bad.any():
        idx = np.argwhere(bad)[:5]
        lines = [f"  at {tuple(i)}: got {actual[tuple(i)]!r}, want {expected[tuple(i)]!r}" for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.size} elements differ (rtol={rtol}, atol={atol})\n"
                    + "\n".join(lines))


def tiny_tokenizer(folder):
    """A byte-level BPE trained in the test (no download), saved as tokenizer.json."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "sparse neurons fire rarely"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return tok
