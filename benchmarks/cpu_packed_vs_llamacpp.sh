#!/usr/bin/env bash
# Packed GGUF engines on the CPU, side by side in one run: kiln with the file's blocks kept packed, kiln
# with them decoded to float32 (--decode-weights), and llama.cpp on the same file, at batch 1 (BATCH=B: B
# sequences decoded together), 2 threads, 128 prompt / 128 output tokens. Each engine is built once into ENGINES; the JSON of every run lands in OUT_DIR.
#
#   bash benchmarks/cpu_packed_vs_llamacpp.sh OUT_DIR [FILE.gguf ...]
#
# With no files: the bundled SmolLM2-135M-Instruct (Q4_1 projections, Q8_0 embeddings). Larger files: the
# random Llama-3.2-1B shape quantized by llama.cpp's own tools:
#   python3 benchmarks/random_model.py llama-3.2-1b HF_DIR
#   LLAMACPP_PYTHON benchmarks/llamacpp_convert_random.py LLAMA_CPP_DIR HF_DIR --outtype f16 --outfile F16.gguf
#   LLAMACPP_PYTHON benchmarks/llamacpp_quantize.py F16.gguf OUT.gguf Q4_K_M     (or Q4_0, Q8_0)
# (LLAMA_CPP_DIR: vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist; LLAMACPP_PYTHON: a venv with
# llama-cpp-python, see benchmarks/llamacpp_cpu_decode.py, and for the converter torch==2.13.0,
# transformers, sentencepiece, safetensors, gguf, protobuf.)
#
# Environment: LLAMACPP_PYTHON (default /work/llamacpp-venv/bin/python), DECODED (default 1: also run the
# float32 engine of the first file; 0 skips it), ITERATIONS (default 3), ENGINES (default /tmp/kiln-bench-engines),
# BATCH (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:?usage: bash benchmarks/cpu_packed_vs_llamacpp.sh OUT_DIR [FILE.gguf ...]}
shift
LLAMACPP_PYTHON=${LLAMACPP_PYTHON:-/work/llamacpp-venv/bin/python}
ITERATIONS=${ITERATIONS:-3}
ENGINES=${ENGINES:-/tmp/kiln-bench-engines}  # built once, outside OUT_DIR (a 1B engine is about 1 GB)
BATCH=${BATCH:-1}
suffix=$([ "$BATCH" = 1 ] || echo "-b$BATCH")
mkdir -p "$OUT"
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=("$(python3 -c 'from kiln.builder.engine_cache import default_model; print(default_model())')")
fi
lscpu > "$OUT/lscpu.txt"
first=1
for file in "${files[@]}"; do
  name=$(basename "$file" .gguf)
  # kind:engine:build flags:environment:bench flags. "int8" runs the packed engine with the int8-activation kernels
  # allowed where int16 ones are the default (q4_0, q4_1, q8_0, q4_k: llama.cpp's numerics; see
  # kiln/ops/packed_linear.py); "eager" runs it without recorded decode steps (every step through the model's Python).
  engines=("packed:packed:::" "eager:packed:::--cuda-graphs off" "int8:packed::KILN_INT8_ACTIVATIONS=1:")
  if [ "$first" = 1 ] && [ "${DECODED:-1}" = 1 ]; then engines+=("decoded:decoded:--decode-weights::"); fi
  first=0
  for spec in "${engines[@]}"; do
    IFS=: read -r kind dir flags envs bench_flags <<< "$spec"
    engine="$ENGINES/$name-$dir"
    [ -f "$engine/engine.json" ] || python3 -m kiln.cli.main build "$file" -o "$engine" --max-seq-len 512 $flags
    echo "== kiln $name ($kind), load $(cut -d' ' -f1-3 /proc/loadavg)"
    env $envs python3 -m kiln.cli.main bench latency "$engine" --input-len 128 --output-len 128 --batch-size "$BATCH" \
      --iterations "$ITERATIONS" --warmup 1 $bench_flags --json "$OUT/kiln-$name-$kind$suffix.json" 2>&1 \
      | grep -E "chosen|time per output|decode tokens/s|weights \(MB\)"
  done
  echo "== llama.cpp $name, load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$LLAMACPP_PYTHON" benchmarks/llamacpp_cpu_decode.py "$file" --threads 2 --input-len 128 --output-len 128 \
    --batch-size "$BATCH" --runs "$ITERATIONS" --warmup 1 --max-others-share 0.05 \
    --json "$OUT/llamacpp-$name$suffix.json" > /dev/null
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(' decode tokens/s (median)', d['decode_tok_s_median'], [r['decode_tok_s'] for r in d['runs']])" "$OUT/llamacpp-$name$suffix.json"
done
echo "load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
