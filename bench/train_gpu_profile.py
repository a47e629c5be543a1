"""Where the time of a minisparse training step goes, on the GPU (CuPy) or the CPU (NumPy).

Builds the model of ``bench/science_gpu.py`` (dim 384, 6 layers, 6 heads, ffn 1024,
seq 256, batch 64: ~10.8M parameters), moves it with ``Transformer.to``, and runs the
training step of :func:`minisparse.train.train` (``_train_step``: batch, forward, loss,
hand-written backward, global-norm clipping, AdamW). First it validates: one
``loss_and_grads`` on the device against the NumPy reference on the same weights. Then:

1. **step**: N timed steps after a warm-up, CUDA events around each (ms/step, tokens/s,
   model TFLOP/s counting 6 x parameters x tokens + 12 x layers x B x H x T^2 x Dh);
2. **phases**: data, inputs, forward, loss, backward, clip, optimizer, with a device sync
   around each phase, so each phase's time is its own (wall = max of the Python that
   launches it and the GPU work it queues; ``host`` = the Python alone: where the two
   agree, the phase is launch-bound);
3. **functions**: the same for every layer function (``layers.*``) and the optimizer,
   exclusive of the functions they call, sorted by time;
4. ``--kernels`` (CuPy): the top GPU kernels of one step by total time, read through
   PyTorch's profiler (CUPTI sees every kernel of the process, CuPy's too);
5. ``--micro`` (CuPy): a few primitives at the step's shapes (launch cost, row dots by
   einsum and by multiply-sum, the embedding scatter-add, one FFN matmul).

The synced timings add up to more than a step: syncs stop the host from running ahead.
The step timing (1.) is the real one.

    PYTHONPATH=. python3 bench/train_gpu_profile.py --tf32 --kernels --micro --out $OUT   # GPU
    python bench/train_gpu_profile.py --device numpy --dim 32 --layers 1 --heads 2 --ffn-dim 64 \\
        --batch 2 --seq 32 --steps 2 --warmup 1 --out /tmp/prof                         # CPU smoke test
    ... --src DIR --tag before      # profile another copy of the package (DIR/minisparse)

Writes ``train_gpu_profile[_TAG].json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cupy", help="cupy (GPU) or numpy (CPU)")
    ap.add_argument("--activation", default="swiglu")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ffn-dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (CuPy compiles its kernels)")
    ap.add_argument("--synced-steps", type=int, default=2, help="steps of the phase and function tables")
    ap.add_argument("--max-bytes", type=float, default=4e6, help="bytes of the embedded corpus to load")
    ap.add_argument("--tf32", action="store_true", help="CUPY_TF32=1: float32 matmuls on TF32 tensor cores")
    ap.add_argument("--kernels", action="store_true", help="top GPU kernels of one step (needs torch)")
    ap.add_argument("--micro", action="store_true", help="time a few primitives at the step's shapes (CuPy)")
    ap.add_argument("--src", default=str(ROOT), help="folder holding the minisparse package to profile")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    for name in ("dim", "layers", "heads", "ffn_dim", "batch", "seq", "steps", "synced_steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.dim % a.heads or (a.dim // a.heads) % 2:
        ap.error(f"--dim {a.dim} must split into --heads {a.heads} heads of an even width")
    if a.device not in ("cupy", "numpy"):
        ap.error(f"--device must be cupy or numpy, got {a.device!r}")
    return a


class Timers:
    """Wall and host time per name, each exclusive of the timed calls nested inside it.

    ``wrap(name, fn)`` returns fn timed: a device sync before and after the call, so the
    wall time is the call's own work (max of its Python and its GPU kernels), and the
    host time is the Python until the call returns (no sync)."""

    def __init__(self, sync):
        self.sync = sync
        self.wall = defaultdict(float)
        self.host = defaultdict(float)
        self.calls = defaultdict(int)
        self.stack = []

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            ts = time.perf_counter()
            self.sync()                              # the caller's queued work stays the caller's
            t0 = time.perf_counter()
            self.stack.append([0.0, 0.0])            # children's wall, children's host-incl.-waits
            try:
                return fn(*args, **kwargs)
            finally:
                th = time.perf_counter()
                self.sync()
                t1 = time.perf_counter()
                child_wall, child_total = self.stack.pop()
                self.wall[name] += (t1 - t0) - child_wall
                self.host[name] += (th - t0) - child_total
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1][0] += t1 - t0
                    self.stack[-1][1] += t1 - ts
        timed.__wrapped__ = fn
        return timed

    def table(self, steps):
        rows = sorted(self.wall, key=lambda k: -self.wall[k])
        return [dict(name=k, calls=self.calls[k] / steps, wall_ms=1e3 * self.wall[k] / steps,
                     host_ms=1e3 * self.host[k] / steps) for k in rows]


class patched:
    """Replace attributes for the duration of a ``with`` block; restored on exit."""

    def __init__(self, items):
        self.items = items                            # [(owner, attribute name, new value)]
        self.saved = []

    def __enter__(self):
        for owner, name, new in self.items:
            self.saved.append((owner, name, owner.__dict__[name]))
            setattr(owner, name, new)
        return self

    def __exit__(self, *exc):
        for owner, name, old in reversed(self.saved):
            setattr(owner, name, old)


def main(argv=None) -> int:
    a = parse(argv)
    if a.tf32:
        os.environ["CUPY_TF32"] = "1"                 # read by CuPy when it is imported
    sys.path.insert(0, str(Path(a.src).resolve()))
    import numpy as np
    import minisparse as ms
    from minisparse import layers as L
    from minisparse import train as TR
    from minisparse.data import Corpus, load_corpus
    from minisparse.xp import to_numpy

    src = str(Path(ms.__file__).resolve().parent)
    xp = ms.xp.get_module(a.device)
    on_gpu = a.device == "cupy"
    if on_gpu:
        stream = xp.cuda.get_current_stream()
        sync = stream.synchronize
        gpu = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"]
        gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
    else:
        def sync():
            pass
        gpu = None
    try:                                              # which code was measured (the device copy may lack .git)
        import subprocess
        top, commit = subprocess.run(["git", "-C", src, "rev-parse", "--show-toplevel", "HEAD"],
                                     capture_output=True, text=True, timeout=10).stdout.split()
        if Path(top).resolve() != Path(src).parent:   # a copy of the package outside the repository
            commit = None
    except Exception:
        commit = None
    machine = dict(device=a.device, gpu=gpu, cpu=platform.processor() or platform.machine(),
                   python=platform.python_version(), numpy=np.__version__,
                   cupy=getattr(xp, "__version__", None) if on_gpu else None, tf32=bool(a.tf32), src=src,
                   commit=commit)
    print(f"minisparse from {src}; device {a.device}{' ' + gpu if gpu else ''}{' (TF32)' if a.tf32 else ''}")

    # ---- model, data, optimizer: as bench/science_gpu.py and minisparse.train.train ----
    dtype = np.dtype(a.dtype)
    cfg = ms.ModelConfig(vocab_size=258, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads,
                         ffn_dim=a.ffn_dim, max_seq_len=a.seq, activation=a.activation)
    corpus = load_corpus(max_bytes=int(a.max_bytes))
    host = ms.Transformer(cfg, seed=0, dtype=dtype)
    model = ms.Transformer(cfg, seed=0, dtype=dtype).to(a.device)
    n_params = model.num_parameters()
    tc = TR.TrainConfig(steps=10 ** 9, batch_size=a.batch, seq_len=a.seq, lr=1e-3, warmup=10,
                        eval_every=0, progress=False)
    opt = TR.AdamW(model.params, tc.lr, tc.betas, tc.eps, tc.weight_decay)
    rng = np.random.default_rng(0)
    step_no = [0]

    def step():
        rec = TR._train_step(model, corpus, tc, opt, rng, step_no[0], 0.0)
        step_no[0] += 1
        return rec

    # ---- 0. validate: the device's loss and gradients against the NumPy reference ----
    x, y = corpus.get_batch("train", 2, min(a.seq, 64), np.random.default_rng(1))
    lh, gh = host.loss_and_grads(x, y)
    ld, gd = model.loss_and_grads(x, y)
    grad_err = max(float(np.max(np.abs(to_numpy(gd[k]) - gh[k]))) / max(float(np.max(np.abs(gh[k]))), 1e-30)
                   for k in gh)
    loss_err = abs(ld - lh) / abs(lh)
    tol = 1e-2 if a.tf32 else (1e-4 if dtype == np.float32 else 1e-10)
    valid = dict(loss_host=lh, loss_device=ld, loss_rel_err=loss_err, grad_max_rel_err=grad_err, tol=tol,
                 ok=bool(loss_err < tol and grad_err < 50 * tol))
    print(f"validation (batch 2 x {x.shape[1]}): loss {ld:.6f} vs NumPy {lh:.6f} (rel {loss_err:.1e}), "
          f"gradients max |diff| / max |g| {grad_err:.1e}: {'ok' if valid['ok'] else 'FAILED'}")
    if not valid["ok"]:
        print("error: the device step does not match the NumPy reference; not timing it")
        return 1
    del host, gh, gd

    # ---- 1. the step, timed ----
    for _ in range(a.warmup):
        step()
    sync()
    per_step, losses = [], []
    t_host0 = time.perf_counter()
    if on_gpu:
        ev = [xp.cuda.Event() for _ in range(a.steps + 1)]
        ev[0].record()
        for i in range(a.steps):
            losses.append(step()["loss"])
            ev[i + 1].record()
        ev[-1].synchronize()
        per_step = [xp.cuda.get_elapsed_time(ev[i], ev[i + 1]) for i in range(a.steps)]
    else:
        for i in range(a.steps):
            t0 = time.perf_counter()
            losses.append(step()["loss"])
            per_step.append(1e3 * (time.perf_counter() - t0))
    wall = time.perf_counter() - t_host0
    ms_step = float(np.median(per_step))
    tokens = a.batch * a.seq
    Dh = a.dim // a.heads
    flops = 6 * n_params * tokens + 12 * a.layers * a.batch * a.heads * a.seq ** 2 * Dh
    step_res = dict(ms_median=ms_step, ms_mean=float(np.mean(per_step)), ms_min=float(np.min(per_step)),
                    ms_each=per_step, wall_s=wall, tokens_per_step=tokens, tokens_per_s=tokens / (ms_step / 1e3),
                    model_tflops=flops / (ms_step / 1e3) / 1e12, flops_per_step=flops,
                    steps_3000_min=3000 * ms_step / 6e4, losses=losses)
    print(f"\nstep ({a.activation}, {n_params / 1e6:.2f}M params, batch {a.batch} x seq {a.seq}, {a.dtype}): "
          f"median {ms_step:.1f} ms (mean {step_res['ms_mean']:.1f}, min {step_res['ms_min']:.1f}) over "
          f"{a.steps} steps; {tokens / (ms_step / 1e3):,.0f} tokens/s; {step_res['model_tflops']:.2f} TFLOP/s "
          f"of model FLOPs; 3000 steps = {step_res['steps_3000_min']:.1f} min")

    # ---- 2. phases and 3. functions, each around syncs ----
    def synced(names):
        timers = Timers(sync)
        items = [(owner, attr, timers.wrap(label, owner.__dict__[attr])) for label, owner, attr in names]
        with patched(items):
            for _ in range(a.synced_steps):
                timers.wrap("step", step)()
        return timers.table(a.synced_steps)

    Tr = ms.Transformer
    phases = [("data", Corpus, "get_batch"), ("inputs", Tr, "_inputs_targets"), ("forward", Tr, "_forward"),
              ("loss", L, "cross_entropy_forward"), ("loss", L, "cross_entropy_backward"),
              ("backward", Tr, "loss_and_grads"), ("clip", TR, "clip_grads"), ("optimizer", TR.AdamW, "step")]
    phase_rows = synced(phases)
    funcs = [(f"layers.{n}", L, n) for n in ("embedding_forward", "embedding_backward", "rms_norm_forward",
                                             "rms_norm_backward", "attention_forward", "attention_backward",
                                             "attention_core_forward", "attention_core_backward", "_rotate_pairs",
                                             "_exp_needs_shift", "causal_hidden", "ffn_forward", "ffn_backward",
                                             "cross_entropy_forward", "cross_entropy_backward")
             if n in L.__dict__]
    funcs += [("model._forward (rest)", Tr, "_forward"), ("model.loss_and_grads (rest)", Tr, "loss_and_grads"),
              ("model._block_backward (rest)", Tr, "_block_backward"), ("train.global_norm", TR, "global_norm"),
              ("train.clip_grads (rest)", TR, "clip_grads"), ("train.AdamW.step", TR.AdamW, "step"),
              ("data.get_batch", Corpus, "get_batch")]
    func_rows = synced(funcs)

    def show(title, rows):
        print(f"\n{title} (per step; wall = with a device sync around each call; host = its Python alone)")
        print(f"{'':<32} {'calls':>6} {'wall ms':>9} {'host ms':>9}")
        for r in rows:
            print(f"{r['name']:<32} {r['calls']:>6.0f} {r['wall_ms']:>9.2f} {r['host_ms']:>9.2f}")
    show("phases", phase_rows)
    show("functions, exclusive of the timed functions they call", func_rows)

    res = dict(args=vars(a), machine=machine, params=n_params, validation=valid, step=step_res,
               phases=phase_rows, functions=func_rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_gpu_profile{'_' + a.tag if a.tag else ''}.json"
    path.write_text(json.dumps(res, indent=1, default=float))    # again below, with the optional parts

    # ---- 4. kernels, through PyTorch's profiler (CUPTI) ----
    if a.kernels and on_gpu:
        try:
            import torch
            from torch.profiler import ProfilerActivity, profile
            torch.cuda.init()
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                sync()
            rows = []
            for e in prof.key_averages():
                t = getattr(e, "self_device_time_total", None)
                if t is None:
                    t = getattr(e, "self_cuda_time_total", 0.0)
                if t > 0:
                    rows.append(dict(kernel=e.key[:90], count=e.count, total_ms=t / 1e3))
            rows.sort(key=lambda r: -r["total_ms"])
            total = sum(r["total_ms"] for r in rows)
            n_k = sum(r["count"] for r in rows)
            res["kernels"] = dict(total_gpu_ms=total, launches=n_k, top=rows[:30])
            print(f"\nGPU kernels of one step: {n_k} launches, {total:.1f} ms of kernel time; top 15:")
            for r in rows[:15]:
                print(f"  {r['total_ms']:8.2f} ms {r['count']:>5}x  {r['kernel']}")
        except Exception as e:                        # the profile is optional; say why it is missing
            res["kernels"] = dict(error=f"{type(e).__name__}: {e}")
            print(f"\nkernels: not available ({type(e).__name__}: {e})")

    # ---- 5. primitives at the step's shapes ----
    if a.micro and on_gpu:
        from cupyx.profiler import benchmark
        B, T, D, F, V = a.batch, a.seq, a.dim, a.ffn_dim, cfg.vocab_size
        r = np.random.default_rng(0)
        h = xp.asarray(r.standard_normal((B, T, D), dtype=np.float32))
        w = xp.asarray(r.standard_normal((F, D), dtype=np.float32))
        tok = xp.asarray(r.integers(0, V, (B, T)))
        small = xp.zeros(16, dtype=np.float32)
        from minisparse.xp import add_at

        def emb_add_at():
            idx = (tok.reshape(-1, 1) * D + xp.arange(D)).reshape(-1)
            out = xp.zeros((V, D), np.float32)
            add_at(out.reshape(-1), idx, h.reshape(-1))

        def emb_onehot():
            onehot = (tok.reshape(-1)[None, :] == xp.arange(V)[:, None]).astype(np.float32)  # (V, N)
            return onehot @ h.reshape(-1, D)

        cases = {"launch: small x += 1": lambda: small.__iadd__(1),
                 "rowdot einsum (B,T,D)": lambda: xp.einsum("...d,...d->...", h, h),
                 "rowdot (h*h).sum(-1)": lambda: (h * h).sum(-1),
                 "colsum einsum nd,nd->d": lambda: xp.einsum("nd,nd->d", h.reshape(-1, D), h.reshape(-1, D)),
                 "embedding add_at": emb_add_at, "embedding one-hot matmul": emb_onehot,
                 "matmul (N,D)@(D,F)": lambda: h.reshape(-1, D) @ w.T}
        micro = {}
        print("\nprimitives (CPU = host time per call, GPU = kernel time per call)")
        for name, fn in cases.items():
            b = benchmark(fn, n_repeat=20, n_warmup=3)
            cpu_us, gpu_us = 1e6 * float(np.mean(b.cpu_times)), 1e6 * float(np.mean(b.gpu_times[0]))
            micro[name] = dict(cpu_us=cpu_us, gpu_us=gpu_us)
            print(f"  {name:<28} CPU {cpu_us:9.1f} us   GPU {gpu_us:9.1f} us")
        mm = micro["matmul (N,D)@(D,F)"]["gpu_us"]
        micro["matmul_tflops"] = 2 * B * T * D * F / (mm / 1e6) / 1e12
        res["micro"] = micro

    path.write_text(json.dumps(res, indent=1, default=float))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
