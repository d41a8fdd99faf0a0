# Sourced by the GPU machine's scripts (benchmarks/gpu_*.sh), run from the repo root: what each of them needs first.
#   install_wheels   the packages the GPU image lacks, from the carried .whl/ (README: Notes), into /tmp/site
#   engine_8b        the 8B shape (bf16, random weights, SmolLM2's tokenizer where .gpu-inputs/smollm2-tokenizer
#                    holds it) and its engine at /tmp/8b-engine (max batch 256, 8,192 tokens a step), built once
#   unpack_py_spy    py-spy's binary at /tmp/py-spy, from its wheel in .gpu-inputs/tools/ (carried)
install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 \
      | grep -v "already exists" | tail -2
}

engine_8b() {
  local tokenizer=()
  [ -f .gpu-inputs/smollm2-tokenizer/tokenizer.json ] && tokenizer=(--tokenizer .gpu-inputs/smollm2-tokenizer)
  [ -d /tmp/8b ] || python3 benchmarks/random_model.py llama-3.1-8b /tmp/8b "${tokenizer[@]}" > /dev/null
  [ -f /tmp/8b-engine/engine.json ] || python3 -m kiln.cli.main build /tmp/8b -o /tmp/8b-engine --dtype bfloat16 \
      --tune off --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 | grep -v "%|" | tail -2
}

unpack_py_spy() {
  python3 -c "import glob, os, zipfile; z = zipfile.ZipFile(glob.glob('.gpu-inputs/tools/py_spy-*.whl')[0]); \
name = next(n for n in z.namelist() if n.endswith('/scripts/py-spy')); open('/tmp/py-spy', 'wb').write(z.read(name)); \
os.chmod('/tmp/py-spy', 0o755)"
}
