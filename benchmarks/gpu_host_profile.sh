#!/usr/bin/env bash
# On the GPU machine (issue 17): py-spy's samples of `kiln bench throughput` on the 8B shape (bf16, random
# weights, batch 256, 1,000 requests of 128/128; the engine gpu_offline_ab.sh builds; the engine core in a process
# of its own unless ENGINE_CORE=thread), as collapsed stacks of both processes in
# OUT/offline_host.txt, to find where the host's share of a step goes (benchmarks/host_profile_summary.py reads
# them). Needs the py-spy wheel in .gpu-inputs/tools/ (pip download --only-binary=:all: py-spy; carried), beside .whl/.
#   bash benchmarks/gpu_host_profile.sh OUT
set -uo pipefail
out="${1:-/tmp/out}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists" | tail -2
python3 -c "import glob, os, zipfile; z = zipfile.ZipFile(glob.glob('.gpu-inputs/tools/py_spy-*.whl')[0]); \
name = next(n for n in z.namelist() if n.endswith('/scripts/py-spy')); open('/tmp/py-spy', 'wb').write(z.read(name)); \
os.chmod('/tmp/py-spy', 0o755)"
export PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0 PYTHONPATH="$PWD:/tmp/site"
tokenizer=()
[ -f .gpu-inputs/smollm2-tokenizer/tokenizer.json ] && tokenizer=(--tokenizer .gpu-inputs/smollm2-tokenizer)
[ -d /tmp/8b ] || python3 benchmarks/random_model.py llama-3.1-8b /tmp/8b "${tokenizer[@]}" > /dev/null
[ -f /tmp/8b-engine/engine.json ] || python3 -m kiln.cli.main build /tmp/8b -o /tmp/8b-engine --dtype bfloat16 \
    --tune off --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 | grep -v "%|" | tail -2
/tmp/py-spy record --rate 250 --format raw --subprocesses --output "$out/offline_host.txt" -- \
    python3 -m kiln.cli.main bench throughput /tmp/8b-engine --input-len 128 --output-len 128 --num-requests 1000 \
    --engine-core "${ENGINE_CORE:-process}" --json "$out/offline_profiled.json" 2>&1 | grep -E "output tokens/s|host time|schedule|py-spy|Error"
