#!/usr/bin/env bash
# On the GPU machine: kiln bench on random-weight models of Llama-3.2-1B's and Llama-3.1-8B's shapes
# (bf16, engines built with max batch 256, 8192 tokens a step, max_seq_len 4096), transformers beside
# kiln in the same runs, and the decode limit (copy bandwidth over weight bytes) measured in each.
# Usage (repo root): bash benchmarks/h200_bench.sh OUT_DIR {1b|8b}
set -uo pipefail
out="${1:-/tmp/out}"
which="${2:-1b}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
kiln() { python3 -m kiln.cli.main "$@"; }
shape=$([ "$which" = 8b ] && echo llama-3.1-8b || echo llama-3.2-1b)
model=/tmp/$which engine=/tmp/$which-engine
if [ ! -f "$engine/engine.json" ]; then
  /usr/bin/time -f "random model: %e s" python3 benchmarks/random_model.py "$shape" "$model"
  /usr/bin/time -f "kiln build: %e s" python3 -m kiln.cli.main build "$model" -o "$engine" --dtype bfloat16 \
    --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 | grep -v "%|"
fi
run() {  # name, then kiln bench arguments
  local name=$1; shift
  timeout 300 python3 -m kiln.cli.main bench "$@" --json "$out/h200_${which}_$name.json" 2>&1 | grep -v "it/s\]" | tail -32
}
run latency_b1 latency "$engine" --input-len 128 --output-len 256 --iterations 3 --compare-hf
run ttft_2048 latency "$engine" --input-len 2048 --output-len 2 --iterations 3
run throughput throughput "$engine" --input-len 128 --output-len 128 --num-requests 1000 --compare-hf
