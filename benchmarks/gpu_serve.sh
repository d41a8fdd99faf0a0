#!/usr/bin/env bash
# On the GPU machine (issue 17): the engine core process's CUDA tests, then the 8B shape (bf16, random weights)
# offline and served, one after the other on the same engine:
#   kiln bench throughput (1,000 requests of 128/128, one process, no HTTP), then kiln serve with kiln bench serve
#   as the client: OpenAI completions with all requests at once, at a Poisson rate of 50 req/s, and Triton's
#   generate_stream route with all at once.
# Needs wheels in .whl/ of what the GPU image lacks (README: Notes): gguf, pyzmq, msgspec, and for the server
# uvicorn, starlette, pydantic (with pydantic-core, annotated-types, typing-inspection), tritonclient and
# python-rapidjson, httptools. The random model gets SmolLM2's tokenizer where .gpu-inputs/smollm2-tokenizer holds
# it (carried; benchmarks/random_model.py --tokenizer), so the streams carry real text to detokenize. Each served
# run also prints the CPU seconds the server's process (the front end) and its engine core's process spent.
# PYSPY=1 also samples the server's process with py-spy during each served run (OUT/server_MODE.txt; the
# py-spy wheel in .gpu-inputs/tools/). Usage (repo root), MODES to pick the served runs (default "all rate50 triton"):
#   bash benchmarks/gpu_serve.sh OUT {tests|serve|all}
set -uo pipefail
out="${1:-/tmp/out}"
stage="${2:-all}"
source benchmarks/gpu_setup.sh
install_wheels
# TREE: an earlier kiln tree to serve with (a folder holding its kiln package; git archive REV kiln | tar -x -C DIR)
export PYTHONPATH="${TREE:-$PWD}:/tmp/site" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
[ -n "${PYSPY:-}" ] && unpack_py_spy
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
engine=/tmp/8b-engine
cpu_seconds() {  # utime + stime of a process, in seconds
  awk -v hz="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); print ($12 + $13) / hz}' "/proc/$1/stat"
}
run_tests() {
  KILN_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_core_process.py \
      tests/test_async_llm.py 2>&1 | tee "$out/gpu_core_process_tests.log" | grep -E "passed|failed|Error|FAILED" | tail -15
}
run_serve() {
  engine_8b
  [ -n "${SKIP_OFFLINE:-}" ] || timeout 200 python3 -m kiln.cli.main bench throughput $engine --input-len 128 --output-len 128 --num-requests 1000 \
      --json "$out/gpu_8b_offline.json" 2>&1 | grep -v "it/s\]" | tail -12
  python3 -m kiln.cli.main serve $engine --served-model-name kiln8b --http-port 8123 --grpc-port 8124 --metrics-port 8125 > "$out/server.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
  for _ in $(seq 300); do
    curl -sf localhost:8123/v2/health/ready > /dev/null && break
    kill -0 $server 2>/dev/null || { echo "the server exited:"; tail -5 "$out/server.log"; return 1; }
    sleep 1
  done
  for mode in ${MODES:-all rate50 triton}; do
    args=(--url http://127.0.0.1:8123 --input-len 128 --output-len 128 --num-requests 1000 --tokenizer $engine --no-progress)
    case $mode in
      rate50) args+=(--request-rate 50) ;;
      triton) args+=(--backend triton-generate --model kiln8b) ;;
    esac
    echo "== served: $mode"
    core=$(pgrep -P $server | head -1)
    before=$(cpu_seconds $server); core_before=$(cpu_seconds $core)
    spy=
    if [ -n "${PYSPY:-}" ]; then  # the server process's samples (benchmarks/host_profile_summary.py reads them)
      /tmp/py-spy record --rate 200 --format raw --threads --pid $server --output "$out/server_$mode.txt" \
          > /dev/null 2>&1 & spy=$!
    fi
    timeout 240 python3 -m kiln.cli.main bench serve "${args[@]}" --json "$out/gpu_8b_served_$mode.json" 2>&1 | tail -14
    [ -n "$spy" ] && { kill -INT $spy; wait $spy; }
    awk -v a="$before" -v b="$(cpu_seconds $server)" -v c="$core_before" -v d="$(cpu_seconds $core)" \
        'BEGIN {printf "CPU seconds: server process %.2f, engine core process %.2f\n", b - a, d - c}'
  done
  kill $server; wait $server 2>/dev/null
  tail -5 "$out/server.log"
}
case "$stage" in
  tests) run_tests ;;
  serve) run_serve ;;
  all) run_tests; run_serve ;;
esac
