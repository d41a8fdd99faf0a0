#!/usr/bin/env bash
# On the GPU machine (issue 17): py-spy's samples of `kiln bench throughput` on the 8B shape (bf16, random
# weights, batch 256, 1,000 requests of 128/128; gpu_setup.sh's engine; the engine core in a process
# of its own unless ENGINE_CORE=thread), as collapsed stacks of both processes in
# OUT/offline_host.txt, to find where the host's share of a step goes (benchmarks/host_profile_summary.py reads
# them). Needs the py-spy wheel in .gpu-inputs/tools/ (pip download --only-binary=:all: py-spy; carried), beside .whl/.
#   bash benchmarks/gpu_host_profile.sh OUT
set -uo pipefail
out="${1:-/tmp/out}"
source benchmarks/gpu_setup.sh
install_wheels
unpack_py_spy
export PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0 PYTHONPATH="$PWD:/tmp/site"
engine_8b
/tmp/py-spy record --rate 250 --format raw --subprocesses --output "$out/offline_host.txt" -- \
    python3 -m kiln.cli.main bench throughput /tmp/8b-engine --input-len 128 --output-len 128 --num-requests 1000 \
    --engine-core "${ENGINE_CORE:-process}" --json "$out/offline_profiled.json" 2>&1 | grep -E "output tokens/s|host time|schedule|py-spy|Error"
