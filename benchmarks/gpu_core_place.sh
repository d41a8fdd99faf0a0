#!/usr/bin/env bash
# On the GPU machine (issue 17): `kiln bench throughput` on the 8B shape (bf16, random weights, batch 256, 1,000
# requests of 128/128; gpu_setup.sh's engine) with the engine core in a thread of the benchmark's
# process (the default on a GPU; it shares the interpreter lock with the detokenizing main thread), the same
# with the interpreter's switch interval at 0.5 ms instead of 5, and in a process of its own (as kiln serve runs
# it): where the host's share of a step goes in each (its phases).
#   bash benchmarks/gpu_core_place.sh OUT [ROUNDS]
set -uo pipefail
out="${1:-/tmp/out}"
rounds="${2:-1}"
source benchmarks/gpu_setup.sh
install_wheels
export PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0 PYTHONPATH="$PWD:/tmp/site"
engine_8b
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
