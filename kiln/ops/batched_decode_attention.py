"""A plugin for ``paged_attention``: all sequences of a decode step in one batched product.

The reference runs one attention call per sequence, which costs more in dispatch than in arithmetic
when every sequence brings a single query. For decode-only steps this gathers every sequence's
blocks at once, masks the padding, and computes grouped-query attention with two batched matmuls.
Steps with prefill chunks go to the reference. Decode steps read their lengths only from tensors
(with ``meta.max_seq_len`` fixing the shapes), so they can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

from kiln.ops.attention_metadata import AttentionMetadata
from kiln.ops.reference import paged_attention as reference_paged_attention
from kiln.ops.registry import plugin


@plugin("paged_attention", "batched_decode", graph_safe=True)
def batched_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    if not meta.is_decode_only:
        return reference_paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    num_seqs, heads, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    group = heads // heads_kv
    max_len = meta.max_seq_len or max(meta.seq_lens)
    num_blocks = -(-max_len // meta.block_size)
    table = meta.block_tables[:, :num_blocks]
    # [B, blocks, block, Hk, D] -> [B, Hk, L, D]
    k = k_cache[table].flatten(1, 2)[:, :max_len].permute(0, 2, 1, 3).to(q.dtype)
    v = v_cache[table].flatten(1, 2)[:, :max_len].permute(0, 2, 1, 3).to(q.dtype)
    qg = q.view(num_seqs, heads_kv, group, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hk, G, L]
    scores.masked_fill_(_padding_mask(meta, max_len, sliding_window, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(num_seqs, heads, head_dim)


def _padding_mask(meta: AttentionMetadata, max_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[B, 1, 1, L], True where a key is padding or outside the window; built once per step and window."""
    key = ("batched_decode_mask", window)
    mask = meta.scratch.get(key)
    if mask is None:
        lens = meta.seq_lens_t if meta.seq_lens_t is not None else torch.tensor(meta.seq_lens, device=device)
        pos = torch.arange(max_len, device=device)
        mask = pos[None, :] >= lens[:, None]
        if window is not None:
            mask |= pos[None, :] <= (lens[:, None] - 1 - window)
        mask = meta.scratch[key] = mask[:, None, None, :]
    return mask
