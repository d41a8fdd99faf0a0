"""Linear layers in their tensor-parallel forms.

``ColumnLinear`` splits output features across ranks, ``RowLinear`` splits input features; each is
built with its rank's shard shape from the ``Mapping``. The fused forms (``QKVLinear``,
``MergedColumnLinear``) are column layers whose output is several projections side by side;
``fused_from`` names the checkpoint tensors the builder concatenates into them.

NOTE: only the shard shapes exist today: the build refuses tp_size > 1 (BuildConfig), so no layer
communicates across ranks; RowLinear's sum of partial products is still to be written.
"""
from __future__ import annotations

import torch
from torch import nn

from kiln.nn.mapping import Mapping
from kiln.ops import OpTable


class _Linear(nn.Module):
    def prepare_weights(self) -> None:
        """After loading: convert the weight to the form the bound ``linear`` implementation reads."""
        self.weight = nn.Parameter(self.ops.prepare_weight("linear", self.weight.data), requires_grad=False)


class ColumnLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, ops: OpTable, mapping: Mapping = Mapping()):
        super().__init__()
        self.ops = ops
        self.mapping = mapping
        self.in_features = in_features
        self.out_features = mapping.shard(out_features, "output features")
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class RowLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, ops: OpTable, mapping: Mapping = Mapping()):
        super().__init__()
        self.ops = ops
        self.mapping = mapping
        self.in_features = mapping.shard(in_features, "input features")
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class MergedColumnLinear(ColumnLinear):
    """Several column projections of the same input stored as one weight (e.g. gate and up)."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool, ops: OpTable, fused_from: tuple[str, ...],
                 mapping: Mapping = Mapping()):
        super().__init__(in_features, sum(sizes), bias, ops, mapping)
        self.sizes = [mapping.shard(s, name) for s, name in zip(sizes, fused_from)]
        self.fused_from = fused_from


class QKVLinear(MergedColumnLinear):
    """Query, key and value projections as one weight: [q heads | kv heads | kv heads] * head_dim."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, ops: OpTable,
                 mapping: Mapping = Mapping()):
        super().__init__(
            hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias, ops,
            ("q_proj", "k_proj", "v_proj"), mapping,
        )
