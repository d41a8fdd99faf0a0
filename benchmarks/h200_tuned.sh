#!/usr/bin/env bash
# On the GPU machine: engines built with kernel autotuning (kiln build on a GPU times each op's
# candidates at the engine's shapes), their plans, and kiln bench on them.
# Usage (repo root): bash benchmarks/h200_tuned.sh OUT_DIR
set -uo pipefail
out="${1:-/tmp/out}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
for which in 1b 8b; do
  shape=$([ "$which" = 8b ] && echo llama-3.1-8b || echo llama-3.2-1b)
  [ -f "/tmp/$which/config.json" ] || python3 benchmarks/random_model.py "$shape" "/tmp/$which" > /dev/null
  /usr/bin/time -f "$which build with tuning: %e s" python3 -m kiln.cli.main build "/tmp/$which" \
    -o "/tmp/$which-tuned" --dtype bfloat16 --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 \
    | grep -v "%|"
  cp "/tmp/$which-tuned/engine.json" "$out/h200_${which}_tuned_engine.json"
  python3 -m kiln.cli.main inspect "/tmp/$which-tuned" | sed -n '/^plan/,/^target/p' | head -40
  timeout 200 python3 -m kiln.cli.main bench latency "/tmp/$which-tuned" --input-len 128 --output-len 256 \
    --iterations 3 --compare-hf --json "$out/h200_${which}_tuned_latency_b1.json" 2>&1 | grep -E "decode|limit|time per|kiln/hf"
  timeout 200 python3 -m kiln.cli.main bench throughput "/tmp/$which-tuned" --input-len 128 --output-len 128 \
    --num-requests 1000 --json "$out/h200_${which}_tuned_throughput.json" 2>&1 | grep -E "output tokens/s|time per"
done
