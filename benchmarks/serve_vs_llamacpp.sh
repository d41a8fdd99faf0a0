#!/usr/bin/env bash
# kiln bench serve against kiln serve and against llama.cpp's OpenAI server (llama-cpp-python[server]),
# both serving the bundled SmolLM2-135M-Instruct GGUF, with the same synthetic prompts (same seed) at
# the same concurrencies. One server runs at a time, so the two never share the CPU; each is stopped
# when its half ends, and whatever is still running when the script exits (an error, Ctrl-C) is stopped.
#
#   bash benchmarks/serve_vs_llamacpp.sh [OUT_DIR]      (default: benchmarks/results/serve_vs_llamacpp)
#
# Writes OUT_DIR/{llamacpp,kiln}-c{C}.json (kiln bench serve's JSON, with the exact command in it), the
# servers' logs, OUT_DIR/load.txt (the machine's load average as each half starts and ends: other work
# on the machine slows both) and OUT_DIR/summary.md, a table of both side by side.
#
# llama.cpp's side, in a virtual environment of its own (its server brings FastAPI and its own pins, kept
# away from kiln's server packages; pip builds llama.cpp from source, several minutes):
#   python3 -m venv VENV && CMAKE_BUILD_PARALLEL_LEVEL=2 VENV/bin/pip install "llama-cpp-python[server]==0.3.36"
#
# Environment:
#   LLAMACPP_PYTHON  a python that has llama-cpp-python[server], e.g. VENV/bin/python (default: python3)
#   SERVERS          which halves to run (default "llamacpp kiln")
#   CONCURRENCY      default "1 4 16"; each level sends max(8, 4 x C) requests
#   INPUT_LEN / OUTPUT_LEN  tokens per prompt / per output (default 128 / 128)
#   THREADS          CPU threads each server computes with (default 2)
#   KILN_BACKEND     protocol for kiln: openai-completions (default) or triton-generate (its generate_stream)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

OUT=${1:-benchmarks/results/serve_vs_llamacpp}
LLAMACPP_PYTHON=${LLAMACPP_PYTHON:-python3}
SERVERS=${SERVERS:-"llamacpp kiln"}
CONCURRENCY=${CONCURRENCY:-"1 4 16"}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
THREADS=${THREADS:-2}
KILN_BACKEND=${KILN_BACKEND:-openai-completions}
MODEL_NAME=smollm2
mkdir -p "$OUT"
: > "$OUT/load.txt"
MAX_CONCURRENCY=$(printf '%s\n' $CONCURRENCY | sort -n | tail -1)

GGUF=$(python3 -c 'from kiln.builder.engine_cache import default_model; print(default_model())')

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# wait_ready URL LOG: until URL answers 200, or the server dies, or 10 minutes pass (a first start builds the engine).
wait_ready() {
    for _ in $(seq 1200); do
        if curl -sf -o /dev/null "$1"; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "the server exited:" >&2; tail -20 "$2" >&2; return 1; fi
        sleep 0.5
    done
    echo "the server did not answer $1 in time" >&2
    return 1
}

# bench NAME URL BACKEND: kiln bench serve at every concurrency, one JSON each.
bench() {
    local name=$1 url=$2 backend=$3 c n
    for c in $CONCURRENCY; do
        n=$(( 4 * c > 8 ? 4 * c : 8 ))
        echo "== $name, concurrency $c ($n requests)"
        python3 -m kiln.cli.main bench serve --url "$url" --backend "$backend" --model "$MODEL_NAME" --label "$name" \
            --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-prompts "$n" --max-concurrency "$c" \
            --warmup 2 --seed 0 --no-progress --json "$OUT/$name-c$c.json"
    done
}

for server in $SERVERS; do
    port=$(free_port)
    echo "$server start: $(cat /proc/loadavg)" >> "$OUT/load.txt"
    case $server in
    llamacpp)
        # llama.cpp computes with the GGUF's own 4-bit (Q4_1) weights, one request at a time: by default
        # a new request cuts the running one short, so --interrupt_requests False makes them queue.
        "$LLAMACPP_PYTHON" -m llama_cpp.server --model "$GGUF" --model_alias "$MODEL_NAME" --host 127.0.0.1 \
            --port "$port" --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx 4096 \
            --interrupt_requests False > "$OUT/llamacpp-server.log" 2>&1 &
        SERVER_PID=$!
        wait_ready "http://127.0.0.1:$port/v1/models" "$OUT/llamacpp-server.log"
        bench llamacpp "http://127.0.0.1:$port" openai-completions
        ;;
    kiln)
        # kiln builds the GGUF into a float32 engine (once, in its engine cache) and computes in float32,
        # batching up to the highest concurrency in flight.
        OMP_NUM_THREADS=$THREADS python3 -m kiln.cli.main serve "$GGUF" --served-model-name "$MODEL_NAME" \
            --max-batch-size "$(( MAX_CONCURRENCY > 8 ? MAX_CONCURRENCY : 8 ))" \
            --http-port "$port" --grpc-port 0 --metrics-port 0 > "$OUT/kiln-server.log" 2>&1 &
        SERVER_PID=$!
        wait_ready "http://127.0.0.1:$port/v2/health/ready" "$OUT/kiln-server.log"
        bench kiln "http://127.0.0.1:$port" "$KILN_BACKEND"
        ;;
    *)
        echo "unknown server '$server' (SERVERS takes llamacpp and kiln)" >&2
        exit 2
        ;;
    esac
    echo "$server end: $(cat /proc/loadavg)" >> "$OUT/load.txt"
    stop_server
done

python3 - "$OUT" $CONCURRENCY <<'EOF'
import json, sys
from pathlib import Path

out, levels = Path(sys.argv[1]), sys.argv[2:]
rows = ["| concurrency | server | done / failed | output tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
        "| ITL p50 / p99 (ms) | e2e p50 (ms) | output len (mean) | tokens counted by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for c in levels:
    for name in ("kiln", "llamacpp"):
        f = out / f"{name}-c{c}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())["results"]
        ms = lambda k, p: "-" if r[k][p] is None else f"{r[k][p]:.1f}"
        rows.append(f"| {c} | {name} | {r['completed']} / {r['failed']} | {r['output_throughput']:.1f} | "
                    f"{r['request_throughput']:.3f} | {ms('ttft_ms', 'p50')} / {ms('ttft_ms', 'p99')} | "
                    f"{ms('tpot_ms', 'p50')} / {ms('tpot_ms', 'p99')} | {ms('itl_ms', 'p50')} / {ms('itl_ms', 'p99')} | "
                    f"{ms('e2e_latency_ms', 'p50')} | {r['output_len']['mean']} | "
                    f"{', '.join(r['output_tokens_counted_by'])} |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
