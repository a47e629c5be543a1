"""Greedy batch-1 decode of a Mistral-7B-shaped dReLU model on one GPU: transformers vs minisparse.

The model (issue 12): 32 layers, dim 4096, ffn 14336, 32 query / 8 KV heads, vocab 32000,
float16 weights, dReLU with exactly 90% of the FFN neurons zero for every token (built on
the device by :func:`minisparse.kernels.decode_cuda.exactly_sparse_params`: a residual
coordinate no layer writes is a bias feature, and each inactive neuron's gate gets a
negative bias on it with a 10-sigma margin; the zeros are counted, not assumed), batch 1,
128 new tokens after a 16-token prompt.

Rows
----
* transformers ``MistralForCausalLM`` (random init, fp16, ``hidden_act="relu"``: on this
  model relu(g) * u equals relu(g) * relu(u), since every active neuron's u is positive),
  eager ``generate``; and with its static cache + ``torch.compile`` (in a child process
  with a time limit, since that path has failed on this machine before);
* minisparse :class:`~minisparse.kernels.decode_cuda.GraphDecoder`, one CUDA graph per
  step: dense, skip (the CuPy neuron-skipping FFN), given active set (the ORACLE upper
  bound of a predictor: the true active set is handed over), dense float32 weights, and
  the same dense kernels issued eagerly (no graph);
* the readable model on the device (``model.forward`` on CuPy, eager) where available.

Columns: tokens/s and ms per decode step (device time of the 128 steps after the prompt,
CUDA events; transformers: (time of 128 new tokens - time of 1) / 127, synchronised wall
clock), fraction of the bytes floor (the dense fp16 weights one step must read, divided
by the copy bandwidth measured in the same run, over the measured time), the same for the
row's own minimum bytes, speed-up over minisparse dense and over transformers eager.

Before timing, every row's tokens are validated on a 2-layer slice of the same shapes
against the NumPy reference (float32 weights: NumPy float32 greedy tokens identical;
float16: a float64 reference on the same half-rounded weights, tokens identical and
logits close).

    PYTHONPATH=. python3 bench/decode_gpu.py [--quick] [--no-hf] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import minisparse as ms  # noqa: E402
from minisparse.activations import get_activation  # noqa: E402
from minisparse.model import KVCache  # noqa: E402

RESULT: dict = {}


def shapes(args):
    if args.quick:
        return dict(vocab_size=4000, dim=512, n_layers=args.layers or 4, n_heads=8, n_kv_heads=2, ffn_dim=1792)
    return dict(vocab_size=32000, dim=4096, n_layers=args.layers or 32, n_heads=32, n_kv_heads=8, ffn_dim=14336)


def make_config(args, n_layers=None):
    kw = shapes(args)
    if n_layers:
        kw["n_layers"] = n_layers
    return ms.ModelConfig(activation="drelu", tie_embeddings=False, max_seq_len=args.prompt + args.new,
                          rope_theta=10000.0, norm_eps=1e-5, **kw)


def save(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(RESULT, fh, indent=1, default=float)


def device_model(cfg, params):
    """A Transformer over CuPy params (or, if this version's constructor refuses them, the
    three attributes GraphDecoder reads)."""
    try:
        m = ms.Transformer(cfg, params=params)
        if hasattr(m, "to"):
            m.to("cupy")                                # the rotary tables too (params stay where they are)
        return m
    except Exception as e:  # pragma: no cover - depends on the model's device support
        from types import SimpleNamespace
        print(f"  note: Transformer(params=CuPy) refused ({type(e).__name__}: {e}); using a plain namespace")
        return SimpleNamespace(config=cfg, params=params, act=get_activation(cfg.activation))


def reference(model, prompt, n_new):
    """NumPy greedy decode: ids and the logits (n_new, V) that chose them."""
    cache = KVCache(model.config, 1, model.dtype, max_len=len(prompt) + n_new)
    logits = model(np.array([prompt]), cache=cache)[0, -1]
    ids, out = [], []
    for _ in range(n_new):
        out.append(np.asarray(logits, dtype=np.float64))
        ids.append(int(np.argmax(logits)))
        logits = model(np.array([[ids[-1]]]), cache=cache)[0, -1]
    return ids, np.stack(out)


def logit_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


# ======================================================================================
# transformers
# ======================================================================================
def hf_model(cfg, torch, params=None, device="cuda", dtype=None):
    """MistralForCausalLM (fp16 by default) on the GPU: random init, or the given host params."""
    from transformers import MistralConfig, MistralForCausalLM
    dtype = dtype or torch.float16
    hc = MistralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="relu",
                       max_position_embeddings=max(4096, cfg.max_seq_len), rms_norm_eps=cfg.norm_eps,
                       tie_word_embeddings=False, sliding_window=None, rope_theta=cfg.rope_theta)
    try:                                                # build in fp16 directly (a 7B fp32 init is 29 GB)
        torch.set_default_dtype(dtype)
        direct = True
    except Exception:
        direct = False
    try:
        with torch.device(device):
            model = MistralForCausalLM(hc)
    finally:
        torch.set_default_dtype(torch.float32)
    if not direct:
        model = model.to(dtype)
    model.generation_config.eos_token_id = None         # always max_new_tokens, argmax unmasked
    model.eval()
    if params is not None:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, dtype)
        sd = {"model.embed_tokens.weight": t(params["tok_embeddings"]), "model.norm.weight": t(params["norm"]),
              "lm_head.weight": t(params["output"])}
        for i in range(cfg.n_layers):
            q, h = f"layers.{i}.", f"model.layers.{i}."
            sd[h + "input_layernorm.weight"] = t(params[q + "attention_norm"])
            sd[h + "post_attention_layernorm.weight"] = t(params[q + "ffn_norm"])
            for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
                sd[h + f"self_attn.{b}.weight"] = t(params[q + "attention." + a].T)      # (out, in)
            sd[h + "mlp.gate_proj.weight"] = t(params[q + "feed_forward.w_gate"])
            sd[h + "mlp.up_proj.weight"] = t(params[q + "feed_forward.w_up"])
            sd[h + "mlp.down_proj.weight"] = t(params[q + "feed_forward.w_down"].T)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if "rotary" not in m]
        if missing or unexpected:
            raise RuntimeError(f"HF state dict: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def hf_generate(model, torch, prompt, n, **kw):
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def hf_time(model, torch, prompt, n_new, repeats=2, **kw):
    """Seconds per decode step: (t(n_new) - t(1)) / (n_new - 1), best of repeats."""
    def t(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = hf_generate(model, torch, prompt, n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, ids
    hf_generate(model, torch, prompt, 4, **kw)                        # warm-up
    best, ids = None, None
    for _ in range(repeats):
        t1, _ = t(1)
        tn, ids = t(n_new)
        per = (tn - t1) / (n_new - 1)
        best = per if best is None else min(best, per)
    return best, ids


def hf_compile_child(args):
    """Child process: transformers' static cache + torch.compile; prints one HFCOMPILE json line."""
    import torch
    cfg = make_config(args)
    prompt = prompt_ids(args, cfg)
    out = {}
    model = hf_model(cfg, torch)
    t0 = time.perf_counter()
    try:
        # generate() compiles the forward itself (reduce-overhead) when the cache is static
        per, ids = hf_time(model, torch, prompt, args.new, repeats=2, cache_implementation="static")
        out["static_auto_compile"] = dict(s_per_token=per, tokens=ids, wall_s=time.perf_counter() - t0,
                                          compiled=getattr(model, "_compiled_call", None) is not None)
    except Exception as e:
        out["static_auto_compile"] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
    print("HFCOMPILE " + json.dumps(out, default=float), flush=True)
    if "error" in out["static_auto_compile"] or not out["static_auto_compile"].get("compiled"):
        t0 = time.perf_counter()
        try:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            per, ids = hf_time(model, torch, prompt, args.new, repeats=2, cache_implementation="static")
            out["static_explicit_compile"] = dict(s_per_token=per, tokens=ids, wall_s=time.perf_counter() - t0)
        except Exception as e:
            out["static_explicit_compile"] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
        print("HFCOMPILE " + json.dumps(out, default=float), flush=True)


