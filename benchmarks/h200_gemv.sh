#!/usr/bin/env bash
# On the GPU machine: the CUDA tests of the kernels, sampler and runtime; with "timings", the
# few-row matrix-product kernel against cuBLAS (benchmarks/gpu_gemv.py); then engines built with
# tuning and benchmarked (h200_tuned.sh) and the 8B batch-1 decode step's profile on the tuned engine.
# Usage (repo root): bash benchmarks/h200_gemv.sh OUT_DIR [timings]
set -uo pipefail
out="${1:-/tmp/out}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
KILN_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
  tests/test_sampler.py tests/test_model_parity.py tests/test_llm.py tests/test_engine_core.py tests/test_ops.py \
  2>&1 | tee "$out/h200_tests.log" | grep -E "passed|failed|Error|FAILED" | tail -25
[ "${2:-}" = timings ] && timeout 150 python3 benchmarks/gpu_gemv.py "$out/h200_gemv.json"
bash benchmarks/h200_tuned.sh "$out"
timeout 100 python3 benchmarks/profile_decode_step.py /tmp/8b-tuned --batch 1 --context 128 \
  --json "$out/h200_8b_tuned_profile_b1.json" 2>&1 | grep -v "it/s\]"
