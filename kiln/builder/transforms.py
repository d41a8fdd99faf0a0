"""Checkpoint tensors -> engine tensors: fuse projections the plan runs as one, cast to the build dtype."""
from __future__ import annotations

import torch

from kiln.errors import BuildError
from kiln.models import ModelConfig, create_model
from kiln.nn import MergedColumnLinear
from kiln.ops import OpTable


def engine_tensors(config: ModelConfig, checkpoint: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The engine's weights, named as the model's parameters, from a checkpoint's (unfused) tensors."""
    with torch.device("meta"):
        model = create_model(config, OpTable(None, torch.device("cpu"), dtype), max_positions=1)
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            if isinstance(module, MergedColumnLinear):
                parent = module_name.rsplit(".", 1)[0]
                parts = [_take(checkpoint, f"{parent}.{src}.{param_name}") for src in module.fused_from]
                tensor = torch.cat(parts, dim=0)
            else:
                tensor = _take(checkpoint, name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise BuildError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model needs {tuple(param.shape)}")
            out[name] = tensor.to(dtype).contiguous()
    return out


def _take(checkpoint: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return checkpoint[name]
    except KeyError:
        raise BuildError(f"the checkpoint has no tensor {name!r}") from None
