#!/usr/bin/env bash
# On the GPU machine (issue 17): the host's time per step by phase at batch 1, 64 and 256 on the 8B shape
# (gpu_setup.sh's engine; 128 prompt / 128 output tokens), from `kiln bench latency`, whose "decode steps alone"
# row leaves out the prefill steps (where launches can wait on a full device queue). BEFORE=DIR also runs an
# earlier kiln tree (git archive REV kiln | tar -x -C DIR), alternating with this one.
#   bash benchmarks/gpu_host_phases.sh OUT
set -uo pipefail
out="${1:-/tmp/out}"
source benchmarks/gpu_setup.sh
install_wheels
export PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
PYTHONPATH="$PWD:/tmp/site" engine_8b
trees=("after:$PWD")
[ -n "${BEFORE:-}" ] && trees=("before:$(cd "$BEFORE" && pwd)" "${trees[@]}")
for batch in ${BATCHES:-1 64 256}; do
  for entry in "${trees[@]}"; do
    side=${entry%%:*} tree=${entry#*:}
    echo "== $side, batch $batch"
    PYTHONPATH="$tree:/tmp/site" timeout 240 python3 -m kiln.cli.main bench latency /tmp/8b-engine --input-len 128 \
        --output-len 128 --batch-size "$batch" --iterations 2 --json "$out/latency_${side}_b$batch.json" 2>&1 \
        | grep -E "decode tokens/s \(mean\)|host time|decode steps alone|schedule"
  done
done
