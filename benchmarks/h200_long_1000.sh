#!/usr/bin/env bash
# On the GPU machine: the 8B shape's throughput at 128 in / 2,048 out with 1,000 requests (the issue's
# request count; h200_long.sh ran 256 to fit a session's GPU time), on an engine built with default configs.
# Usage (repo root): bash benchmarks/h200_long_1000.sh OUT_DIR
set -uo pipefail
out="${1:-/tmp/out}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
python3 benchmarks/random_model.py llama-3.1-8b /tmp/8b > /dev/null
python3 -m kiln.cli.main build /tmp/8b -o /tmp/8b-engine --dtype bfloat16 --tune off \
  --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 | grep -v "%|"
timeout 300 python3 -m kiln.cli.main bench throughput /tmp/8b-engine --input-len 128 --output-len 2048 \
  --num-requests 1000 --json "$out/h200_8b_throughput_128_2048_1000.json" 2>&1 | grep -v "it/s\]" | tail -22
