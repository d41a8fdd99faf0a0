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
from kiln.ops.packed_linear import op_name as packed_op
from kiln.weight_formats import FLOAT, block_format


class _Linear(nn.Module):
    # The weight's format (kiln.weight_formats): float, or packed blocks that the op of that format reads.
    weight_format: str = FLOAT

    def set_weight_format(self, fmt: str) -> None:
        """Before loading: hold the weight packed in ``fmt`` (uint8 rows of blocks) instead of as floats."""
        shape = block_format(fmt).packed_shape(tuple(self.weight.shape))
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8, device=self.weight.device),
                                   requires_grad=False)
        self.weight_format = fmt

    def prepare_weights(self) -> None:
        """After loading: convert the weight to the form the bound implementation of its op reads."""
        if self.weight_format == FLOAT:
            self.weight = nn.Parameter(self.ops.prepare_weight("linear", self.weight.data), requires_grad=False)
        else:
            # What the packed op's implementation reads (decoded floats, repacked blocks, ...) replaces the
            # loaded bytes, so the layer holds one copy.
            self.packed = self.ops.prepare_weight(packed_op(self.weight_format), self.weight.data)
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_format == FLOAT:
            return self.ops.linear(x, self.weight, self.bias)
        return getattr(self.ops, packed_op(self.weight_format))(x, self.packed, self.bias)


class ColumnLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, ops: OpTable, mapping: Mapping = Mapping()):
        super().__init__()
        self.ops = ops
        self.mapping = mapping
        self.in_features = in_features
        self.out_features = mapping.shard(out_features, "output features")
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None


class RowLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, ops: OpTable, mapping: Mapping = Mapping()):
        super().__init__()
        self.ops = ops
        self.mapping = mapping
        self.in_features = mapping.shard(in_features, "input features")
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None


class MergedColumnLinear(ColumnLinear):
    """Several column projections of the same input stored as one weight (e.g. gate and up).

    Where the projections come in different formats (a Q4_K_M file's Q4_K query and key, Q6_K value) one
    tensor cannot hold them: the layer then holds one weight per projection (``weight_parts.i``, each in its
    format), multiplies by each and puts the results side by side.
    """

    # One format per projection when the weight is held in parts (set_part_formats); None: one weight.
    part_formats: list[str] | None = None

    def __init__(self, in_features: int, sizes: list[int], bias: bool, ops: OpTable, fused_from: tuple[str, ...],
                 mapping: Mapping = Mapping()):
        super().__init__(in_features, sum(sizes), bias, ops, mapping)
        self.sizes = [mapping.shard(s, name) for s, name in zip(sizes, fused_from)]
        self.fused_from = fused_from

    def set_part_formats(self, formats: list[str]) -> None:
        """Before loading: hold the weight as one tensor per projection, in ``formats`` (float or packed)."""
        if len(formats) != len(self.sizes):
            raise ValueError(f"{len(formats)} formats for the {len(self.sizes)} projections {self.fused_from}")
        device, parts = self.weight.device, []
        for rows, fmt in zip(self.sizes, formats):
            shape = (rows, self.in_features)
            tensor = (torch.empty(shape, device=device) if fmt == FLOAT else
                      torch.empty(block_format(fmt).packed_shape(shape), dtype=torch.uint8, device=device))
            parts.append(nn.Parameter(tensor, requires_grad=False))
        self.weight = None
        self.weight_parts = nn.ParameterList(parts)
        self.part_formats = list(formats)

    def prepare_weights(self) -> None:
        if self.part_formats is None:
            super().prepare_weights()
            return
        ops = ["linear" if fmt == FLOAT else packed_op(fmt) for fmt in self.part_formats]
        self.parts = [(getattr(self.ops, op), self.ops.prepare_weight(op, part.data))
                      for op, part in zip(ops, self.weight_parts)]
        self.weight_parts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part_formats is None:
            return super().forward(x)
        y = torch.cat([linear(x, weight, None) for linear, weight in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias


class QKVLinear(MergedColumnLinear):
    """Query, key and value projections as one weight: [q heads | kv heads | kv heads] * head_dim."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, ops: OpTable,
                 mapping: Mapping = Mapping()):
        super().__init__(
            hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias, ops,
            ("q_proj", "k_proj", "v_proj"), mapping,
        )
