"""Reference implementations of every op, in plain PyTorch. They define what is correct.

Numerics follow Hugging Face transformers' Llama family (RMSNorm in float32, rotary tables
computed in float32 and cast to the activation dtype), so kiln matches it and plugins are checked against these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ops.attention_metadata import AttentionMetadata
from kiln.ops.registry import reference
from kiln.weight_formats import FORMATS


@reference("embedding")
def embedding(token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Look up token embeddings: [T] -> [T, hidden]."""
    return F.embedding(token_ids, weight)


@reference("linear")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b."""
    return F.linear(x, weight, bias)


@reference("logits")
def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Output projection onto the vocabulary; ``weight`` is [vocab, hidden] (shared with a tied embedding)."""
    return F.linear(hidden, weight)


@reference("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled in the input dtype (as transformers does)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@reference("add_rms_norm")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x + residual; returns (normed, x + residual), the sum in x's dtype as transformers adds."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


@reference("silu_and_mul")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, heads, D] with each token's [cos; sin] rows, cos_sin [T, 2, D] in x's dtype."""
    cos = cos_sin[:, 0].unsqueeze(1)
    sin = cos_sin[:, 1].unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# The largest magnitude a one-byte KV cache holds; the build scales keys and values so that their calibrated
# maximum lands there (kiln.builder.kv_scales), and a store saturates beyond it.
KV_CACHE_MAX = {FORMATS["int8"].element: FORMATS["int8"].max_value, FORMATS["fp8"].element: FORMATS["fp8"].max_value}


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a KV cache of ``dtype`` stores it: a float dtype as cast; int8 rounded half up (floor(x + 0.5))
    and saturated at +-127; float8 e4m3 saturated at +-448, then rounded to nearest even."""
    top = KV_CACHE_MAX.get(dtype)
    if top is None:
        return x.to(dtype)
    x = x.float()
    return (torch.floor(x + 0.5) if dtype == torch.int8 else x).clamp(-top, top).to(dtype)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store this step's keys and values ([T, Hk, D]) in their cache slots ([blocks, block, Hk, D])."""
    for x, cache in ((k, k_cache), (v, v_cache)):
        x = to_cache_dtype(x, cache.dtype)
        if cache.dtype.itemsize == 1:  # (torch copies float8 by index as bytes only)
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, x)


@reference("rotary_and_write_kv_cache")
def rotary_and_write_kv_cache(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """RoPE on a fused projection's query and key heads, keys and values stored in their cache slots.

    ``qkv`` is [T, H + 2 Hk, D] (query heads, then key heads, then value heads) and ``cos_sin`` the
    [T, 2, D] rotary rows in qkv's dtype. Returns the rotated queries [T, H, D].
    """
    num_kv_heads = (qkv.shape[1] - num_heads) // 2
    # NOTE: per token, the query heads and key heads are adjacent, so one rotary call covers both.
    qk = rotary_embedding(qkv[:, : num_heads + num_kv_heads], cos_sin)
    write_kv_cache(qk[:, num_heads:], qkv[:, num_heads + num_kv_heads:], k_cache, v_cache, slot_mapping)
    return qk[:, :num_heads]


@reference("paged_attention", graph_safe=False)  # its loop reads lengths on the host
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries [T, H, D] over each sequence's paged context.

    Query row j of a sequence with q_len new tokens and context length L sits at position
    L - q_len + j and sees keys at positions <= its own (and > its own - sliding_window).
    """
    out = torch.empty_like(q)
    block_size = meta.block_size
    heads_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    for i, seq_len in enumerate(meta.seq_lens):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        q_len = end - start
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :num_blocks]
        k = k_cache[blocks].reshape(-1, heads_kv, head_dim)[:seq_len].transpose(0, 1)
        v = v_cache[blocks].reshape(-1, heads_kv, head_dim)[:seq_len].transpose(0, 1)
        qi = q[start:end].transpose(0, 1)
        mask = _causal_mask(q_len, seq_len, sliding_window, q.device)
        o = F.scaled_dot_product_attention(
            qi, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
            is_causal=mask is None and q_len == seq_len and q_len > 1,
            scale=scale, enable_gqa=qi.shape[0] != heads_kv,
        )
        out[start:end] = o.transpose(0, 1)
    return out


def _causal_mask(q_len: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = attend) or None where SDPA's own causal flag, or none, suffices."""
    if window is None or window >= seq_len:
        if q_len == 1 or q_len == seq_len:
            return None
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask
