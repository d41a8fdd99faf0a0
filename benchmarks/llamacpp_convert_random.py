"""Run llama.cpp's own convert_hf_to_gguf.py unchanged, except for one thing: the BPE pre-tokenizer name.

Why: kiln's random models (benchmarks/random_model.py) carry the tests' tiny byte-level BPE tokenizer
(320 tokens, trained on the tests' corpus). The converter identifies a BPE pre-tokenizer by hashing the
ids that the tokenizer gives for a fixed check string and looking the hash up in a table of known
models (get_vocab_base_pre); this tokenizer's hash (3be6a2c6...) is in no table, so the converter stops
with "BPE pre-tokenizer was not recognized", and it has no command-line option to name one.
The tokenizer's pre-tokenizer is Hugging Face's ByteLevel with use_regex=True, i.e. GPT-2's split
regex, which is llama.cpp's "gpt-2" pre-tokenizer (LLAMA_VOCAB_PRE_TYPE_GPT2), so that name is written instead. Nothing else
changes (vocab padded to config.vocab_size with [PADn] tokens by the converter itself, as it always does).

Usage: python benchmarks/llamacpp_convert_random.py LLAMA_CPP_DIR HF_DIR --outtype f16 --outfile OUT.gguf
  (LLAMA_CPP_DIR: the llama.cpp tree holding convert_hf_to_gguf.py, e.g. the llama-cpp-python sdist's
   vendor/llama.cpp; the remaining arguments go to convert_hf_to_gguf.py as they are)
"""
import runpy
import sys
from pathlib import Path

llama_cpp_dir = Path(sys.argv.pop(1)).resolve()
sys.path.insert(0, str(llama_cpp_dir))
sys.path.insert(1, str(llama_cpp_dir / "gguf-py"))

from conversion.base import TextModel  # noqa: E402  (llama.cpp's converter package)


def _pre_tokenizer_gpt2(self, tokenizer) -> str:
    return "gpt-2"


TextModel.get_vocab_base_pre = _pre_tokenizer_gpt2
sys.argv[0] = str(llama_cpp_dir / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