def prompt_ids(args, cfg):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, size=args.prompt).tolist()


# ======================================================================================
# minisparse
# ======================================================================================
def validate_slice(args, cp, torch):
    """Every row's tokens on a 2-layer slice of the same shapes against the NumPy reference."""
    from minisparse.kernels.decode_cuda import GraphDecoder, exactly_sparse_params
    cfg = make_config(args, n_layers=2)
    prompt, n_val = prompt_ids(args, cfg), args.val_new
    p_dev, active = exactly_sparse_params(cfg, sparsity=0.9, seed=1, xp=cp, dtype=np.float32)
    host = {k: v.get() for k, v in p_dev.items()}
    t0 = time.perf_counter()
    ref32 = ms.Transformer(cfg, params=host)
    ids32, lg32 = reference(ref32, prompt, n_val)
    half = {k: (v.astype(np.float16).astype(np.float64) if not k.endswith("norm") else v.astype(np.float64))
            for k, v in host.items()}
    ids16, lg16 = reference(ms.Transformer(cfg, params=half), prompt, n_val)
    print(f"  NumPy references on the 2-layer slice: {time.perf_counter() - t0:.1f} s; "
          f"float32 ids {ids32}; float64 on half weights ids {ids16}")
    model = device_model(cfg, p_dev)
    rows = []

    def add(row, ids, want, logits=None, want_logits=None, **extra):
        r = dict(row=row, tokens_equal=ids == want, n_equal=int(sum(a == b for a, b in zip(ids, want))),
                 n=len(want), logits_rel_err=None if logits is None else logit_err(logits, want_logits), **extra)
        rows.append(r)
        print(f"  {row:<52} tokens {'identical' if r['tokens_equal'] else 'DIFFER'} ({r['n_equal']}/{r['n']})"
              + ("" if logits is None else f", logits rel err {r['logits_rel_err']:.1e}"))

    for wdt in ("float32", "float16"):
        want, want_lg = (ids32, lg32) if wdt == "float32" else (ids16, lg16)
        for mode in ("dense", "skip", "given", "skip/fused", "given/fused", "skip/split", "given/split"):
            mode, _, kernel = mode.partition("/")
            kernel = kernel or "decode"
            try:
                dec = GraphDecoder(model, mode=mode, weight_dtype=wdt, active=active if mode == "given" else None,
                                   count_active=(mode == "dense" or (mode == "skip" and kernel == "decode")),
                                   sparse_kernel=kernel)
                for graph in (True, False):
                    ids, lg = dec.generate(prompt, n_val, graph=graph, return_logits=True)
                    extra = {}
                    if dec.counts is not None:
                        c = dec.counts.get()[:len(prompt) + n_val - 1]
                        extra = dict(nonzero_min=int(c.min()), nonzero_max=int(c.max()),
                                     n_active=int(round(0.1 * cfg.ffn_dim)))
                    add(f"minisparse {mode}{'' if mode == 'dense' else '/' + kernel} {wdt} "
                        f"{'graph' if graph else 'eager kernels'}", ids, want, lg, want_lg, **extra)
                del dec
            except Exception as e:
                rows.append(dict(row=f"minisparse {mode} {wdt}", error=f"{type(e).__name__}: {e}"))
                print(f"  minisparse {mode} {wdt}: ERROR {type(e).__name__}: {e}")
    # the readable model on the device (eager), where this version has it
    try:
        m = ms.Transformer(cfg, params={k: v.copy() for k, v in host.items()})
        moved = m.to("cupy")
        m = moved if moved is not None else m
        ids = ms.generate(m, prompt, n_val, temperature=0)
        add("minisparse model.forward on CuPy (eager)", ids, ids32)
    except Exception as e:
        rows.append(dict(row="minisparse model.forward on CuPy (eager)", error=f"{type(e).__name__}: {e}"))
        print(f"  model.forward on CuPy: not available ({type(e).__name__}: {str(e)[:200]})")
    if torch is not None:
        try:
            hm = hf_model(cfg, torch, params=host)
            with torch.no_grad():
                ids = hf_generate(hm, torch, prompt, n_val)
                lg = hm(torch.tensor([prompt + ids16[:-1]], device="cuda")).logits[0, len(prompt) - 1:]
            add("transformers fp16 eager generate", ids, ids16, lg.float().cpu().numpy(), lg16)
            del hm
            torch.cuda.empty_cache()
        except Exception as e:
            rows.append(dict(row="transformers fp16 eager generate", error=f"{type(e).__name__}: {e}"))
            print(f"  transformers on the slice: ERROR {type(e).__name__}: {str(e)[:300]}")
    del model, p_dev
    cp.get_default_memory_pool().free_all_blocks()
    return rows


