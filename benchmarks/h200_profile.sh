#!/usr/bin/env bash
# On the GPU machine: where the batch-1 decode step's time goes (benchmarks/profile_decode_step.py)
# for random-weight models of Llama-3.2-1B's and Llama-3.1-8B's shapes, with CUDA graphs (as kiln
# runs) and without (each kernel's own time), after the GPU tests.
# Usage (repo root): bash benchmarks/h200_profile.sh OUT_DIR [tests]
set -uo pipefail
out="${1:-/tmp/out}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
if [ "${2:-}" = tests ]; then
  KILN_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
    tests/test_model_parity.py tests/test_llm.py tests/test_engine_core.py tests/test_async_llm.py tests/test_ops.py \
    2>&1 | tee "$out/h200_tests.log" | grep -E "passed|failed|Error|FAILED" | tail -25
fi
for which in 1b 8b; do
  shape=$([ "$which" = 8b ] && echo llama-3.1-8b || echo llama-3.2-1b)
  if [ ! -f "/tmp/$which-engine/engine.json" ]; then
    python3 benchmarks/random_model.py "$shape" "/tmp/$which" > /dev/null
    python3 -m kiln.cli.main build "/tmp/$which" -o "/tmp/$which-engine" --dtype bfloat16 --tune off \
      --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 | grep -v "%|"
  fi
  for graphs in auto off; do
    timeout 120 python3 benchmarks/profile_decode_step.py "/tmp/$which-engine" --batch 1 --context 128 \
      --graphs "$graphs" --json "$out/h200_${which}_profile_b1_graphs_${graphs}.json" 2>&1 | grep -v "it/s\]"
  done
done
