"""Mistral: the Llama architecture with sliding-window attention on every layer."""
from __future__ import annotations

from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM, config_from_hf as llama_config_from_hf


class MistralForCausalLM(LlamaForCausalLM):
    pass


def config_from_hf(hf: dict) -> ModelConfig:
    # Mistral applies its window everywhere; transformers' default is 4096 when the key is absent.
    hf = {"sliding_window": 4096, **hf, "use_sliding_window": hf.get("sliding_window", 4096) is not None}
    return llama_config_from_hf(hf)
