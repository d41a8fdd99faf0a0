#!/usr/bin/env bash
# On the GPU machine: does the 8B shape's offline throughput (1,000 requests of 128/128 at once) rise past
# batch 256? One engine per weight format, built with a ceiling of 1,024 sequences a step (8,192 tokens a
# step, max_seq_len 4096, --tune off), then `kiln bench throughput --max-batch-size B` for each B: the runtime
# admits at most B sequences, the engine and its weights stay the same (CUDA graphs are captured up to B).
# Each engine first runs one untimed bench of 200 requests: a fresh machine compiles its Triton kernels then.
#   bash benchmarks/gpu_batch_ceiling.sh OUT "fp8 none" "256 512 1024" [NUM_REQUESTS]
set -uo pipefail
out="${1:-/tmp/out}"
formats="${2:-fp8}"
batches="${3:-256 512 1024}"
requests="${4:-1000}"
source benchmarks/gpu_setup.sh
install_wheels
export PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0 PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -d /tmp/8b ] || /usr/bin/time -f "random 8B: %e s" python3 benchmarks/random_model.py llama-3.1-8b /tmp/8b \
    $([ -f .gpu-inputs/smollm2-tokenizer/tokenizer.json ] && echo --tokenizer .gpu-inputs/smollm2-tokenizer) >/dev/null
for q in $formats; do
  dir=/tmp/8b-$q-b1024
  [ -f "$dir/engine.json" ] || /usr/bin/time -f "build $q: %e s" python3 -m kiln.cli.main build /tmp/8b -o "$dir" \
      --dtype bfloat16 --tune off --max-seq-len 4096 --max-batch-size 1024 --max-num-tokens 8192 \
      $([ "$q" = none ] || echo --quantize "$q") 2>&1 | grep -v "%|" | tail -2
  timeout 200 python3 -m kiln.cli.main bench throughput "$dir" --input-len 128 --output-len 128 \
      --num-requests 200 --max-batch-size 256 >/dev/null 2>&1 || echo "warm-up of $q failed"
  for b in $batches; do
    echo "== $q, batch $b, $requests requests"
    timeout 200 python3 -m kiln.cli.main bench throughput "$dir" --input-len 128 --output-len 128 \
        --num-requests "$requests" --max-batch-size "$b" --json "$out/batch_ceiling_${q}_b${b}_n${requests}.json" 2>&1 \
        | grep -E "output tokens/s|host time|schedule|TTFT|TPOT|Error|error" | head -8
  done
done
