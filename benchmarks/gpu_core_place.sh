#!/usr/bin/env bash
# On the GPU machine (issue 17): `kiln bench throughput` on the 8B shape (bf16, random weights, batch 256, 1,000
# requests of 128/128; the engine gpu_offline_ab.sh builds) with the engine core in a thread of the benchmark's
# process (the default on a GPU; it shares the interpreter lock with the detokenizing main thread), the same
# with the interpreter's switch interval at 0.5 ms instead of 5, and in a process of its own (as kiln serve runs
# it): where the host's share of a step goes in each (its phases).
#   bash benchmarks/gpu_core_place.sh OUT [ROUNDS]
set -uo pipefail
out="${1:-/tmp/out}"
rounds="${2:-1}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists" | tail -2
export PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0 PYTHONPATH="$PWD:/tmp/site"
tokenizer=()
[ -f .gpu-inputs/smollm2-tokenizer/tokenizer.json ] && tokenizer=(--tokenizer .gpu-inputs/smollm2-tokenizer)
[ -d /tmp/8b ] || python3 benchmarks/random_model.py llama-3.1-8b /tmp/8b "${tokenizer[@]}" > /dev/null
[ -f /tmp/8b-engine/engine.json ] || python3 -m kiln.cli.main build /tmp/8b -o /tmp/8b-engine --dtype bfloat16 \
    --tune off --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 | grep -v "%|" | tail -2
bench=(bench throughput /tmp/8b-engine --input-len 128 --output-len 128 --num-requests 1000)
for round in $(seq "$rounds"); do
  for variant in ${VARIANTS:-thread switch process}; do
    echo "== $variant, round $round"
    case $variant in
      thread) cmd=(python3 -m kiln.cli.main "${bench[@]}" --engine-core thread) ;;
      switch) cmd=(python3 -c "import runpy, sys; sys.setswitchinterval(5e-4); sys.argv[0] = 'kiln'; \
runpy.run_module('kiln.cli.main', run_name='__main__')" "${bench[@]}" --engine-core thread) ;;
      process) cmd=(python3 -m kiln.cli.main "${bench[@]}" --engine-core process) ;;
    esac
    timeout 200 "${cmd[@]}" --json "$out/offline_${variant}_$round.json" 2>&1 | grep -E "output tokens/s|host time|schedule|rror"
  done
done
