#!/usr/bin/env bash
# SmolLM2-135M-Instruct on this CPU (all its cores): kiln against transformers' generate in the same
# run, batch 1 and batch 8, 128-token prompts, 128 new tokens; once on the machine as it is, once
# beside one busy neighbour process (a Python spin loop). The figures in BENCHMARKS.md.
set -euo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
lscpu > "$out/cpu_smollm2_lscpu.txt"
for n in 0 1; do
  for b in 1 8; do
    kiln bench latency --dtype float32 --input-len 128 --output-len 128 --batch-size "$b" --iterations 3 \
      --warmup 1 --compare-hf --busy-neighbours "$n" --json "$out/cpu_smollm2_latency_b${b}_n${n}.json"
  done
done
