"""Round 12 diagnostic (device only, not committed): the marginal cost of each part of the
skip step, by launching a no-op (that still waits, PDL-wise) in place of a kernel, or by
dropping the up phase (gated=0). Tokens of the ablated rows are wrong by design; ms/token
median of 3 interleaved rounds. Also the dense step without its FFN is not possible this way
(its down GEMV shares a kernel with the o-projection), so attention side = skip without FFN."""
import importlib.util, json, sys, types
import numpy as np
import cupy as cp
spec = importlib.util.spec_from_file_location("dg", "bench/decode_gpu.py")
dg = importlib.util.module_from_spec(spec); spec.loader.exec_module(dg)
from minisparse.kernels import decode_cuda as dc

args = types.SimpleNamespace(quick=False, layers=None, prompt=16, new=128)
cfg = dg.make_config(args)
p_dev, active = dc.exactly_sparse_params(cfg, sparsity=0.9, seed=1, xp=cp, dtype=np.float32)
model = dg.device_model(cfg, p_dev)
prompt = dg.prompt_ids(args, cfg)
noop = cp.RawKernel(r'''extern "C" __global__ void noop_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}''', "noop_wait")

def variant(dec, name):
    k = dict(dec._k_orig)
    dec.act = dec._act_orig
    if "nodown" in name:
        k["ffn_down_rows_il"] = noop
    if "noffn" in name:
        k["ffn_down_rows_il"] = noop
        k[dc.SELECT_FIRST[dec.select_kernel]] = noop
    if "noup" in name:
        dec.act = types.SimpleNamespace(gated=False, name=dec._act_orig.name)
    if "nohead" in name:
        pass
    if "noattn" in name:
        k["attn_split"] = noop
    dec.k = k
    dec.down_kernel = "interleaved_r64" if "r64" in name else "interleaved"
    dec._graph = None

res = {}
decs = {"dense": dc.GraphDecoder(model, mode="dense", weight_dtype="float16", max_len=args.prompt + args.new),
        "skip": dc.GraphDecoder(model, mode="skip", weight_dtype="float16", max_len=args.prompt + args.new)}
for d in decs.values():
    d._k_orig, d._act_orig = d.k, d.act
rows = [("dense", "dense"), ("skip", "skip"), ("skip", "skip r64"), ("skip", "skip nodown"), ("skip", "skip noup"),
        ("skip", "skip noup nodown"), ("skip", "skip noffn"), ("skip", "skip noattn"), ("skip", "skip noffn noattn")]
times = {n: [] for _, n in rows}
for _ in range(3):
    for mode, name in rows:
        dec = decs[mode]
        variant(dec, name)
        dec.generate(prompt, 4)
        dec.generate(prompt, args.new)
        times[name].append(dec.last_timing["decode_s"] / dec.last_timing["decode_steps"])
props = cp.cuda.runtime.getDeviceProperties(0)
print("GPU:", props["name"])
base = float(np.median(times["skip"]))
for _, name in rows:
    t = float(np.median(times[name]))
    res[name] = dict(ms=t * 1e3, runs=[x * 1e3 for x in times[name]])
    print(f"  {name:<22} {t * 1e3:7.3f} ms/token   skip - this = {(base - t) * 1e3:7.3f} ms = {(base - t) * 1e6 / 32:6.2f} us/layer")
json.dump(dict(gpu=str(props["name"]), rows=res), open(sys.argv[1], "w"), indent=1)
