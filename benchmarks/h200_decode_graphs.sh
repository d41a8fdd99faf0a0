#!/usr/bin/env bash
# On the GPU machine: the CUDA tests (decode graphs on), then kiln bench throughput of a
# SmolLM2-shaped model with decode graphs on and off, transformers side by side.
# Usage (repo root, gguf wheel in .whl/): bash benchmarks/h200_decode_graphs.sh OUT_DIR
set -uo pipefail
out="${1:-/tmp/out}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gguf-*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 KILN_TEST_DEVICE=cuda
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_executor.py tests/test_model_parity.py 2>&1 \
  | tee "$out/h200_graph_tests.log" | tail -4
python3 benchmarks/random_smollm2.py /tmp/smollm2-shape
common=(/tmp/smollm2-shape --input-len 128 --output-len 128 --num-requests 256 --max-batch-size 64
        --max-num-tokens 2048 --max-seq-len 512)
timeout 120 python3 -m kiln.cli.main bench throughput "${common[@]}" --compare-hf \
  --json "$out/h200_graphs_on.json" 2>&1 | tail -24
timeout 90 python3 -m kiln.cli.main bench throughput "${common[@]}" --decode-graphs off \
  --json "$out/h200_graphs_off.json" 2>&1 | grep -E "output tokens/s|time per output"
