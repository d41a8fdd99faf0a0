# Sourced by the GPU machine's scripts (benchmarks/gpu_*.sh), run from the repo root: what each of them needs first.
#   install_wheels   the packages the GPU image lacks, from the carried .whl/ (README: Notes), into /tmp/site
#   random_engine SHAPE MODEL ENGINE
#                    benchmarks/random_model.py's SHAPE (bf16, random weights, SmolLM2's tokenizer where
#                    .gpu-inputs/smollm2-tokenizer holds it) at MODEL and its engine at ENGINE (max batch 256,
#                    8,192 tokens a step), each made once
#   engine_8b        random_engine for the 8B shape at /tmp/8b, its engine at /tmp/8b-engine
#   unpack_py_spy    py-spy's binary at /tmp/py-spy, from its wheel in .gpu-inputs/tools/ (carried)
install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 \
      | grep -v "already exists" | tail -2
}

random_engine() {
  local shape=$1 model=$2 engine=$3 tokenizer=()
  [ -f .gpu-inputs/smollm2-tokenizer/tokenizer.json ] && tokenizer=(--tokenizer .gpu-inputs/smollm2-tokenizer)
  [ -d "$model" ] || python3 benchmarks/random_model.py "$shape" "$model" "${tokenizer[@]}" > /dev/null
  [ -f "$engine/engine.json" ] || python3 -m kiln.cli.main build "$model" -o "$engine" --dtype bfloat16 \
      --tune off --max-seq-len 4096 --max-batch-size 256 --max-num-tokens 8192 2>&1 | grep -v "%|" | tail -2
}

engine_8b() { random_engine llama-3.1-8b /tmp/8b /tmp/8b-engine; }

unpack_py_spy() {
  python3 -c "import glob, os, zipfile; z = zipfile.ZipFile(glob.glob('.gpu-inputs/tools/py_spy-*.whl')[0]); \
name = next(n for n in z.namelist() if n.endswith('/scripts/py-spy')); open('/tmp/py-spy', 'wb').write(z.read(name)); \
os.chmod('/tmp/py-spy', 0o755)"
}
