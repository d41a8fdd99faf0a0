#!/usr/bin/env bash
# On the GPU machine: the server tests that need a CUDA device (CUDA shared memory through real IPC handles,
# made by tritonclient's own utilities with the image's cuda-python), over HTTP and gRPC.
#   bash benchmarks/gpu_server_tests.sh OUT [PYTEST -k EXPRESSION]
set -uo pipefail
out="${1:-/tmp/out}"
expr="${2:-cuda_shared_memory}"
source benchmarks/gpu_setup.sh
install_wheels
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
python3 -c "import cuda.bindings, tritonclient, onnx, onnxruntime; print('cuda-python', cuda.bindings.__version__)"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_server_protocols.py -k "$expr" -rs 2>&1 \
    | tee "$out/gpu_server_tests.log" | tail -15
