#!/usr/bin/env bash
# On the GPU machine, one call: the CUDA tests, the Triton kernel checks and timings, and a first
# batch-1 decode benchmark of a random Llama-3.2-1B-shaped model (graphs on), transformers beside it.
# Usage (repo root): bash benchmarks/h200_check.sh OUT_DIR
set -uo pipefail
out="${1:-/tmp/out}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
KILN_TEST_DEVICE=cuda timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
  tests/test_model_parity.py tests/test_llm.py tests/test_engine_core.py tests/test_ops.py 2>&1 \
  | tee "$out/h200_tests.log" | grep -E "passed|failed|Error|FAILED" | tail -25
timeout 240 python3 benchmarks/gpu_kernels.py "$out/gpu_kernels.json" --budget-s 180 2>&1 \
  | tee "$out/gpu_kernels.log" | tail -45
