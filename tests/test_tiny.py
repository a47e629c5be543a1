"""minisparse/tiny.py, the one-page model, computes exactly what the library computes.

* logits equal ``Transformer``'s to 1e-12 in float64 on the same params (MHA and GQA,
  tied and untied output, prompts of awkward lengths), also when decoding through its cache;
* its sparse FFN equals its dense FFN, and really skips neurons;
* its greedy tokens equal ``ms.generate(..., temperature=0)``'s;
* it imports nothing from the rest of minisparse (it must stay readable on its own).
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import minisparse as ms
from minisparse import tiny

ROOT = Path(__file__).resolve().parents[1]


def _model(seed=0, **overrides):
    cfg = ms.preset("nano", activation="drelu", **overrides)
    model = ms.Transformer(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for name, w in model.params.items():
        if name.endswith("norm"):
            model.params[name] = 1.0 + 0.1 * rng.normal(size=w.shape)   # not all ones: tests the scale
    return model


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_heads=4), dict(n_kv_heads=1, tie_embeddings=False),
                                       dict(rope_theta=500.0, norm_eps=1e-6)],
                         ids=["gqa", "mha", "mqa-untied", "theta-eps"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_logits_equal_the_library(overrides, T):
    model = _model(**overrides)
    tokens = np.random.default_rng(T).integers(0, 258, size=T)
    want = model(tokens[None, :])[0]                                      # (T, V)
    have = tiny.forward(model.params, model.config.to_dict(), tokens)      # (T, V)
    assert have.shape == want.shape and have.dtype == np.float64
    np.testing.assert_allclose(have, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tiny.forward(model.params, model.config.to_dict(), tokens, sparse=True),
                               want, rtol=0, atol=1e-12)


def test_incremental_decoding_equals_full_forward():
    model = _model()
    cfg = model.config.to_dict()
    tokens = np.random.default_rng(0).integers(0, 258, size=9)
    full = tiny.forward(model.params, cfg, tokens)
    cache = [{} for _ in range(model.config.n_layers)]
    first = tiny.forward(model.params, cfg, tokens[:5], cache=cache)       # prefill 5
    rest = [tiny.forward(model.params, cfg, tokens[t:t + 1], cache=cache, sparse=True) for t in range(5, 9)]
    np.testing.assert_allclose(np.concatenate([first, *rest]), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [1, 7])
def test_sparse_ffn_equals_dense_and_skips(T):
    rng = np.random.default_rng(T)
    F, D = 33, 16
    x = rng.normal(size=(T, D))
    wg, wu, wd = (rng.normal(size=(F, D)) for _ in range(3))
    wg[: F // 2] -= 3.0 * np.sign(x.sum(0))          # half the neurons: gate below zero for these tokens
    dense = tiny.ffn_dense(x, wg, wu, wd)
    sparse, active = tiny.ffn_sparse(x, wg, wu, wd)
    np.testing.assert_allclose(sparse, dense, rtol=1e-13, atol=1e-13)
    assert 0 < active < 1, active                     # some neurons skipped, some computed
    g = x @ wg.T
    assert active == pytest.approx(((g > 0).any(axis=0)).mean())
    # all neurons off: the output is exactly zero, nothing computed
    y0, a0 = tiny.ffn_sparse(x, np.zeros_like(wg), wu, wd)
    assert a0 == 0 and not y0.any()


def test_ffn_equals_the_library_gated_ffn():
    from minisparse.layers import ffn_forward
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 16))
    w = [rng.normal(size=(33, 16)) for _ in range(3)]
    want, _ = ffn_forward(x, *w, ms.get_activation("drelu"))
    np.testing.assert_allclose(tiny.ffn_dense(x, *w), want, rtol=0, atol=1e-12)


def test_greedy_tokens_equal_ms_generate():
    model = _model(seed=3)
    cfg = model.config.to_dict()
    prompt = [256, *b"def "]
    want = ms.generate(model, prompt, max_new_tokens=24, temperature=0)
    stats = []
    have = tiny.generate(model.params, cfg, prompt, 24, stats=stats)
    assert have == want
    assert tiny.generate(model.params, cfg, prompt, 24, sparse=False) == want
    assert len(stats) == model.config.n_layers * 25 and all(0 <= a <= 1 for a in stats)


def test_greedy_tokens_equal_after_training_a_few_steps():
    """On weights that are not random (a few AdamW steps), greedy decoding still agrees."""
    model = _model(seed=5)
    opt = ms.AdamW(model.params, lr=3e-3)
    data = np.frombuffer(b"def main():\n    return 0\n" * 8, dtype=np.uint8).astype(np.int64)[None, :64]
    for _ in range(5):
        _, grads = model.loss_and_grads(data)
        opt.step(model.params, grads)
    want = ms.generate(model, [256, 100], max_new_tokens=16, temperature=0)
    assert tiny.generate(model.params, model.config.to_dict(), [256, 100], 16) == want


def test_rejects_models_it_does_not_compute():
    model = ms.Transformer(ms.preset("nano"), seed=0, dtype=np.float64)   # swiglu
    with pytest.raises(ValueError, match="dReLU"):
        tiny.forward(model.params, model.config.to_dict(), [1, 2])


def test_is_self_contained_and_short():
    src = (ROOT / "minisparse" / "tiny.py").read_text()
    assert len(src.splitlines()) <= 200
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "tiny.py must not import from the rest of minisparse"
            imported.add(node.module.split(".")[0])
    assert imported == {"numpy"}, imported


def test_runs_as_a_script():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(ROOT / "minisparse" / "tiny.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sparse and dense agree" in proc.stdout


def test_the_docs_page_example_runs():
    """The example on docs/tiny.md (the site's page for this file) runs as printed."""
    import re
    text = (ROOT / "docs" / "tiny.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    assert "tiny.forward" in code
    exec(compile(code, "docs/tiny.md", "exec"), {})
