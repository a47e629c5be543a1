"""Training: schedule, AdamW, clipping, accumulation, the loop, exact resume, evaluation."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minisparse as ms
from minisparse.data import corpus_from_text
from minisparse.train import (AdamW, TrainConfig, accumulate_grads, clip_grads, evaluate, ffn_zero_fraction,
                              global_norm, lr_at, read_metrics, train)

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


@pytest.fixture(scope="module")
def corpus():
    return corpus_from_text(TEXT, name="functions")


def nano(activation="drelu", dtype=np.float32, **kw):
    return ms.Transformer(ms.preset("nano", activation=activation, **kw), seed=0, dtype=dtype)


def quick_cfg(**kw):
    base = dict(steps=12, batch_size=4, seq_len=32, warmup=3, eval_every=0, eval_batches=2, progress=False)
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------
@given(steps=st.integers(2, 500), warmup=st.integers(0, 50), ratio=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_lr_schedule_shape(steps, warmup, ratio):
    warmup = min(warmup, steps - 1)
    cfg = TrainConfig(steps=steps, warmup=warmup, lr=2.0, min_lr_ratio=ratio)
    lrs = np.array([lr_at(s, cfg) for s in range(steps)])
    assert np.all(lrs > 0 if ratio > 0 else lrs >= 0)
    assert np.all(lrs <= 2.0 + 1e-12)
    if warmup:
        assert np.allclose(lrs[:warmup], 2.0 * np.arange(1, warmup + 1) / warmup)   # linear warmup
    after = lrs[warmup:]
    assert np.isclose(after[0], 2.0)                                             # peak after warmup
    assert np.all(np.diff(after) <= 1e-12)                                       # cosine: non-increasing
    if len(after) > 1:
        assert np.isclose(after[-1], 2.0 * ratio)                                # ends at lr * ratio


# --------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------
def _adamw_reference(p, grads_seq, lrs, b1, b2, eps, wd, decay):
    """Algorithm 2 of Loshchilov & Hutter (2019) as PyTorch states it, one scalar at a time."""
    p = np.array(p, dtype=np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        if decay:
            p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_matches_the_formula_and_skips_decay_on_vectors(dtype):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)).astype(dtype), "norm": rng.standard_normal(4).astype(dtype)}
    start = {k: v.astype(np.float64) for k, v in params.items()}
    grads_seq = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()} for _ in range(6)]
    lrs = [0.1, 0.05, 0.02, 0.3, 0.01, 0.1]
    opt = AdamW(params, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.2)
    for g, lr in zip(grads_seq, lrs):
        opt.step(params, g, lr)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for k in params:
        want = _adamw_reference(start[k], [g[k].astype(np.float64) for g in grads_seq], lrs, 0.9, 0.95, 1e-8,
                                0.2, decay=(k == "w"))
        np.testing.assert_allclose(params[k], want, rtol=rtol, atol=rtol * 1e-2, err_msg=k)
        assert params[k].dtype == dtype and opt.exp_avg[k].dtype == dtype


@pytest.mark.interop
def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3))
    b = rng.standard_normal(3)
    params = {"w": w.copy(), "b": b.copy()}
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}],
                             lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    opt = AdamW(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        gw, gb = rng.standard_normal(w.shape), rng.standard_normal(b.shape)
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        topt.step()
        opt.step(params, {"w": gw, "b": gb}, 0.01)
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params["b"], tb.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adamw_state_dict_roundtrip_and_mismatch():
    p = {"a": np.ones((2, 2)), "b": np.ones(3)}
    opt = AdamW(p)
    opt.step(p, {"a": np.full((2, 2), 0.5), "b": np.full(3, -1.0)}, 0.01)
    sd = opt.state_dict()
    opt2 = AdamW({"a": np.ones((2, 2)), "b": np.ones(3)})
    opt2.load_state_dict(sd)
    assert opt2.t == 1 and np.array_equal(opt2.exp_avg["a"], opt.exp_avg["a"])
    with pytest.raises(ValueError, match="missing"):
        AdamW({"a": np.ones((2, 2))}).load_state_dict(sd)
    with pytest.raises(KeyError, match="no gradient"):
        opt.step(p, {"a": np.ones((2, 2))}, 0.01)


# --------------------------------------------------------------------------------------
# clipping and accumulation
# --------------------------------------------------------------------------------------
def test_global_norm_clipping():
    g = {"a": np.full((2, 2), 3.0), "b": np.full(1, 4.0)}                  # norm sqrt(36+16) = sqrt(52)
    assert np.isclose(global_norm(g), math.sqrt(52))
    before = clip_grads(g, 1.0)
    assert np.isclose(before, math.sqrt(52)) and np.isclose(global_norm(g), 1.0, rtol=1e-5)
    g2 = {"a": np.full(3, 0.1)}
    clip_grads(g2, 1.0)
    assert np.allclose(g2["a"], 0.1)                                         # under the limit: untouched
    g3 = {"a": np.full(3, 10.0)}
    clip_grads(g3, 0.0)                                                      # 0 = off
    assert np.allclose(g3["a"], 10.0)


def test_accumulated_micro_batches_equal_one_big_batch(corpus):
    model = nano("swiglu", np.float64)
    rng = np.random.default_rng(0)
    batches = [corpus.get_batch("train", 3, 16, rng) for _ in range(2)]
    loss, grads, ce = accumulate_grads(model, batches)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    loss_big, grads_big = model.loss_and_grads(x, y)
    assert np.isclose(loss, loss_big, rtol=1e-12) and np.isclose(ce, loss_big, rtol=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], grads_big[k], rtol=1e-9, atol=1e-14, err_msg=k)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def test_loss_decreases_on_a_tiny_run(corpus):
    model = nano("drelu")
    before = evaluate(model, corpus, 4, 32, n_batches=4)
    calls = []
    r = train(model, corpus, quick_cfg(steps=60, lr=3e-3, warmup=5), callback=lambda s, rec: calls.append(s))
    assert r.model is model and len(r.history) == 60 and calls == list(range(60))
    first = np.mean([h["loss"] for h in r.history[:5]])
    last = np.mean([h["loss"] for h in r.history[-5:]])
    assert last < first - 0.5, (first, last)
    assert r.final_val_loss < before - 0.5, (before, r.final_val_loss)
    for key in ("step", "loss", "ce_loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        assert key in r.history[0]
    assert "val_loss" in r.history[-1] and r.history[-1]["val_loss"] == r.final_val_loss


def test_grad_accum_and_l1_run(corpus):
    model = nano("drelu")
    r = train(model, corpus, quick_cfg(steps=4, grad_accum=2, l1=0.5))
    assert all(h["loss"] > h["ce_loss"] for h in r.history)                  # the penalty is in the loss
    assert r.history[-1]["tokens"] == 4 * 2 * 4 * 32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resume_is_exact(tmp_path, corpus, dtype):
    """N steps in one go == k steps, save, load, resume to N: identical losses and weights."""
    N, k = 10, 4
    cfg = dict(steps=N, lr=5e-3, warmup=2, eval_every=3, grad_accum=2)
    full = train(nano("drelu", dtype), corpus, quick_cfg(**cfg))

    out = tmp_path / "run"
    # the first run is interrupted after step k (it checkpoints every k steps)
    with pytest.raises(KeyboardInterrupt):
        def stop(step, rec):
            if step + 1 == k + 1:
                raise KeyboardInterrupt
        train(nano("drelu", dtype), corpus, quick_cfg(out_dir=str(out), save_every=k, **cfg), callback=stop)
    fresh = nano("drelu", dtype, )
    fresh.params = {n: np.zeros_like(p) for n, p in fresh.params.items()}   # the checkpoint must restore them
    resumed = train(fresh, corpus, quick_cfg(out_dir=str(out), save_every=k, **cfg),
                    resume=str(out / "checkpoint.safetensors"))
    assert [h["step"] for h in resumed.history] == list(range(k, N))
    for a, b in zip(full.history[k:], resumed.history):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])       # bit-identical
        assert a["grad_norm"] == b["grad_norm"]
        assert a.get("val_loss") == b.get("val_loss")
    for name, p in full.model.params.items():
        assert np.array_equal(p, resumed.model.params[name]), name
    assert full.final_val_loss == resumed.final_val_loss
    # metrics.jsonl holds every step once, in order, across the interruption
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(N))


def test_resume_rejects_another_model(tmp_path, corpus):
    out = tmp_path / "run"
    train(nano("drelu"), corpus, quick_cfg(steps=2, out_dir=str(out)))
    with pytest.raises(ValueError, match="config"):
        train(nano("swiglu"), corpus, quick_cfg(steps=4), resume=str(out))
    with pytest.raises(ValueError, match="dtype"):
        train(nano("drelu", np.float64), corpus, quick_cfg(steps=4), resume=str(out))
    with pytest.warns(UserWarning, match="different lr"):
        train(nano("drelu"), corpus, quick_cfg(steps=4, lr=1e-2), resume=str(out))
    ms.save(nano("drelu"), tmp_path / "inference.safetensors")
    with pytest.raises(ValueError, match="no optimizer state"):
        train(nano("drelu"), corpus, quick_cfg(steps=4), resume=str(tmp_path / "inference.safetensors"))


def test_outputs_written(tmp_path, corpus):
    out = tmp_path / "o"
    r = train(nano(), corpus, quick_cfg(steps=5, out_dir=str(out)))
    assert r.checkpoint == out / "checkpoint.safetensors" and r.checkpoint.is_file()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == list(range(5))
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_plain_progress_lines_without_a_bar(corpus, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *a, **kw):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    train(nano(), corpus, quick_cfg(steps=4, progress=True, log_every=2))
    out = capsys.readouterr().out
    assert "step     2/4" in out and "step     4/4" in out and "tok/s" in out


def test_evaluate_is_deterministic_and_accepts_a_hook(corpus):
    model = nano("drelu")
    a = evaluate(model, corpus, 2, 16, n_batches=3)
    b = evaluate(model, corpus, 2, 16, n_batches=3)
    assert a == b
    zeroed = evaluate(model, corpus, 2, 16, n_batches=3, ffn_hook=lambda layer, e, h: np.zeros_like(h))
    assert zeroed != a


def test_ffn_zero_fraction_counts_exact_zeros(corpus):
    model = nano("drelu")
    fr = ffn_zero_fraction(model, corpus, 2, 16, n_batches=2)
    assert len(fr) == model.config.n_layers and all(0 < f < 1 for f in fr)
    # recount independently
    zeros, total = np.zeros(2), np.zeros(2)

    def hook(layer, expert, h):
        zeros[layer] += (h == 0).sum()
        total[layer] += h.size

    evaluate(model, corpus, 2, 16, n_batches=2, ffn_hook=hook)
    assert np.allclose(fr, zeros / total)
    assert all(f == 0 for f in ffn_zero_fraction(nano("swiglu"), corpus, 2, 16, n_batches=1))


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"), (dict(lr=0), "lr"),
    (dict(lr=float("nan")), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(warmup=-1), "warmup"),
    (dict(grad_clip=-1), "grad_clip"), (dict(min_lr_ratio=2), "min_lr_ratio"), (dict(l1=-1), "l1"),
    (dict(grad_accum=0), "grad_accum"), (dict(seq_len=2.5), "seq_len"),
])
def test_bad_train_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_clear_errors_for_impossible_runs(corpus):
    with pytest.raises(ValueError, match="max_seq_len"):
        train(nano(), corpus, quick_cfg(seq_len=1000))
    short = corpus_from_text("tiny text" * 3)
    with pytest.raises(ValueError, match="needs at least 33"):
        train(nano(), short, quick_cfg())
    with pytest.raises(TypeError, match="Transformer"):
        train("model", corpus, quick_cfg())


def test_blas_threads_and_allocator_helpers():
    from minisparse.train import auto_threads, keep_freed_memory, set_blas_threads
    import os
    n = auto_threads()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert isinstance(set_blas_threads(1), bool)
    set_blas_threads(os.cpu_count() or 1)
    with pytest.raises(ValueError, match=">= 1"):
        set_blas_threads(0)
    assert isinstance(keep_freed_memory(), bool)


@pytest.mark.parametrize("first", ["import minisparse.train", "from minisparse.train import TrainConfig",
                                   "import minisparse.train as T", "ms.train", "ms.TrainConfig", ""])
def test_ms_train_is_callable_whatever_was_imported_first(first):
    """minisparse.train is a submodule and the package's train(): Python rebinds the name to
    the submodule when the submodule is first imported, so before round 8 ``ms.train(...)``
    raised "'module' object is not callable" after ``from minisparse.train import ...``.
    In a fresh interpreter (import order is the point), every order gives a callable that
    trains, and the module's names stay reachable through it."""
    import subprocess
    import sys
    code = f"""
import minisparse as ms
{first}
from minisparse.data import corpus_from_text
import minisparse.train as T
from minisparse import train as TR
assert T is TR is ms.train, (T, TR, ms.train)
cfg = ms.preset("nano", dim=16, n_layers=1, n_heads=2, ffn_dim=24, max_seq_len=16)
res = ms.train(ms.Transformer(cfg, seed=0), corpus_from_text("abcdefgh" * 64, val_fraction=0.2),
               T.TrainConfig(steps=2, batch_size=2, seq_len=8, eval_every=0, progress=False))
assert len(res.history) == 2 and T.train is TR.train
import inspect
assert inspect.signature(ms.train) == inspect.signature(T.train)
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr
