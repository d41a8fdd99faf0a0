"""Plugins for ``linear`` and ``logits`` on the CPU in float32: oneDNN's inner product over a weight
reordered at load.

At decode batch sizes the CPU is bound by how fast it reads weights. oneDNN with its own blocked
weight layout reads them at 20-24 GB/s on the 2-core dev machine, where the default float32 path
(MKL over the [out, in] weight) gets 16 GB/s at one row and about 10 GB/s at eight, so decode runs
1.6-1.9x faster (SmolLM2's shapes). That is one CPU: on a 2-core Xeon it was slower than the
default path, so the runtime times both at load and keeps the faster (``kiln/ops/tuning.py``). In
bfloat16 the default path is already as fast, so this plugin declines it. The engine keeps its
weights portable ([out, in]); the reorder happens at load.
"""
from __future__ import annotations

import torch

from kiln.ops.registry import plugin


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _reorder(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to_mkldnn()


@plugin("linear", "onednn", supports=_supports, prepare=_reorder, graph_safe=True)
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` is the oneDNN tensor ``_reorder`` made; x is [T, in] float32."""
    out = torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), weight, None).to_dense()
    return out if bias is None else out + bias


@plugin("logits", "onednn", supports=_supports, prepare=_reorder, graph_safe=True)
def onednn_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return onednn_linear(hidden, weight)
