#!/usr/bin/env bash
# SmolLM2-135M-Instruct on this CPU (2 threads): kiln against transformers' generate, same run,
# batch 1 and batch 8, 128-token prompts, 128 new tokens (the figures in BENCHMARKS.md).
set -euo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
export OMP_NUM_THREADS=2
for b in 1 8; do
  kiln bench latency --dtype float32 --input-len 128 --output-len 128 --batch-size "$b" --iterations 3 \
    --warmup 1 --compare-hf --json "$out/cpu_smollm2_latency_b$b.json"
done
