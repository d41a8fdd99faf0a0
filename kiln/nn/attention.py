"""Self-attention over the paged KV cache: fused QKV projection, RoPE and cache write, attention, output."""
from __future__ import annotations

import torch
from torch import nn

from kiln.nn.context import get_forward_context
from kiln.nn.linear import QKVLinear, RowLinear
from kiln.nn.mapping import Mapping
from kiln.ops import OpTable


class Attention(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        sliding_window: int | None,
        ops: OpTable,
        mapping: Mapping = Mapping(),
    ):
        super().__init__()
        self.ops = ops
        self.layer_idx = layer_idx
        self.num_heads = mapping.shard(num_heads, "attention heads")
        self.num_kv_heads = mapping.shard(num_kv_heads, "key/value heads")
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.v_scale = 1.0  # a quantized KV cache's value scale (set_kv_cache_scales)
        self.sliding_window = sliding_window
        self.qkv_proj = QKVLinear(hidden, head_dim, num_heads, num_kv_heads, qkv_bias, ops, mapping)
        self.o_proj = RowLinear(num_heads * head_dim, hidden, False, ops, mapping)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; cos_sin: [T, 2, head_dim], the rotary rows at each token's position."""
        ctx = get_forward_context()
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        q = self.ops.rotary_and_write_kv_cache(qkv, cos_sin, k_cache, v_cache, ctx.attn.slot_mapping, self.num_heads)
        o = self.ops.paged_attention(q, k_cache, v_cache, ctx.attn, self.scale, self.sliding_window)
        if self.v_scale != 1.0:
            o = o.mul_(self.v_scale)
        return self.o_proj(o.reshape(num_tokens, self.q_size))


def set_kv_cache_scales(model: nn.Module, scales: dict | None) -> None:
    """Give each attention layer its quantized KV cache's scales (engine.json's kv_cache_scales; None: a float
    cache): the cache holds k / s_k and v / s_v (``kiln.builder.kv_scales``), so s_k joins the softmax scale
    and s_v multiplies the attention output."""
    if scales is None:
        return
    for module in model.modules():
        if isinstance(module, Attention):
            module.scale = module.head_dim ** -0.5 * scales["k"][module.layer_idx]
            module.v_scale = scales["v"][module.layer_idx]