def bench_minisparse(args, cp, copy_GBs):
    from minisparse.kernels.decode_cuda import GraphDecoder, exactly_sparse_params
    cfg = make_config(args)
    prompt = prompt_ids(args, cfg)
    t0 = time.perf_counter()
    p_dev, active = exactly_sparse_params(cfg, sparsity=0.9, seed=1, xp=cp, dtype=np.float32)
    cp.cuda.Device().synchronize()
    print(f"  built {cfg.n_layers}-layer params on the device in {time.perf_counter() - t0:.1f} s "
          f"({sum(a.nbytes for a in p_dev.values()) / 1e9:.1f} GB float32)")
    model = device_model(cfg, p_dev)
    D, F, H, K, Dh, V, L = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.n_layers
    A = int(round(0.1 * F))
    attn = D * (H + 2 * K) * Dh + H * Dh * D
    bytes_of = {"dense": L * (attn + 3 * F * D) + V * D + D, "skip": L * (attn + F * D + 2 * A * D) + V * D + D,
                "given": L * (attn + 3 * A * D) + V * D + D}
    out = dict(config=cfg.to_dict(), n_active=A, prompt=prompt)
    # exactness, counted on the full model
    try:
        dec = GraphDecoder(model, mode="dense", weight_dtype="float16", count_active=True,
                           max_len=args.prompt + args.new)
        ids = dec.generate(prompt, args.new)
        c = dec.counts.get()[:args.prompt + args.new - 1]
        out["exactness"] = dict(nonzero_min=int(c.min()), nonzero_max=int(c.max()), n_active=A,
                                exact=bool((c == A).all()), positions=int(c.shape[0]), layers=L)
        print(f"  nonzero neurons per (position, layer): min {c.min()} max {c.max()} (constructed {A}): "
              f"{'EXACT' if (c == A).all() else 'NOT EXACT'}")
        del dec
    except Exception as e:
        out["exactness"] = dict(error=f"{type(e).__name__}: {e}")
        print(f"  exactness check: ERROR {type(e).__name__}: {e}")
    rows = []
    runs = [("minisparse dense [graph]", "dense", "float16", True, args.new, "decode"),
            ("minisparse skip [graph]", "skip", "float16", True, args.new, "decode"),
            ("minisparse given active, ORACLE [graph]", "given", "float16", True, args.new, "decode"),
            ("  skip, CuPy backend ffn_device [graph]", "skip", "float16", True, args.new, "fused"),
            ("  skip, CuPy backend split kernels [graph]", "skip", "float16", True, args.new, "split"),
            ("  given ORACLE, CuPy backend ffn_device [graph]", "given", "float16", True, args.new, "fused"),
            ("  given ORACLE, CuPy backend split [graph]", "given", "float16", True, args.new, "split"),
            ("minisparse dense, eager kernels (no graph)", "dense", "float16", False, min(32, args.new), "decode"),
            ("minisparse dense fp32 weights [graph]", "dense", "float32", True, args.new, "decode")]
    if args.core:
        runs = runs[:3]
    dense_ids = None
    for label, mode, wdt, graph, n_new, kernel in runs:
        try:
            dec = GraphDecoder(model, mode=mode, weight_dtype=wdt, active=active if mode == "given" else None,
                               max_len=args.prompt + args.new, sparse_kernel=kernel)
            dec.generate(prompt, 4, graph=graph)                        # warm-up (compile, capture)
            per, ids = [], None
            for _ in range(3):
                ids = dec.generate(prompt, n_new, graph=graph)
                per.append(dec.last_timing["decode_s"] / dec.last_timing["decode_steps"])
            s = float(np.median(per))
            wb = np.dtype(wdt).itemsize
            r = dict(row=label, mode=mode, weight_dtype=wdt, graph=graph, sparse_kernel=kernel,
                     new_tokens=n_new, s_per_token=s,
                     tokens_per_s=1 / s, launches_per_step=dec.n_launches,
                     bytes_per_token=bytes_of[mode] * wb, dense_fp16_bytes=bytes_of["dense"] * 2,
                     floor_frac=(bytes_of["dense"] * 2 / (copy_GBs * 1e9)) / s,
                     own_floor_frac=(bytes_of[mode] * wb / (copy_GBs * 1e9)) / s,
                     prefill_s=dec.last_timing["prefill_s"], tokens=ids, spread=[min(per), max(per)])
            if mode == "dense" and wdt == "float16" and graph:
                dense_ids = ids
            if kernel == "decode" and mode != "dense" and graph:   # grid of the down projection
                sweep = {}
                for dbs in (2, 4, 8):
                    dec.down_blocks_per_sm = dbs
                    dec._graph = None                           # re-capture with the new grid
                    dec.generate(prompt, 4)
                    ts = []
                    for _ in range(2):
                        dec.generate(prompt, n_new)
                        ts.append(dec.last_timing["decode_s"] / dec.last_timing["decode_steps"])
                    sweep[dbs] = min(ts)
                r["down_blocks_per_sm_sweep_s"] = sweep
                print(f"    down_rows blocks/SM sweep (ms/token): "
                      + ", ".join(f"{k_}: {v * 1e3:.3f}" for k_, v in sweep.items()))
            if dense_ids is not None:
                m = min(len(ids), len(dense_ids))
                r["same_tokens_as_dense"] = int(sum(a == b for a, b in zip(ids[:m], dense_ids[:m])))
            rows.append(r)
            print(f"  {label:<46} {1 / s:8.1f} tok/s {s * 1e3:7.3f} ms/token  {r['floor_frac'] * 100:5.1f}% of the "
                  f"dense floor  ({dec.n_launches} launches/step)")
            del dec
        except Exception as e:
            rows.append(dict(row=label, error=f"{type(e).__name__}: {e}"))
            print(f"  {label}: ERROR {type(e).__name__}: {e}")
        cp.get_default_memory_pool().free_all_blocks()
    # the readable model, eager on the device (full size), where this version has it
    try:
        if not hasattr(model, "forward"):
            raise RuntimeError("no Transformer over CuPy params")
        ms.generate(model, prompt, 2, temperature=0)                   # warm-up
        n_e = 8
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        ms.generate(model, prompt, 1, temperature=0)
        cp.cuda.Device().synchronize()
        t1 = time.perf_counter()
        ids = ms.generate(model, prompt, n_e, temperature=0)
        cp.cuda.Device().synchronize()
        t2 = time.perf_counter()
        s = ((t2 - t1) - (t1 - t0)) / (n_e - 1)
        r = dict(row="minisparse model.forward on CuPy (eager, fp32)", mode="dense", weight_dtype="float32",
                 graph=False, new_tokens=n_e, s_per_token=s, tokens_per_s=1 / s,
                 bytes_per_token=bytes_of["dense"] * 4, floor_frac=(bytes_of["dense"] * 2 / (copy_GBs * 1e9)) / s,
                 own_floor_frac=(bytes_of["dense"] * 4 / (copy_GBs * 1e9)) / s, tokens=ids)
        rows.append(r)
        print(f"  {r['row']:<46} {1 / s:8.1f} tok/s {s * 1e3:7.3f} ms/token")
    except Exception as e:
        rows.append(dict(row="minisparse model.forward on CuPy (eager, fp32)", error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(f"  model.forward on CuPy: not available ({type(e).__name__}: {str(e)[:200]})")
    out["rows"] = rows
    if args.pdl_sweep:
        out["pdl_sweep"] = pdl_sweep(args, cp, model, active, prompt)
    if args.rung_sweep:
        out["rung_sweep"] = rung_sweep(args, cp, model, active, prompt, args.rung_sweep)
    del model, p_dev
    cp.get_default_memory_pool().free_all_blocks()
    return out


def pdl_sweep(args, cp, model, active, prompt):
    """ms/token of dense / skip / given with plain launches, and with programmatic dependent
    launch (L2 prefetch of 512 bytes per weight row, or the first round of weight loads
    issued before the wait: "+E"), with the LM head and argmax fused (default) or not
    ("sep"); same decoder, re-captured; best of 2 runs; 8 loads in flight per lane (U8)."""
    from minisparse.kernels import decode_cuda as dc
    res = []
    print("  kernel rung / PDL sites / prefetch bytes [+E early loads] [sep: head, argmax apart] (ms/token, best of 2):")
    for mode in ("dense", "skip", "given"):
        dec = dc.GraphDecoder(model, mode=mode, weight_dtype="float16", active=active if mode == "given" else None,
                              max_len=args.prompt + args.new)
        line, ref_ids = [], None
        rungs = {"dense": [None], "skip": [dc.SELECT_KERNEL, "split3"], "given": ["quarter", "warp"]}[mode]
        variants = [(r, pdl, pf, early, "fused") for r in rungs
                    for pdl, pf, early in (("none", 0, False), ("all", 512, False), ("attn_side", 512, False),
                                           ("all", 512, True), ("attn_side", 512, True))]
        variants += [(rungs[0], pdl, 512, early, "separate") for pdl in ("all", "attn_side") for early in (False, True)]
        policy = {"none": (), "all": dc.PDL_SITES, "attn_side": dc.PDL_ATTN_SIDE}
        for rung, pdl, pf, early, head in variants:
            dec.gemv_u = 8
            dec.head_kernel = head
            tag = ("+E" if early else "") + ("/sep" if head == "separate" else "")
            dec.pdl_sites = frozenset(policy[pdl])
            dec.prefetch_bytes = pf
            dec.early_loads = early
            if rung:                                   # the rung of this mode's first half
                setattr(dec, "select_kernel" if mode == "skip" else "list_kernel", rung)
            dec.k = dc.kernels(dec.wdt, pf, early)
            dec._graph = None
            try:
                dec.generate(prompt, 4)
                ts, ids = [], None
                for _ in range(2):
                    ids = dec.generate(prompt, args.new)
                    ts.append(dec.last_timing["decode_s"] / dec.last_timing["decode_steps"])
                ref_ids = ref_ids or ids
                res.append(dict(mode=mode, rung=rung, pdl=pdl, prefetch_bytes=pf, early_loads=early, head_kernel=head,
                                gemv_u=8, s_per_token=min(ts), spread=[min(ts), max(ts)], same_tokens=ids == ref_ids))
                line.append(f"{rung or ''}/{pdl}/{pf}{tag}: {min(ts) * 1e3:.3f}{'' if ids == ref_ids else ' (TOKENS DIFFER)'}")
            except Exception as e:
                res.append(dict(mode=mode, rung=rung, pdl=pdl, prefetch_bytes=pf, early_loads=early, head_kernel=head,
                                gemv_u=8, error=f"{type(e).__name__}: {e}"))
                line.append(f"{rung or ''}/{pdl}/{pf}{tag}: ERROR {type(e).__name__}: {str(e)[:120]}")
        print(f"    {mode:<6} " + "\n           ".join(", ".join(line[i:i + 3]) for i in range(0, len(line), 3)))
        del dec
        cp.get_default_memory_pool().free_all_blocks()
    return res


RUNGS = {   # GraphDecoder attributes of each rung of --rung-sweep; the first of a mode is its default
    "dense": [dict(), dict(attn_kernel="split_pre_cl8w"), dict(attn_kernel="split_pre")],
    "skip": [dict(), dict(attn_kernel="split_pre_cl8w"), dict(attn_kernel="split_pre")],
    "given": [dict(), dict(attn_kernel="split_pre_cl8w"), dict(attn_kernel="split_pre")],
}


def rung_sweep(args, cp, model, active, prompt, rounds):
    """ms/token of each rung in RUNGS, the rungs of a mode interleaved round by round (one
    decoder per mode, re-captured per rung), median over ``rounds``; x dense: against the
    median of dense's first rung in the same run. Tokens must equal the mode's first rung."""
    from minisparse.kernels import decode_cuda as dc
    res, dense_s = [], None
    print(f"  rung sweep (ms/token, median of {rounds} interleaved rounds; x dense: against dense's default):")
    for mode, rungs in RUNGS.items():
        dec = dc.GraphDecoder(model, mode=mode, weight_dtype="float16", active=active if mode == "given" else None,
                              max_len=args.prompt + args.new)
        base = {name: getattr(dec, name) for rung in rungs for name in rung}
        times, ids_of = [[] for _ in rungs], [None] * len(rungs)
        for _ in range(rounds):
            for i, rung in enumerate(rungs):
                for name, value in {**base, **rung}.items():
                    setattr(dec, name, value)
                dec._graph = None
                dec.generate(prompt, 4)                                # capture, warm
                ids_of[i] = dec.generate(prompt, args.new)
                times[i].append(dec.last_timing["decode_s"] / dec.last_timing["decode_steps"])
        for i, rung in enumerate(rungs):
            s = float(np.median(times[i]))
            if mode == "dense" and i == 0:
                dense_s = s
            r = dict(mode=mode, rung=rung, s_per_token=s, runs=times[i], same_tokens=ids_of[i] == ids_of[0],
                     x_dense=dense_s / s if dense_s else None)
            res.append(r)
            name = ", ".join(f"{k}={v}" for k, v in rung.items()) or "default"
            print(f"    {mode:<6} {name:<62} {s * 1e3:7.3f} ms  {r['x_dense']:.3f}x dense  "
                  f"[{min(times[i]) * 1e3:.3f}-{max(times[i]) * 1e3:.3f}]"
                  + ("" if r["same_tokens"] else "  TOKENS DIFFER"))
        del dec
        cp.get_default_memory_pool().free_all_blocks()
    return res


def check_fp16_full(args, cp):
    """The float16 decoder against the readable model on the FULL model: the reference runs
    eagerly on the device (float32 arithmetic) on the half-rounded weights; also the gap
    between the top two logits of each step, which says how close a step is to a tie."""
    from minisparse.kernels.decode_cuda import GraphDecoder, exactly_sparse_params
    cfg = make_config(args)
    prompt, n = prompt_ids(args, cfg), args.check_fp16
    p_dev, _ = exactly_sparse_params(cfg, sparsity=0.9, seed=1, xp=cp, dtype=np.float32)
    out = {}
    for name, rnd in (("float32 weights", False), ("half-rounded weights", True)):
        params = {k: (v.astype(cp.float16).astype(cp.float32) if rnd and not k.endswith("norm") else v)
                  for k, v in p_dev.items()}
        model = device_model(cfg, params)
        cache = model.new_cache(1, max_len=len(prompt) + n) if hasattr(model, "new_cache") else None
        logits = model(np.array([prompt]), cache=cache)[0, -1]
        ids, gaps = [], []
        for _ in range(n):
            lg = cp.asnumpy(logits).astype(np.float64)
            top = np.sort(lg)[-2:]
            gaps.append(float((top[1] - top[0]) / np.abs(lg).max()))
            ids.append(int(np.argmax(lg)))
            logits = model(np.array([[ids[-1]]]), cache=cache)[0, -1]
        dec = GraphDecoder(model, mode="dense", weight_dtype="float16" if rnd else "float32",
                           max_len=len(prompt) + n)
        got, glg = dec.generate(prompt, n, return_logits=True)
        out[name] = dict(reference=ids, decoder=got, identical=ids == got, top2_gap_rel=gaps)
        print(f"  {name}: eager reference {ids}\n  {' ' * len(name)}  GraphDecoder({'float16' if rnd else 'float32'}) "
              f"{got} -> {'IDENTICAL' if ids == got else 'DIFFER'}; top-2 logit gap / max |logit| per step: "
              + ", ".join(f"{g:.1e}" for g in gaps))
        del model, params, dec
        cp.get_default_memory_pool().free_all_blocks()
    return out


def print_table(rows, title):
    print(f"\n{title}")
    print(f"{'row':<50} {'tok/s':>8} {'ms/tok':>8} {'% floor':>8} {'% own':>7} {'x dense':>8} {'x HF eager':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['row']:<50} error: {r['error'][:70]}")
            continue
        print(f"{r['row']:<50} {r['tokens_per_s']:8.1f} {r['s_per_token'] * 1e3:8.3f} {r['floor_frac'] * 100:7.1f}% "
              f"{r.get('own_floor_frac', float('nan')) * 100:6.1f}% {r.get('x_dense', float('nan')):7.3f}x "
              f"{r.get('x_hf_eager', float('nan')):9.1f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model (dim 512, 4 layers), seconds")
    ap.add_argument("--layers", type=int, default=None, help="layers of the full model (default 32)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--val-new", type=int, default=8, help="new tokens of the 2-layer validation")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--no-compile", action="store_true", help="skip transformers' static cache + torch.compile")
    ap.add_argument("--compile-timeout", type=int, default=200)
    ap.add_argument("--core", action="store_true", help="only the dense / skip / given rows of the own kernels")
    ap.add_argument("--pdl-sweep", action="store_true",
                    help="also time plain launches against programmatic dependent launch x L2 prefetch depth")
    ap.add_argument("--rung-sweep", type=int, default=0, metavar="ROUNDS",
                    help="also time the kernel rungs of RUNGS side by side, interleaved, median of ROUNDS")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the rung sweep (default 3 rounds), no validation and no table")
    ap.add_argument("--json", default=None, help="default bench/results/decode_gpu[_quick].json")
    ap.add_argument("--hf-compile-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check-fp16", type=int, default=0, metavar="N",
                    help="only: N tokens of the float16 decoder against the eager reference on half-rounded "
                         "weights, full model")
    args = ap.parse_args(argv)
    if args.hf_compile_child:
        return hf_compile_child(args)
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        print(f"error: this benchmark needs CuPy and a CUDA GPU ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    torch = None
    if not args.no_hf:
        try:
            import torch
            import transformers
            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device")
            RESULT["transformers"] = transformers.__version__
            RESULT["torch"] = torch.__version__
        except Exception as e:
            print(f"  transformers rows skipped: {type(e).__name__}: {e}")
            torch = None
    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     "decode_gpu" + ("_quick" if args.quick else "") + ".json")
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    buf = cp.empty((256 if args.quick else 2048) * 1024 ** 2 // 4, dtype=cp.float32)
    buf2 = cp.empty_like(buf)
    for _ in range(3):
        cp.copyto(buf2, buf)
    ev = [cp.cuda.Event(), cp.cuda.Event()]
    ts = []
    for _ in range(10):
        ev[0].record()
        cp.copyto(buf2, buf)
        ev[1].record()
        ev[1].synchronize()
        ts.append(cp.cuda.get_elapsed_time(ev[0], ev[1]) / 1e3)
    copy_GBs = 2 * buf.nbytes / float(np.median(ts)) / 1e9
    del buf, buf2
    cp.get_default_memory_pool().free_all_blocks()
    RESULT.update(gpu=gpu, copy_GBs=copy_GBs, cupy=cp.__version__, platform=platform.platform(),
                  quick=args.quick, prompt_len=args.prompt, new_tokens=args.new)
    print(f"GPU: {gpu}; copy bandwidth {copy_GBs:.0f} GB/s (read + write)")
    if args.check_fp16:
        print(f"\nfloat16 decoder vs the eager reference, full model ({shapes(args)['n_layers']} layers)")
        RESULT["check_fp16"] = check_fp16_full(args, cp)
        save(path)
        return 0

    if args.sweep_only:
        from minisparse.kernels.decode_cuda import exactly_sparse_params
        cfg = make_config(args)
        print(f"\nrung sweep only ({cfg.n_layers} layers; tokens are compared with each mode's first rung, "
              "not validated against NumPy: tests/gpu/test_graph_decode.py does that)")
        p_dev, active = exactly_sparse_params(cfg, sparsity=0.9, seed=1, xp=cp, dtype=np.float32)
        RESULT["rung_sweep"] = rung_sweep(args, cp, device_model(cfg, p_dev), active, prompt_ids(args, cfg),
                                          args.rung_sweep or 3)
        save(path)
        return 0

    print("\n1. validation on a 2-layer slice (tokens against the NumPy reference)")
    RESULT["validation"] = validate_slice(args, cp, torch)
    save(path)

    print(f"\n2. minisparse, {shapes(args)['n_layers']} layers")
    RESULT["minisparse"] = bench_minisparse(args, cp, copy_GBs)
    save(path)
    rows = list(RESULT["minisparse"]["rows"])

    if torch is not None:
        print("\n3. transformers")
        cfg = make_config(args)
        prompt = prompt_ids(args, cfg)
        try:
            hm = hf_model(cfg, torch)
            with torch.no_grad():
                s, ids = hf_time(hm, torch, prompt, args.new)
            rows.insert(0, dict(row="transformers fp16 eager generate", s_per_token=s, tokens_per_s=1 / s,
                                floor_frac=(RESULT["minisparse"]["rows"][0].get("dense_fp16_bytes", 0)
                                            / (copy_GBs * 1e9)) / s, tokens=ids))
            print(f"  transformers eager: {1 / s:.1f} tok/s, {s * 1e3:.2f} ms/token")
            del hm
            torch.cuda.empty_cache()
        except Exception as e:
            rows.insert(0, dict(row="transformers fp16 eager generate", error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"  transformers eager: ERROR {type(e).__name__}: {e}")
        save(path)
        if not args.no_compile:
            cmd = [sys.executable, os.path.abspath(__file__), "--hf-compile-child", "--new", str(args.new),
                   "--prompt", str(args.prompt)] + (["--quick"] if args.quick else []) + \
                  (["--layers", str(args.layers)] if args.layers else [])
            t0 = time.perf_counter()
            try:
                cp_out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
                lines = [l for l in cp_out.stdout.splitlines() if l.startswith("HFCOMPILE ")]
                res = json.loads(lines[-1][len("HFCOMPILE "):]) if lines else dict(
                    error=f"child exited {cp_out.returncode}: {cp_out.stderr[-600:]}")
            except subprocess.TimeoutExpired as e:
                lines = [l for l in (e.stdout or b"").decode(errors="replace").splitlines() if l.startswith("HFCOMPILE ")]
                res = json.loads(lines[-1][len("HFCOMPILE "):]) if lines else {}
                res["timeout"] = f"child killed after {args.compile_timeout} s"
            RESULT["hf_compile"] = res
            print(f"  transformers static cache + torch.compile ({time.perf_counter() - t0:.0f} s): "
                  f"{json.dumps(res, default=float)[:600]}")
            for key, label in (("static_auto_compile", "transformers static cache, generate's auto-compile"),
                               ("static_explicit_compile", "transformers static cache + torch.compile (explicit)")):
                v = res.get(key)
                if isinstance(v, dict) and "s_per_token" in v:
                    s = v["s_per_token"]
                    rows.insert(1, dict(row=label, s_per_token=s, tokens_per_s=1 / s,
                                        floor_frac=(RESULT["minisparse"]["rows"][0].get("dense_fp16_bytes", 0)
                                                    / (copy_GBs * 1e9)) / s, compiled=v.get("compiled")))
            save(path)
    dense = next((r for r in rows if r.get("row") == "minisparse dense [graph]" and "error" not in r), None)
    hf = next((r for r in rows if r.get("row") == "transformers fp16 eager generate" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            continue
        if dense:
            r["x_dense"] = dense["s_per_token"] / r["s_per_token"]
        if hf:
            r["x_hf_eager"] = hf["s_per_token"] / r["s_per_token"]
    RESULT["table"] = rows
    save(path)
    c = make_config(args)
    print_table(rows, f"GPU {gpu}: greedy decode, batch 1, {c.n_layers} layers, dim {c.dim}, ffn {c.ffn_dim}, "
                      f"{c.n_heads}/{c.n_kv_heads} heads, vocab {c.vocab_size}, {args.prompt}-token prompt + "
                      f"{args.new} new; dReLU 90% exactly zero; copy bandwidth {copy_GBs:.0f} GB/s")
    ex = RESULT["minisparse"].get("exactness", {})
    print(f"exact sparsity on the full model: {ex}")
    bad = [r["row"] for r in RESULT["validation"] if "error" in r or not r.get("tokens_equal", False)]
    print(f"validation on the 2-layer slice: {'all rows identical' if not bad else 'NOT identical: ' + str(bad)}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
