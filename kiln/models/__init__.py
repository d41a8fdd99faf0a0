"""Model families by their Hugging Face architecture name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kiln.models import llama, mistral, qwen2
from kiln.models.config import ModelConfig
from kiln.nn import ColumnLinear, Mapping, MergedColumnLinear, RowLinear
from kiln.ops import OpTable
from kiln.weight_formats import FLOAT


@dataclass(frozen=True)
class Family:
    model_class: type[nn.Module]
    config_from_hf: Callable[[dict], ModelConfig]


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(llama.LlamaForCausalLM, llama.config_from_hf),
    "MistralForCausalLM": Family(mistral.MistralForCausalLM, mistral.config_from_hf),
    "Qwen2ForCausalLM": Family(qwen2.Qwen2ForCausalLM, qwen2.config_from_hf),
}


def family(architecture: str) -> Family:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise KeyError(
            f"unsupported architecture {architecture!r}; kiln supports {', '.join(sorted(FAMILIES))}"
        ) from None


def create_model(config: ModelConfig, ops: OpTable, mapping: Mapping = Mapping(),
                 max_positions: int | None = None) -> nn.Module:
    """The model with empty weights; ``max_positions`` bounds the rotary table (the engine's max_seq_len)."""
    return family(config.architecture).model_class(config, ops, mapping, max_positions)


__all__ = ["FAMILIES", "Family", "ModelConfig", "create_model", "family"]


def weight_sources(config: ModelConfig) -> dict[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    """For each parameter of the model (an engine tensor), the checkpoint tensors it is made of and
    their shapes, concatenated along dim 0 in this order; a parameter that is not fused has itself.

    The one place the fused-weight rule lives: a ``MergedColumnLinear`` (fused QKV, gate/up) holds its
    ``fused_from`` projections side by side, named as the checkpoint names them next to the fused one.
    """
    with torch.device("meta"):
        model = create_model(config, OpTable(None, torch.device("cpu"), torch.float32), max_positions=1)
    sources: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            if isinstance(module, MergedColumnLinear):
                parent = module_name.rsplit(".", 1)[0]
                sources[name] = tuple((f"{parent}.{src}.{param_name}", (size, *param.shape[1:]))
                                      for src, size in zip(module.fused_from, module.sizes))
            else:
                sources[name] = ((name, tuple(param.shape)),)
    return sources


def linear_weights(config: ModelConfig) -> set[str]:
    """The engine tensors that are linear layers' weights (what ``kiln build --quantize`` quantizes; the
    embeddings and the output head are not)."""
    with torch.device("meta"):
        model = create_model(config, OpTable(None, torch.device("cpu"), torch.float32), max_positions=1)
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, (ColumnLinear, RowLinear))}


def checkpoint_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold (unfused names) and its shape."""
    return {src: shape for parts in weight_sources(config).values() for src, shape in parts}


__all__ += ["checkpoint_layout", "linear_weights", "weight_sources"]


def apply_weight_formats(model: nn.Module, formats: dict[str, str]) -> None:
    """Before loading: give each parameter its format (``formats``: every engine tensor's, float included), so
    the model holds its weights as the engine stores them: packed weights as uint8 blocks, and fused weights
    held per projection (``...weight_parts.i``, see ``MergedColumnLinear``) as their parts."""
    parts: dict[str, dict[int, str]] = {}
    for name, fmt in formats.items():
        module_name, _, param = name.rpartition(".")
        if module_name.endswith(".weight_parts"):
            parts.setdefault(module_name.removesuffix(".weight_parts"), {})[int(param)] = fmt
            continue
        if fmt == FLOAT:
            continue
        module = model.get_submodule(module_name)
        if param != "weight" or not hasattr(module, "set_weight_format"):
            raise ValueError(f"{name} cannot hold a {fmt} weight: only linear and embedding weights are packed")
        module.set_weight_format(fmt)
    for module_name, by_index in parts.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, MergedColumnLinear) or sorted(by_index) != list(range(len(module.sizes))):
            raise ValueError(f"{module_name} cannot hold its weight in parts {sorted(by_index)}")
        module.set_part_formats([by_index[i] for i in range(len(by_index))])


__all__ += ["apply_weight_formats"]
