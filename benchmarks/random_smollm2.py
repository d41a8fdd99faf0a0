"""Save a random-weight model of SmolLM2-135M's shape (Llama, 30 layers, 576 hidden) as a Hugging Face folder.

For speed runs on a machine that lacks the real weights: speed depends on the shapes, not the values.
Usage: python benchmarks/random_smollm2.py OUT_DIR
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hf_models import make_hf_model  # noqa: E402

if __name__ == "__main__":
    make_hf_model("LlamaForCausalLM", Path(sys.argv[1]), hidden_size=576, intermediate_size=1536,
                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                  tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0)
