#!/usr/bin/env bash
# On the GPU machine: quantized engines of the 8B shape (issue 14) beside bf16, each built from the same
# random-weight Hugging Face folder with --tune off (the same kernels but the linear ops), in one call.
#   tests: the CUDA tests of the quantized and packed formats (tinygemm, scaled_mm, the fp8 row kernel)
#   fp8:   1,000 requests of 128/128 at once, bf16 then --quantize fp8
#   int4:  batch 1, 128 in / 256 out, bf16, --quantize int4 (groups of 128) and --quantize fp8
#   main:  tests (2 minutes at most), then fp8
#   kv:    the KV cache's capacity (tokens the pool holds at --gpu-memory-utilization 0.9) in bf16 and
#          --kv-cache-dtype fp8, then fp8's 1,000 requests of 128/128
#   kv-bf16: the KV cache tests, then 1,000 requests of 128/128 with bf16 weights: bf16 and fp8 KV caches
#   kv-fp8:  the same with --quantize fp8 weights
#   int4-tests: the 4-bit Triton kernels' tests (5 minutes at most)
#   int4-triton: the 4-bit Triton kernel benchmark (benchmarks/gpu_int4_gemv.py), then batch 1 (128 + 256)
#          with bf16 and --quantize int4 (activation-aware scales, the default), the latter with the plan's
#          Triton kernel and again with tinygemm (a copy of the engine whose plan names it)
# Needs the gguf wheel in .whl/ (README: Notes). Usage (repo root): bash benchmarks/gpu_quantized.sh OUT {tests|fp8|int4|kv}
set -uo pipefail
out="${1:-/tmp/out}"
stage="${2:-tests}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 KILN_VERIFY_WEIGHTS=0
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
engine() {  # quantization (none|fp8|int4) [kv cache dtype] -> builds /tmp/8b-<q>[-kv<kv>] once
  local q=$1 kv=${2:-} dir=/tmp/8b-$1${2:+-kv$2}
  [ -d /tmp/8b ] || python3 benchmarks/random_model.py llama-3.1-8b /tmp/8b > /dev/null
  if [ ! -f "$dir/engine.json" ]; then
    /usr/bin/time -f "build $q ${kv:-}: %e s" python3 -m kiln.cli.main build /tmp/8b -o "$dir" --dtype bfloat16 \
      --tune off --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 \
      $([ "$q" = none ] || echo --quantize "$q") ${kv:+--kv-cache-dtype $kv} 2>&1 | grep -v "%|"
    du -sh "$dir" | sed "s/^/engine size: /"
  fi
}
bench() {  # name, then kiln bench arguments
  local name=$1; shift
  timeout 240 python3 -m kiln.cli.main bench "$@" --json "$out/gpu_8b_$name.json" 2>&1 | grep -v "it/s\]" | tail -14
}
run_tests() {
  KILN_TEST_DEVICE=cuda timeout "$1" python3 -m pytest -q -p no:cacheprovider tests/test_quantize.py \
      tests/test_packed_weights.py tests/test_kv_cache_dtype.py tests/test_compressed_tensors.py \
      "tests/test_triton_kernels.py" -k "not smollm2" 2>&1 | tee "$out/gpu_quantized_tests.log" \
      | grep -E "passed|failed|Error|FAILED" | tail -25
}
capacity() {  # engine dir, name: the tokens the KV pool holds when the engine may fill 90% of the GPU
  python3 - "$1" "$out/gpu_8b_kv_capacity_$2.json" <<'PY'
import json, sys
from kiln.runtime import LLM
from kiln.runtime.llm_engine import live_core_place
llm = LLM(sys.argv[1], gpu_memory_utilization=0.9, cuda_graphs="off", engine_core=live_core_place(None))
blocks, size = llm.engine.call(lambda core: (core.runner.num_blocks, core.runner.block_size))
found = {"engine": sys.argv[1], "kv_blocks": blocks, "block_size": size, "kv_tokens": blocks * size}
print(json.dumps(found))
json.dump(found, open(sys.argv[2], "w"))
llm.shutdown()
PY
}
run_kv_tests() {
  KILN_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kv_cache_dtype.py \
      tests/test_triton_kernels.py -k "not smollm2 and (quantized or kv or folded or cache)" 2>&1 \
      | tee "$out/gpu_kv_tests.log" | grep -E "passed|failed|Error|FAILED" | tail -15
}
throughput_pair() {  # weights quantization: 1,000 x 128/128 with a bf16 and an fp8 KV cache
  for kv in "" fp8; do
    engine "$1" $kv
    bench "throughput_$1${kv:+_kv$kv}" throughput /tmp/8b-$1${kv:+-kv$kv} --input-len 128 --output-len 128 \
      --num-requests 1000
  done
}
with_impl() {  # engine dir, op, implementation -> a copy whose plan runs the op with that implementation
  local dir="$1-$3"
  [ -d "$dir" ] || cp -r "$1" "$dir"
  python3 - "$dir/engine.json" "$2" "$3" <<'PY'
import json, sys
path, op, impl = sys.argv[1:]
meta = json.load(open(path))
meta["plan"][op] = {"impl": impl}
json.dump(meta, open(path, "w"), indent=2)
PY
}
run_int4_tests() {
  KILN_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
      tests/test_quantize.py -k "int4 or triton or quantized" 2>&1 | tee "$out/gpu_int4_tests.log" \
      | grep -E "passed|failed|Error|FAILED" | tail -15
}
run_int4_triton() {
  timeout 150 python3 benchmarks/gpu_int4_gemv.py "$out/gpu_int4_gemv.json" --formats int4_g128 2>&1 | tail -30
  for q in none int4; do
    engine $q
    bench "latency_b1_$q" latency /tmp/8b-$q --input-len 128 --output-len 256 --iterations 3
  done
  with_impl /tmp/8b-int4 linear_int4_g128 tinygemm
  bench "latency_b1_int4_tinygemm" latency /tmp/8b-int4-tinygemm --input-len 128 --output-len 256 --iterations 3
}
run_kv() {
  engine none; capacity /tmp/8b-none bf16
  engine none fp8; capacity /tmp/8b-none-kvfp8 fp8
  bench "throughput_kvfp8" throughput /tmp/8b-none-kvfp8 --input-len 128 --output-len 128 --num-requests 1000
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
  kv) run_kv ;;
  kv-bf16) run_kv_tests; throughput_pair none ;;
  kv-fp8) throughput_pair fp8 ;;
  int4-tests) run_int4_tests ;;
  int4-triton) run_int4_triton ;;
  int4)
    for q in none int4 fp8; do
      engine $q
      bench "latency_b1_$q" latency /tmp/8b-$q --input-len 128 --output-len 256 --iterations 3
    done ;;
esac
