#!/usr/bin/env bash
# One device call for issue 14 item 4 (and the H200 host's CPU row of item 2):
#   GPU tests of the new paths, the GPU target benchmark (+ ffn_fused grid sweep), the CPU
#   target benchmark on the host's CPU. About 3 minutes on a fresh H200 machine (+ start).
# Run from the repository root on the device machine (device tool), e.g.
#   bash bench/run_gpu_targets.sh          # writes under $OUT (or bench/results/ without it)
# Copy what comes back into bench/results/ and commit it.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
O="${OUT:-bench/results}"
mkdir -p "$O"
{ nvidia-smi -L; lscpu | grep -E "Model name|^CPU\(s\)"; python3 -c "import cupy, numba, numpy, torch; \
print('cupy', cupy.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"; \
} > "$O/h200_env.log" 2>&1
timeout "${TESTS_S:-75}" python3 -m pytest tests/backends/test_gpu_kernels.py -q -p no:cacheprovider -m gpu --maxfail=5 \
  > "$O/gpu_tests_fused.log" 2>&1; echo "pytest rc=$?" >> "$O/gpu_tests_fused.log"
timeout "${GPU_S:-60}" python3 bench/ffn_sparse.py --gpu-only --targets --sweep --repeats 9 \
  --json "$O/ffn_sparse_gpu_targets.json" > "$O/ffn_sparse_gpu_targets.log" 2>&1; echo "rc=$?" >> "$O/ffn_sparse_gpu_targets.log"
timeout "${CPU_S:-60}" python3 bench/ffn_sparse.py --cpu-only --targets --repeats 7 \
  --json "$O/ffn_sparse_cpu_targets_h200host.json" > "$O/ffn_sparse_cpu_targets_h200host.log" 2>&1; \
  echo "rc=$?" >> "$O/ffn_sparse_cpu_targets_h200host.log"
tail -n 8 "$O/gpu_tests_fused.log"; tail -n 45 "$O/ffn_sparse_gpu_targets.log"; tail -n 14 "$O/ffn_sparse_cpu_targets_h200host.log"
