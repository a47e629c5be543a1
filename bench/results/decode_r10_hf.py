"""Round 10, device call 5 (decode_r10_hf.json): transformers' fp16 eager generate beside
minisparse's three default rows (dense / skip / given, rung sweep of 3 rounds), one process,
same GPU, the shapes and helpers of bench/decode_gpu.py. Written for the last 269 s of device
time, where the full ``bench/decode_gpu.py --no-compile`` would not fit; it is that script's
transformers eager row and its --rung-sweep, nothing else. From the repository root:

    OUT=some/dir PYTHONPATH=. python3 bench/results/decode_r10_hf.py
"""
import json, os, sys, time
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
import numpy as np
import decode_gpu as B
out = os.environ["OUT"]
import argparse
args = argparse.Namespace(quick=False, layers=None, prompt=16, new=128)
res = {}
def dump():
    with open(os.path.join(out, "decode_r10_hf.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=float)
import torch, transformers
res.update(torch=torch.__version__, transformers=transformers.__version__, gpu=torch.cuda.get_device_name())
cfg = B.make_config(args)
prompt = B.prompt_ids(args, cfg)
t0 = time.perf_counter()
hm = B.hf_model(cfg, torch)
print(f"hf model built in {time.perf_counter() - t0:.1f} s", flush=True)
with torch.no_grad():
    s, ids = B.hf_time(hm, torch, prompt, args.new)
res["hf_eager_s_per_token"] = s
print(f"transformers {transformers.__version__} fp16 eager generate: {1 / s:.1f} tok/s {s * 1e3:.2f} ms/token", flush=True)
dump()
del hm
torch.cuda.empty_cache()
import cupy as cp
from minisparse.kernels.decode_cuda import exactly_sparse_params
B.RUNGS = {"dense": [dict()], "skip": [dict()], "given": [dict()]}
p_dev, active = exactly_sparse_params(cfg, sparsity=0.9, seed=1, xp=cp, dtype=np.float32)
r = B.rung_sweep(args, cp, B.device_model(cfg, p_dev), active, prompt, 3)
res["minisparse"] = r
for row in r:
    print(f"  {row['mode']}: {1 / row['s_per_token']:.1f} tok/s = {s / row['s_per_token']:.2f}x transformers eager")
dump()
