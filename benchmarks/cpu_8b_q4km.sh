#!/usr/bin/env bash
# The 8B shape as a Q4_K_M GGUF on this (24 GB, 2-core) machine: made by llama.cpp's own converter and
# quantizer from a random-weight Hugging Face folder (sharded, so no step holds all 16 GB), then built by
# kiln into a packed engine and decoded beside llama.cpp on the same file (cpu_packed_vs_llamacpp.sh, one
# iteration of 128 + 128 at batch 1). The HF folder and the F16 file are deleted once used (disk).
#
#   bash benchmarks/cpu_8b_q4km.sh OUT_DIR
#
# Environment: WORK (default /work/gguf-8b), LLAMA_CPP_DIR (the llama-cpp-python 0.3.36 sdist's
# vendor/llama.cpp), LLAMACPP_PYTHON (default /work/llamacpp-venv/bin/python); see cpu_packed_vs_llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/cpu_8b_q4km.sh OUT_DIR}
WORK=${WORK:-/work/gguf-8b}
LC=${LLAMA_CPP_DIR:-/work/llamacpp-build/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp}
PY=${LLAMACPP_PYTHON:-/work/llamacpp-venv/bin/python}
GGUF=$WORK/llama-3.1-8b-random-Q4_K_M.gguf
mkdir -p "$WORK" "$OUT"
if [ ! -f "$GGUF" ]; then
  [ -f "$WORK/F16.gguf" ] || {
    [ -f "$WORK/hf/config.json" ] || /usr/bin/time -f "random model: %e s, %M KB" python3 benchmarks/random_model.py llama-3.1-8b "$WORK/hf"
    /usr/bin/time -f "convert: %e s, %M KB" "$PY" benchmarks/llamacpp_convert_random.py "$LC" "$WORK/hf" --outtype f16 \
      --outfile "$WORK/F16.gguf" > "$OUT/convert.log" 2>&1
    rm -rf "$WORK/hf"
  }
  /usr/bin/time -f "quantize: %e s, %M KB" "$PY" benchmarks/llamacpp_quantize.py "$WORK/F16.gguf" "$GGUF" Q4_K_M \
    > "$OUT/quantize.log" 2>&1
  rm -f "$WORK/F16.gguf"
fi
ls -l "$GGUF"
ITERATIONS=${ITERATIONS:-1} DECODED=0 ENGINES="$WORK/engines" bash benchmarks/cpu_packed_vs_llamacpp.sh "$OUT" "$GGUF"
du -sb "$WORK"/engines/* | tee "$OUT/engine_bytes.txt"
