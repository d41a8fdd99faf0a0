"""Checkpoint tensors -> engine tensors: fuse projections the plan runs as one, cast to the build dtype."""
from __future__ import annotations

import torch

from kiln.errors import BuildError
from kiln.models import ModelConfig, weight_sources


def engine_tensors(config: ModelConfig, checkpoint: dict[str, torch.Tensor],
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The engine's weights, named as the model's parameters, from a checkpoint's (unfused) tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, parts in weight_sources(config).items():
        tensors = []
        for source, shape in parts:
            tensor = _take(checkpoint, source)
            if tuple(tensor.shape) != shape:
                raise BuildError(f"tensor {source!r} has shape {tuple(tensor.shape)}, the model needs {shape}")
            tensors.append(tensor)
        out[name] = (tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)).to(dtype).contiguous()
    return out


def _take(checkpoint: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return checkpoint[name]
    except KeyError:
        raise BuildError(f"the checkpoint has no tensor {name!r}") from None
