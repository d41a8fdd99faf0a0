"""The small layers: token embedding, RMSNorm, rotary position table, gated MLP."""
from __future__ import annotations

import math

import torch
from torch import nn

from kiln.nn.linear import MergedColumnLinear, RowLinear
from kiln.nn.mapping import Mapping
from kiln.ops import OpTable
from kiln.weight_formats import FLOAT, block_format


class Embedding(nn.Module):
    """Token embeddings (also an untied output projection's weight). A packed table stays packed: the
    rows a step looks up are decoded, not the table."""

    weight_format: str = FLOAT

    def __init__(self, vocab_size: int, hidden: int, ops: OpTable):
        super().__init__()
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)

    def set_weight_format(self, fmt: str) -> None:
        shape = block_format(fmt).packed_shape(tuple(self.weight.shape))
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8, device=self.weight.device),
                                   requires_grad=False)
        self.weight_format = fmt

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.weight_format == FLOAT:
            return self.ops.embedding(token_ids, self.weight)
        return block_format(self.weight_format).dequantize(self.weight[token_ids], self.ops.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, ops: OpTable):
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm of x + residual, x + residual): a residual connection and the norm after it, in one op."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection."""

    def __init__(self, hidden: int, intermediate: int, ops: OpTable, mapping: Mapping = Mapping()):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = MergedColumnLinear(hidden, [intermediate, intermediate], False, ops,
                                               ("gate_proj", "up_proj"), mapping)
        self.down_proj = RowLinear(intermediate, hidden, False, ops, mapping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


def rotary_table(head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """The [max_positions, 2, head_dim] float32 cos/sin table of rotate-half RoPE.

    Supports the rope types of Llama-family checkpoints: default, linear and llama3 (frequency
    bands); others are refused by name.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type != "default":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3")
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()), dim=1)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
