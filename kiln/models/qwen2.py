"""Qwen2: the Llama architecture with biases on the query, key and value projections."""
from __future__ import annotations

from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM, config_from_hf as llama_config_from_hf


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


def config_from_hf(hf: dict) -> ModelConfig:
    # Qwen2 windows only layers at or past max_window_layers, and only with use_sliding_window.
    if not hf.get("layer_types"):
        n, first = hf["num_hidden_layers"], hf.get("max_window_layers", hf["num_hidden_layers"])
        sliding = bool(hf.get("use_sliding_window")) and hf.get("sliding_window") is not None
        hf = {**hf, "layer_types": ["sliding_attention" if sliding and i >= first else "full_attention"
                                    for i in range(n)]}
    return llama_config_from_hf(hf, qkv_bias=True)
