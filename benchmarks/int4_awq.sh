#!/usr/bin/env bash
# int4 from float weights on SmolLM2-135M (the bundled Q4_1 file, decoded): round to nearest against activation-aware
# scales (kiln/builder/awq.py), in groups of 128 (64 on the 576-wide rows) and of 32: perplexity on kiln's own text
# (`kiln bench perplexity`, windows of 512) and float32's top token kept on a text's prefixes
# (benchmarks/quantized_quality.py). BENCHMARKS.md "int4 with activation-aware scales".
# Usage: bash benchmarks/int4_awq.sh OUT_DIR   (CPU; engines go to a temporary folder)
set -euo pipefail
out=${1:?usage: bash benchmarks/int4_awq.sh OUT_DIR}
mkdir -p "$out"
engines=$(mktemp -d)
trap 'rm -rf "$engines"' EXIT
gguf=$(python -c "from kiln.builder.engine_cache import default_model; print(default_model())")
lscpu > "$out/lscpu.txt"
kiln build "$gguf" -o "$engines/float" --decode-weights --device cpu
kiln bench perplexity "$engines/float" --device cpu --json "$out/perplexity_float.json"
for group in 128 32; do
  for calibration in none awq; do
    name="int4_g${group}_${calibration}"
    start=$(date +%s)
    kiln build "$gguf" -o "$engines/$name" --decode-weights --device cpu --quantize int4 --group-size "$group" \
      --quantize-calibration "$calibration"
    echo "$name build_s $(( $(date +%s) - start ))" | tee -a "$out/build_seconds.txt"
    kiln bench perplexity "$engines/$name" --device cpu --json "$out/perplexity_$name.json"
  done
done
for calibration in none awq; do
  python benchmarks/quantized_quality.py --formats int4_g128 int4_g32 --quantize-calibration "$calibration" \
    --json "$out/top1_$calibration.json"
done
