#!/usr/bin/env bash
# On the GPU machine: `kiln bench throughput` on the 8B shape (SHAPE=llama-3.2-1b for the 1B one; bf16, random
# weights, batch 256, 1,000 requests of 128/128) with an earlier kiln tree and with this one, alternating, on the
# same engine: a before/after of a change to the host's step code, with each run's host-time phases. The 8B
# engine is gpu_setup.sh's.
#   git archive REV kiln | tar -x -C .gpu-inputs/before     (here; .gpu-inputs travels with `carry`)
#   bash benchmarks/gpu_offline_ab.sh OUT .gpu-inputs/before [ROUNDS]
set -uo pipefail
out="${1:-/tmp/out}"
before="${2:?the earlier tree: a folder holding its kiln package}"
rounds="${3:-2}"
source benchmarks/gpu_setup.sh
install_wheels
export PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0 PYTHONPATH="$PWD:/tmp/site"
shape=${SHAPE:-llama-3.1-8b}
model=/tmp/$shape engine=/tmp/$shape-engine
[ "$shape" = llama-3.1-8b ] && model=/tmp/8b engine=/tmp/8b-engine  # engine_8b's
random_engine "$shape" "$model" "$engine"
for round in $(seq "$rounds"); do
  for side in before after; do
    tree=$PWD; [ $side = before ] && tree=$(cd "$before" && pwd)
    echo "== $side, round $round"
    PYTHONPATH="$tree:/tmp/site" timeout 200 python3 -m kiln.cli.main bench throughput $engine --input-len 128 \
        --output-len 128 --num-requests 1000 --json "$out/offline_${side}_$round.json" 2>&1 \
        | grep -E "output tokens/s|host time|schedule"
  done
done
