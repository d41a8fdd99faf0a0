#!/usr/bin/env bash
# On the GPU machine: quantized engines of the 8B shape (issue 14) beside bf16, each built from the same
# random-weight Hugging Face folder with --tune off (the same kernels but the linear ops), in one call.
#   tests: the CUDA tests of the quantized and packed formats (tinygemm, scaled_mm, the fp8 row kernel)
#   fp8:   1,000 requests of 128/128 at once, bf16 then --quantize fp8
#   int4:  batch 1, 128 in / 256 out, bf16, --quantize int4 (groups of 128) and --quantize fp8
#   main:  tests (2 minutes at most), then fp8
# Needs the gguf wheel in .whl/ (README: Notes). Usage (repo root): bash benchmarks/gpu_quantized.sh OUT {tests|fp8|int4}
set -uo pipefail
out="${1:-/tmp/out}"
stage="${2:-tests}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
engine() {  # quantization (none|fp8|int4) -> builds /tmp/8b-<q> once
  local q=$1 dir=/tmp/8b-$1
  [ -d /tmp/8b ] || python3 benchmarks/random_model.py llama-3.1-8b /tmp/8b > /dev/null
  if [ ! -f "$dir/engine.json" ]; then
    /usr/bin/time -f "build $q: %e s" python3 -m kiln.cli.main build /tmp/8b -o "$dir" --dtype bfloat16 --tune off \
      --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 $([ "$q" = none ] || echo --quantize "$q") \
      2>&1 | grep -v "%|"
    du -sh "$dir" | sed "s/^/engine size: /"
  fi
}
bench() {  # name, then kiln bench arguments
  local name=$1; shift
  timeout 240 python3 -m kiln.cli.main bench "$@" --json "$out/gpu_8b_$name.json" 2>&1 | grep -v "it/s\]" | tail -14
}
run_tests() {
  KILN_TEST_DEVICE=cuda timeout "$1" python3 -m pytest -q -p no:cacheprovider tests/test_quantize.py \
      tests/test_packed_weights.py -k "not smollm2" 2>&1 | tee "$out/gpu_quantized_tests.log" \
      | grep -E "passed|failed|Error|FAILED" | tail -25
}
run_fp8() {
  for q in none fp8; do
    engine $q
    bench "throughput_$q" throughput /tmp/8b-$q --input-len 128 --output-len 128 --num-requests 1000
  done
}
case "$stage" in
  tests) run_tests 300 ;;
  fp8) run_fp8 ;;
  main) run_tests 120; run_fp8 ;;
  int4)
    for q in none int4 fp8; do
      engine $q
      bench "latency_b1_$q" latency /tmp/8b-$q --input-len 128 --output-len 256 --iterations 3
    done ;;
esac
