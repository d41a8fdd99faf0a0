#!/usr/bin/env bash
# On the GPU machine: the 8B shape's throughput at 128/2048 (256 requests: one full batch, to fit the
# session's GPU time) and 2048/128 (1,000 requests), and
# kiln's logits against transformers' on the random 1B and 8B models (benchmarks/logits_distance.py).
# Usage (repo root): bash benchmarks/h200_long.sh OUT_DIR
set -uo pipefail
out="${1:-/tmp/out}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
for which in 1b 8b; do
  shape=$([ "$which" = 8b ] && echo llama-3.1-8b || echo llama-3.2-1b)
  python3 benchmarks/random_model.py "$shape" "/tmp/$which" > /dev/null
  python3 -m kiln.cli.main build "/tmp/$which" -o "/tmp/$which-engine" --dtype bfloat16 --tune off \
    --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 | grep -v "%|"
  timeout 120 python3 benchmarks/logits_distance.py "/tmp/$which" "/tmp/$which-engine" "$out/h200_${which}_logits.json" \
    2>&1 | grep -v "it/s\]" | tail -14
done
for run in "128 2048 256" "2048 128 1000"; do
  set -- $run
  timeout 150 python3 -m kiln.cli.main bench throughput /tmp/8b-engine --input-len "$1" --output-len "$2" \
    --num-requests "$3" --json "$out/h200_8b_throughput_${1}_${2}.json" 2>&1 | grep -v "it/s\]" | tail -22
done
