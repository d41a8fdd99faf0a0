"""What every checkpoint reader hands on: a model as Hugging Face would describe it.

Readers of Hugging Face folders and of GGUF files both produce a ``SourceModel``; one writer
turns it into a kiln checkpoint. Tensor names and the config use Hugging Face's conventions so that
each model family maps them once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tokenizers import Tokenizer


@dataclass
class SourceModel:
    # As a Hugging Face config.json holds it: "architectures", "hidden_size", "num_hidden_layers", ...
    hf_config: dict
    # Yields (Hugging Face tensor name, tensor) one at a time, so a large model is never all in memory.
    # Names as in transformers' state dict: "model.layers.0.self_attn.q_proj.weight", "lm_head.weight".
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    # Number of tensors ``tensors()`` yields (for a progress bar).
    num_tensors: int
    tokenizer: Tokenizer
    # As a Hugging Face tokenizer_config.json holds it: "bos_token", "eos_token", "pad_token",
    # "unk_token", "chat_template", "add_bos_token", "add_eos_token", ...
    tokenizer_config: dict
    # Where it came from, for messages and the engine's record.
    source: str = ""
    # What else the source says about the model: "kv_cache_scales" (a checkpoint's static FP8 KV cache,
    # {"k": [per layer], "v": [per layer]}, floats; the kiln checkpoint carries it), "gguf_name", ...
    extra: dict = field(default_factory=dict)
    # Tensors that ``tensors()`` yields packed, by name: their format (kiln.weight_formats), the packed
    # tensor uint8 [out, row bytes]. The others are float.
    formats: dict[str, str] = field(default_factory=dict)
    # As a Hugging Face generation_config.json holds it: the model's own sampling defaults ("temperature",
    # "top_p", "top_k", "min_p", "repetition_penalty") and "eos_token_id"; empty where the source has none.
    generation_config: dict = field(default_factory=dict)
